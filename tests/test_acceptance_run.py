"""export/evaluate.py (`make accuracy`): its data sets are the tests' own, the real CT's labels land where they
belong, the cache is rebuilt only when stale, the table states every bar as computed, and README's accuracy block
is the committed run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import evaluate as acceptance
from medseg.accuracy.metrics import ACCEPTANCE
from medseg.paths import REPO_ROOT


def test_the_acceptance_sets_are_the_ones_the_server_tests_hold_the_model_to() -> None:
    from tests import realct
    from tests.helpers import EVAL_SEEDS, NEGATIVES

    assert acceptance.EVAL_SEEDS == EVAL_SEEDS
    assert acceptance.NEGATIVE_REGIONS == NEGATIVES
    assert (acceptance.REALCT_CT, acceptance.REALCT_CT_LABELS, acceptance.REALCT_MR) == (realct.CT, realct.CT_LABELS, realct.MR)
    assert (acceptance.REALCT_DICOM, acceptance.REALCT_DICOM_LABELS) == (realct.DICOM_SERIES, realct.DICOM_LABELS)
    assert acceptance.REALCT_LIVER == realct.LIVER
    assert acceptance.REALCT_LABELLED_SLICES == realct.CT_LABELLED.stop - realct.CT_LABELLED.start


def test_example_ct_keeps_the_liver_of_its_top_slices_and_ignores_the_others() -> None:
    seg = np.zeros((4, 3, acceptance.REALCT_LABELLED_SLICES), np.uint8)
    seg[1, 1, 0], seg[2, 2, -1], seg[0, 0, 5] = acceptance.REALCT_LIVER, acceptance.REALCT_LIVER, 2  # 2: another organ
    labels = acceptance.example_ct_labels(seg, (4, 3, 40))
    assert labels.shape == (4, 3, 40) and labels.dtype == np.uint8
    assert (labels[:, :, :10] == acceptance.IGNORE).all()
    top = labels[:, :, 10:]
    assert set(np.unique(top)) == {0, 1} and top[1, 1, 0] == 1 and top[2, 2, -1] == 1 and top[0, 0, 5] == 0
    with pytest.raises(acceptance.AcceptanceError, match="top 30 slices"):
        acceptance.example_ct_labels(seg, (4, 4, 40))


def test_labels_stored_with_flipped_rows_land_on_the_studys_grid_through_their_affine(tmp_path: Path) -> None:
    from medseg_client.io.studies import read_study, save_nifti

    rng = np.random.default_rng(0)
    ct = rng.integers(-100, 200, size=(6, 5, 4), dtype=np.int16)  # native (i, j, k)
    affine = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 2.0, -300.0], [0, 0, 0, 1]])  # L, A, S
    save_nifti(ct, affine, tmp_path / "ct.nii.gz")
    study = read_study(tmp_path / "ct.nii.gz")
    labels = (ct > 50).astype(np.uint8)
    flipped = labels[:, ::-1, :]  # the rows stored the other way round, and the affine says so
    flipped_affine = affine.copy()
    flipped_affine[:, 1] *= -1
    flipped_affine[:3, 3] = affine[:3, :3] @ [0, ct.shape[1] - 1, 0] + affine[:3, 3]
    on_grid = acceptance.on_study_grid(flipped, flipped_affine, study)
    assert np.array_equal(on_grid, (study.ct > 50).astype(np.uint8))
    assert np.array_equal(study.to_native(on_grid), labels)
    shifted = flipped_affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(acceptance.AcceptanceError, match="do not land on the study's grid"):
        acceptance.on_study_grid(flipped, shifted, study)


def test_a_cached_data_set_is_rebuilt_only_when_missing_or_stale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    keys = {"phantoms": {"generator_version": 2}, "negatives": {"generator_version": 2}, "realct": {"sha256": {"a": "1"}}}

    def builder(group: str) -> Any:
        def build(folder: Path, *_: Any) -> dict[str, Any]:
            folder.mkdir()
            built.append(group)
            return {"description": group, "cases": {}}
        return build

    monkeypatch.setattr(acceptance, "data_keys", lambda realct: json.loads(json.dumps(keys)))
    for group, name in (("phantoms", "build_phantoms"), ("negatives", "build_negatives"), ("realct", "build_realct")):
        monkeypatch.setattr(acceptance, name, builder(group))
    acceptance.prepare_data(tmp_path, tmp_path / "realct")
    assert built == ["phantoms", "negatives", "realct"]
    acceptance.prepare_data(tmp_path, tmp_path / "realct")
    assert built == ["phantoms", "negatives", "realct"], "nothing changed: nothing rebuilt"
    keys["phantoms"]["generator_version"] = 3
    (tmp_path / "realct").rmdir()
    acceptance.prepare_data(tmp_path, tmp_path / "realct")
    assert built[3:] == ["phantoms", "realct"]
    manifest = json.loads((tmp_path / acceptance.MANIFEST).read_text())
    assert manifest["phantoms"]["key"] == {"generator_version": 3}


def _case(name: str, code: str, *, annotated: bool, dice: float, served: bool, tumors: int = 0) -> dict[str, Any]:
    return {"case": name, "status": {"code": code, "reported": code == "ok"},
            "liver": {"annotated": annotated, "dice": dice, "false_liver": not annotated and served},
            "tumors": {"reported": [{"id": i + 1} for i in range(tumors)], "reported_burden_ml": 1.5 * tumors,
                       "unverified": tumors}}


def _doc(cases: list[dict[str, Any]], summary: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"date": "2026-12-01T10:00:00+00:00", "machine": {"cpu_count": 2},
            "server": {"model": {"ensemble": "ct_liver", "version": 1, "weights_sha256": "ab" * 32}},
            "summary": summary or {}, "cases": cases}


def _phantom_summary(min_dice: float, found: int, total: int, false: int) -> dict[str, Any]:
    return {"cases": 8, "evaluated": 8, "errors": 0, "statuses": {"ok": 8},
            "liver_dice": {"n": 8, "min": min_dice, "mean": 0.95, "median": 0.95},
            "tumors": {"ge_10mm": {"found": found, "total": total, "sensitivity": found / total},
                       "5_to_10mm": {"found": 0, "total": 1, "sensitivity": 0.0}},
            "false_tumors": false, "false_tumors_per_scan": false / 8, "tumor_annotated_cases": 8}


def _verdicts(lines: list[str]) -> dict[str, str]:
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and not line.startswith("| set ")]
    return {f"{r[0][2:]}: {r[1]}": r[4] for r in rows}


@pytest.mark.parametrize(("min_dice", "found", "false", "expected"), [
    (0.95, 12, 1, ["met", "met", "met"]), (0.92, 11, 3, ["**NOT met**", "**NOT met**", "**NOT met**"]),
])
def test_the_table_states_every_bar_as_computed(min_dice: float, found: int, false: int, expected: list[str]) -> None:
    docs = {"phantoms": _doc([], _phantom_summary(min_dice, found, 12, false)),
            "negatives": _doc([_case("head_6000", "region_not_supported", annotated=False, dice=1.0, served=False),
                               _case("liver_tip_6006", "ok", annotated=False, dice=0.0, served=True)]),
            "realct/nifti": _doc([_case("example_ct", "ok", annotated=True, dice=0.96, served=True, tumors=2),
                                  _case("example_mr_sm", "not_ct", annotated=False, dice=1.0, served=False)]),
            "realct/dicom": _doc([{"case": "example_ct_dicom", "error": "refused", "stage": "segment"}])}
    lines = acceptance.block_lines(docs, {"flavor": "cpu"}, "2core-test")
    assert lines[0] == acceptance.BEGIN and lines[-1] == acceptance.END
    verdicts = _verdicts(lines)
    assert [verdicts[k] for k in ("phantoms: liver Dice min / mean", "phantoms: tumors >= 10 mm found",
                                  "phantoms: false tumors per study")] == expected
    assert verdicts["phantoms: tumors 5-10 mm found"] == "-"
    assert verdicts["negatives: head_6000: status; nothing reported"] == "met"
    assert verdicts["negatives: liver_tip_6006: status; nothing reported"] == "**NOT met**"
    real = {k: v for k, v in verdicts.items() if k.startswith("real CT")}
    assert list(real.values()) == ["met", "met", "**NOT met**"]
    text = "\n".join(lines)
    assert f"liver Dice >= {ACCEPTANCE.liver_dice:.2f} in every study" in text
    assert "`ok`; 0.960; tumor burden 3.00 mL; 2 unverified tumors" in text
    met = expected.count("met") + 3  # head, example_ct and the MR; liver_tip and the refused series are not
    assert f"Bars (`medseg.accuracy.metrics.ACCEPTANCE`): {met} of 8 met." in text
    assert "2core-test (2 cores), 2026-12-01" in text


def test_the_readme_update_replaces_only_the_accuracy_block(tmp_path: Path) -> None:
    readme, report = tmp_path / "README.md", tmp_path / "accuracy.md"
    readme.write_text(f"intro\n\n{acceptance.BEGIN}\nold\n{acceptance.END}\n\noutro\n")
    report.write_text(f"# run\n\n{acceptance.BEGIN}\n| new |\n{acceptance.END}\n")
    acceptance.update_readme(readme, report)
    assert readme.read_text() == f"intro\n\n{acceptance.BEGIN}\n| new |\n{acceptance.END}\n\noutro\n"


def test_the_readme_accuracy_table_is_the_committed_runs() -> None:
    """README's block is what the generator writes from a committed perf/results/<machine>/accuracy/ (metrics.json
    of each set and data.json); until a run is committed it is the placeholder and the test skips."""
    readme = acceptance.block((REPO_ROOT / "README.md").read_text())
    runs = sorted(p for p in (REPO_ROOT / "perf" / "results").glob("*/accuracy") if (p / acceptance.DATA_FILE).is_file())
    if not runs:
        assert readme == f"{acceptance.BEGIN}\n{acceptance.PLACEHOLDER}\n{acceptance.END}"
        pytest.skip("no perf/results/<machine>/accuracy/ yet: `make accuracy` writes it once the retrained model lands")
    generated = {"\n".join(acceptance.block_lines(*acceptance.load_results(run), run.parent.name)) for run in runs}
    assert readme in generated, "README's accuracy table differs from every perf/results/*/accuracy/: run `make accuracy`"
