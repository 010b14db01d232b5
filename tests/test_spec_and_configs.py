"""The spec is the single source of truth: configs are generated from it, literals live only there."""

from __future__ import annotations

import re
from pathlib import Path

from medseg.paths import REPO_ROOT
from medseg.serving import configgen
from medseg_client.spec import SPEC, model_grid_shape, padded_shape


def test_committed_configs_equal_what_the_spec_generates() -> None:
    diffs = configgen.check(configgen.configs())
    assert diffs == [], "\n".join(diffs)


def test_config_check_reports_a_hand_edited_config(tmp_path: Path) -> None:
    files = configgen.configs()
    _path, text = next(iter(files.items()))
    edited = tmp_path / "config.pbtxt"
    edited.write_text(text.replace("max_batch_size: 1", "max_batch_size: 8"))
    assert configgen.check({edited: text}), "a config edited by hand must be reported"


def test_every_model_has_cpu_and_cuda_flavors_or_is_the_ensemble() -> None:
    files = {p.relative_to(REPO_ROOT).as_posix() for p in configgen.configs()}
    for model in (SPEC.preprocess, SPEC.segmenter, SPEC.postprocess):
        assert f"model_repository/{model.name}/config.pbtxt" in files
        assert f"model_repository/{model.name}/configs/cpu.pbtxt" in files
        assert f"model_repository/{model.name}/configs/cuda.pbtxt" in files
    assert not any(f.startswith(f"model_repository/{SPEC.ensemble.name}/configs/") for f in files)  # one ensemble


def _sources() -> list[Path]:
    roots = [REPO_ROOT / d for d in ("src", "clients", "export", "model_repository", "perf")]
    return [p for r in roots if r.exists() for p in r.rglob("*.py")]


def test_configs_are_checked_against_tritons_own_schema() -> None:
    """configgen writes text itself; Triton's ModelConfig message (tritonclient's copy) parses each, so a misspelled
    field fails here instead of as a model that does not load."""
    import pytest

    config = configgen.config_dicts()["ct_segmenter/config.pbtxt"]
    assert configgen.to_pbtxt(config)
    with pytest.raises(ValueError, match=r"ct_segmenter.*max_batch_sise"):
        configgen.to_pbtxt({**{k: v for k, v in config.items() if k != "max_batch_size"}, "max_batch_sise": 1})
    with pytest.raises(ValueError, match="ct_segmenter"):
        configgen.to_pbtxt({**config, "max_batch_size": "one"})


def test_window_spacing_and_label_literals_appear_only_in_the_spec() -> None:
    lo, hi = SPEC.hu_window
    patterns = [rf"(?<![\d.]){lo:g}(?![\d])", rf"(?<![\d.]){hi:g}(?:\.0)?(?![\d])", r"1\.5\s*,\s*1\.5", r"2\.0\s*,\s*1\.5"]
    offenders = []
    for path in _sources():
        if path.name in ("spec.py", "phantom.py"):  # the phantom's numbers are anatomy (tissue HU, body mm)
            continue
        text = path.read_text()
        for pat in patterns:
            for m in re.finditer(pat, text):
                line = text[: m.start()].count("\n") + 1
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line}: {m.group(0)}")
    assert offenders == []


def test_model_grid_rounds_half_up_and_pads_to_the_divisor() -> None:
    assert model_grid_shape((60, 512, 512), (2.5, 0.7, 0.7)) == (75, 239, 239)
    assert model_grid_shape((33, 100, 90), (5.0, 0.9, 0.8)) == (83, 60, 48)  # 82.5 -> 83
    d = SPEC.network.size_divisor
    assert all(n % d == 0 and n >= g for n, g in zip(padded_shape((75, 239, 239)), (75, 239, 239), strict=True))
