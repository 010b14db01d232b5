"""No medseg command prints a traceback, whatever it is given.

Every command (phantom, segment, evaluate, mig plan / compose, serve, demo) runs over bad arguments and bad
files; ``medseg segment`` over the fuzz corpus of damaged series (tests/test_fuzz.py), damaged NIfTI headers,
every pydicom test file (as a one-file series and as the input itself) and the real CT and MR of
`make realct`, through the real server; ``medseg evaluate`` over real and broken cases. Each run must end
with exit 0, or 2 and exactly one line on stderr; exit 3 is an internal error (a bug) and fails the test with
its line. The bulk runs ``main()`` in-process (stdout and stderr captured at the file descriptors); a handful
of runs go through the installed ``medseg`` entry point to show it behaves the same. A failure injected at
each stage of ``medseg segment`` leaves neither a partial output nor a staging folder.
"""

from __future__ import annotations

import gzip
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydicom.data import get_testdata_files

from medseg_client.cli import EXIT_INTERNAL, main
from tests import realct
from tests.series_variants import MUTATIONS, Case, mutate, tiny_series

ENTRY_POINT = Path(sys.executable).with_name("medseg")
MEDSEG = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "medseg_client.cli"]
TEST_FILES = sorted(Path(f) for f in get_testdata_files() if Path(f).is_file())
TENANTS = Path(__file__).parent.parent / "docker" / "mig" / "tenants-h200.yaml"
DEVICES = Path(__file__).parent / "data" / "nvidia-smi-L-h200.txt"
# fuzz series big enough for the model (40 mm x 96 mm x 96 mm) so that the ones read reach the server
FUZZ_SERIES: dict[str, Any] = {"slices": 20, "size": 64, "spacing": (2.0, 1.5, 1.5)}
FUZZ_SAMPLE, FUZZ_SLOW = 40, 480
UNREACHABLE = "127.0.0.1:1"


@dataclass
class Run:
    argv: list[str]
    code: int
    out: str
    err: str


def breaches(run: Run) -> list[str]:
    """What in one run breaks the rule: a traceback, an exit other than 0, 1 (read and judged, nothing
    reported) or 2 (refused), an error or refusal that is not one line, anything on stderr after a success."""
    found = []
    if "Traceback" in run.out + run.err:
        found.append("a traceback")
    if run.code not in (0, 1, 2):
        found.append(f"exit {run.code}" + (" (an internal error)" if run.code == EXIT_INTERNAL else ""))
    lines = run.err.strip().splitlines()
    if run.code != 0 and len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    if run.code == 0 and lines:
        found.append("stderr after a success")
    return [f"medseg {' '.join(run.argv)}: {', '.join(found)}: {run.err.strip()[-800:]!r}"] if found else []


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """``cli(*argv)``: medseg's main() in this process, its output captured at the file descriptors (gRPC's C core
    writes there). Internal errors would log into tmp_path/logs: the test also checks that none did."""
    logs = tmp_path / "logs"
    monkeypatch.setenv("MEDSEG_LOG_DIR", str(logs))
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")  # what main() sets for itself, kept to this test

    def run(*argv: str) -> Run:
        capfd.readouterr()
        code = main(list(argv))
        captured = capfd.readouterr()
        return Run(list(argv), code, captured.out, captured.err)

    yield run
    assert not logs.exists() or not list(logs.iterdir()), f"internal errors were logged: {list(logs.iterdir())}"


def entry_point(*argv: str, env: dict[str, str] | None = None) -> Run:
    r = subprocess.run([*MEDSEG, *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    return Run(list(argv), r.returncode, r.stdout, r.stderr)


def assert_clean(runs: list[Run]) -> None:
    bad = [b for run in runs for b in breaches(run)]
    assert bad == [], f"{len(bad)} of {len(runs)} runs broke the rule:\n" + "\n".join(bad[:20])


# --- commands that need no server ---

def test_usage_errors_of_every_command_are_one_line(cli: Any, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    cases = [[], ["nope"], ["phantom"], ["phantom", "--seed", "x", "--out", out], ["phantom", "--seed", "1"],
             ["phantom", "--seed", "1", "--out", out, "--format", "png"], ["segment"], ["segment", "x"],
             ["segment", "x", "--out", out, "--timeout", "soon"], ["mig"], ["mig", "plan"], ["mig", "launch"],
             ["mig", "compose", str(TENANTS)], ["serve", "--grpc-port", "abc"], ["serve", "--flavor", "tpu"],
             ["serve", "--bogus"], ["demo", "--seed", "x"], ["evaluate"], ["import"], ["import", "monai"],
             ["import", "nnunet"], ["import", "nnunet", "x"], ["import", "nnunet", "x", "--name", "n", "--step", "half"],
             ["import", "monai-bundle"], ["import", "monai-bundle", "x"],
             ["models", "--timeout", "soon"], ["models", "extra"]]
    runs = [cli(*argv) for argv in cases]
    assert_clean(runs)
    assert {r.code for r in runs} == {2}
    assert all(re.fullmatch(r"medseg.*: error: .*\(see `medseg.* --help`\)\n", r.err) for r in runs)
    helps = [cli(*argv, "--help") for argv in ([], ["segment"], ["mig", "plan"])]
    assert {r.code for r in helps} == {0} and all("usage: medseg" in r.out for r in helps)


def test_phantom_with_bad_values_or_an_unwritable_out_is_one_line(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases = [["--seed", "1", "--slices", "0", "--out", str(tmp_path / "a")],
             ["--seed", "1", "--slices", "-5", "--out", str(tmp_path / "b")],
             ["--seed", "-1", "--slices", "20", "--out", str(tmp_path / "c")],
             ["--seed", "1", "--slices", "20", "--out", "/dev/null/x"],
             ["--seed", "1", "--slices", "20", "--out", str(tmp_path / "file")],
             ["--seed", "1", "--slices", "20", "--out", str(tmp_path / "file" / "below")]]
    runs = [cli("phantom", *argv) for argv in cases]
    assert_clean(runs)
    assert runs[3].code == runs[4].code == runs[5].code == 2


def _mutated_tenants(rng: random.Random) -> str:
    """The example tenants file with one value replaced by something of another kind, or a key dropped."""
    doc = yaml.safe_load(TENANTS.read_text())
    weird = [None, [], {}, "", "x", -1, 0, 7, 1e308, True, "ä" * 3, [1, 2], {"a": 1}, "3g.71gb", "H200"]
    node: Any = doc
    parents: list[tuple[Any, Any]] = []
    while isinstance(node, dict | list) and node and (not parents or rng.random() < 0.7):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        parents.append((node, key))
        node = node[key]
    container, key = parents[-1]
    if isinstance(container, dict) and rng.random() < 0.2:
        del container[key]
    else:
        container[key] = rng.choice(weird)
    return yaml.safe_dump(doc)


def test_mig_plan_and_compose_refuse_bad_files_in_one_line(cli: Any, tmp_path: Path) -> None:
    rng = random.Random(0)
    files: list[Path] = [tmp_path / "missing.yaml", tmp_path, Path("/dev/null")]
    for name, content in (("binary", bytes(range(256)) * 4), ("empty", b""), ("list", b"[1, 2]"),
                          ("scalar", b"7"), ("bad_yaml", b"gpu: [\n  - : :"), ("tabs", b"gpu:\tH200\n\ttenants: x")):
        (tmp_path / name).write_bytes(content)
        files.append(tmp_path / name)
    for k in range(40):
        (tmp_path / f"mutated{k}.yaml").write_text(_mutated_tenants(rng))
        files.append(tmp_path / f"mutated{k}.yaml")
    runs = [cli("mig", "plan", str(f)) for f in files]
    listings = [tmp_path / "missing.txt", tmp_path, tmp_path / "binary", tmp_path / "empty", tmp_path / "list"]
    lines = DEVICES.read_text().splitlines()
    for k in range(10):
        garbled = [ln if rng.random() < 0.7 else ln[: rng.randrange(len(ln) + 1)] + rng.choice(["", "MIG-x", "(", ")"])
                   for ln in lines]
        (tmp_path / f"listing{k}.txt").write_text("\n".join(rng.sample(garbled, len(garbled))))
        listings.append(tmp_path / f"listing{k}.txt")
    runs += [cli("mig", "compose", str(TENANTS), "--devices", str(d), "--out", str(tmp_path / "compose"))
             for d in listings]
    runs.append(cli("mig", "compose", str(TENANTS), "--devices", str(DEVICES), "--out", "/dev/null/x"))
    assert_clean(runs)
    assert runs[-1].code == 2


def test_serve_refuses_bad_arguments_and_files_in_one_line_before_starting(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "binary.pem").write_bytes(bytes(range(256)))
    cases = [["--grpc-port", "70000"], ["--http-port", "-1"], ["--metrics-port", "65536"],
             ["--tls-cert", str(tmp_path / "junk.pem")], ["--tls-key", str(tmp_path / "junk.pem")],
             ["--tls-cert", str(tmp_path / "none.pem"), "--tls-key", str(tmp_path / "none.pem")],
             ["--tls-cert", str(tmp_path / "junk.pem"), "--tls-key", str(tmp_path / "junk.pem")],
             ["--tls-cert", str(tmp_path / "binary.pem"), "--tls-key", str(tmp_path / "binary.pem")],
             ["--tls-cert", str(tmp_path), "--tls-key", str(tmp_path)],
             ["--model-repository", str(tmp_path / "none")], ["--model-repository", str(tmp_path)]]
    runs = [cli("serve", "--grpc-port", "0", *argv) if "--grpc-port" not in argv else cli("serve", *argv)
            for argv in cases]
    assert_clean(runs)
    assert {r.code for r in runs} == {2}


def test_import_and_models_refuse_in_one_line(cli: Any, tmp_path: Path) -> None:
    """`medseg import nnunet` on folders that are no results folder, a bad step or repository; `medseg import
    monai-bundle` on folders that are no bundle or whose configs are broken; `medseg models` on a server that is not
    there."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plans.json").write_text("{not json")
    (tmp_path / "bad" / "dataset.json").write_text("{}")
    cases = [["nnunet", str(tmp_path / "none"), "--name", "m"], ["nnunet", str(tmp_path / "file"), "--name", "m"],
             ["nnunet", str(tmp_path / "empty"), "--name", "m"], ["nnunet", str(tmp_path / "bad"), "--name", "m"],
             ["nnunet", str(tmp_path / "empty"), "--name", "m", "--step", "0"],
             ["nnunet", str(tmp_path / "empty"), "--name", "m", "--model-repository", str(tmp_path / "file")]]
    for name, meta, inference in (("b1", "{not json", "{}"), ("b2", "{}", "{not json"), ("b3", "{}", "{}"),
                                  ("b4", "{}", '{"preprocessing": "$undefined_name + 1"}')):
        (tmp_path / name / "configs").mkdir(parents=True)
        (tmp_path / name / "configs" / "metadata.json").write_text(meta)
        (tmp_path / name / "configs" / "inference.json").write_text(inference)
        cases.append(["monai-bundle", str(tmp_path / name), "--name", "m"])
    cases += [["monai-bundle", str(tmp_path / p), "--name", "m"] for p in ("none", "file", "empty")]
    runs = [cli("import", *argv) for argv in cases]
    runs.append(cli("models", "-u", UNREACHABLE, "--timeout", "2"))
    assert_clean(runs)
    assert {r.code for r in runs} == {2}


def test_demo_with_an_unwritable_out_is_one_line_at_once(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    runs = [cli("demo", "--out", out) for out in ("/dev/null/x", str(tmp_path / "file"))]
    assert_clean(runs)
    assert {r.code for r in runs} == {2}


def test_segment_refuses_inputs_and_outputs_it_cannot_use_before_any_work(cli: Any, tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    os.mkfifo(tmp_path / "pipe.nii.gz")  # reading it would block forever
    (tmp_path / "folder.nii.gz").mkdir()
    (series / "unreadable.dcm").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
    (tmp_path / "file").write_text("x")
    mr = str(realct.path(realct.MR))
    cases = [[str(tmp_path / "pipe.nii.gz")], [str(tmp_path / "folder.nii.gz")], [str(series)], ["/dev/null"],
             [str(tmp_path / "file")], [mr, "--out", str(tmp_path / "file")], [mr, "--out", "/dev/null/x"],
             [mr, "--out", str(tmp_path / "file" / "below")], [mr, "--timeout", "-1"], [mr, "--timeout", "nan"],
             [mr, "--url", "::::"], [mr, "--tls-ca", str(tmp_path / "none.pem")]]
    runs = [cli("segment", "--url", UNREACHABLE, *argv, *([] if "--out" in argv else ["--out", str(tmp_path / "o")]),
                *([] if "--timeout" in argv else ["--timeout", "2"])) for argv in cases]
    assert_clean(runs)
    assert {r.code for r in runs} == {2}
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".medseg-*"))


# root reads any file; without the capabilities that let it, permissions apply to it too
DROP_ROOT_READ = (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                   "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="as root, denying a read needs setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
def test_segment_names_a_file_or_folder_it_may_not_read(tmp_path: Path) -> None:
    tiny_series(tmp_path / "series", **FUZZ_SERIES)
    victim = sorted((tmp_path / "series").iterdir())[3]
    victim.chmod(0)
    (tmp_path / "closed").mkdir(mode=0)
    runs = []
    for name in ("series", "closed"):
        r = subprocess.run([*DROP_ROOT_READ, *MEDSEG, "segment", "--url", UNREACHABLE, str(tmp_path / name), "--out",
                            str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
        runs.append(Run(["segment", name], r.returncode, r.stdout, r.stderr))
    assert_clean(runs)
    assert runs[0].err == f"medseg segment: error: {victim.name}: cannot be read (Permission denied)\n"
    assert runs[1].err == f"medseg segment: error: {tmp_path / 'closed'}: the folder cannot be read (permission denied)\n"


def _nnunet_folder(root: Path) -> Path:
    """An nnU-Net test folder for ``medseg evaluate``: the real MR and the labelled slab of the real CT with
    their labels, a truncated image, and labels on another grid than their image."""
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(parents=True)
    labels.mkdir()
    for case, image, label in (("mr", realct.MR, "example_seg_mr.nii.gz"), ("ct", "example_ct_sm.nii.gz", realct.CT_LABELS),
                               ("grid", realct.MR, realct.CT_LABELS)):
        shutil.copy(realct.path(image), images / f"{case}_0000.nii.gz")
        shutil.copy(realct.path(label), labels / f"{case}.nii.gz")
    raw = realct.path(realct.MR).read_bytes()
    (images / "truncated_0000.nii.gz").write_bytes(raw[: len(raw) // 2])
    shutil.copy(realct.path("example_seg_mr.nii.gz"), labels / "truncated.nii.gz")
    return root


def test_evaluate_refuses_bad_arguments_and_data_in_one_line(cli: Any, tmp_path: Path) -> None:
    data = _nnunet_folder(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    out = ["--out", str(tmp_path / "report")]
    cases = [[str(data), "--label-map", "garbage", *out], [str(data), "--label-map", "liver=0", *out],
             [str(data), "--limit", "0", *out], [str(data), "--ignore-label", "0", *out], [str(tmp_path / "none"), *out],
             [str(realct.path(realct.MR)), *out], [str(tmp_path / "empty"), *out], [str(data), "--out", "/dev/null/x"],
             [str(data), "--limit", "x", *out], *([str(data), "--timeout", t, *out] for t in ("0", "-1", "nan")),
             [str(data), *out]]  # the last: no server there
    runs = [cli("evaluate", "-u", UNREACHABLE, "--timeout", "2", *argv) for argv in cases]
    assert all("expected a positive number of seconds" in r.err for r in runs[-4:-1])
    assert_clean(runs)
    assert {r.code for r in runs} == {2}
    assert not (tmp_path / "report").exists()


def test_an_internal_error_is_one_line_exit_3_with_its_traceback_in_a_private_log(
        cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medseg_client.io.studies

    quoted = "DOE" + "^JANE"  # what a library's message can quote: a header value

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError(f"bad value {quoted}")

    monkeypatch.setattr(medseg_client.io.studies, "write_phantom", broken)  # a bug where the phantom is written
    logs = tmp_path / "internal-logs"
    monkeypatch.setenv("MEDSEG_LOG_DIR", str(logs))
    run = cli("phantom", "--seed", "1", "--slices", "20", "--out", str(tmp_path / "o"))
    assert run.code == EXIT_INTERNAL and "Traceback" not in run.err
    m = re.fullmatch(r"medseg phantom: internal error \(ZeroDivisionError in broken, test_no_traceback.py:\d+\); "
                     r"details in (\S+)\n", run.err)
    assert m, run.err
    log = Path(m.group(1))
    assert log.parent == logs and re.fullmatch(r"medseg-phantom-\d{8}-\d{6}-\d+\.log", log.name)
    assert log.stat().st_mode & 0o777 == 0o600
    text = log.read_text()
    assert "Traceback" in text and "ZeroDivisionError (message left out)" in text and "in broken" in text
    assert "DOE^JANE" not in text  # a library's message may quote patient data: never logged
    again = cli("phantom", "--seed", "1", "--slices", "20", "--out", str(tmp_path / "o"))
    assert again.code == EXIT_INTERNAL and len(list(logs.iterdir())) == 2  # one file per error, never overwritten
    monkeypatch.setenv("MEDSEG_LOG_DIR", "/dev/null/logs")  # nowhere to log: still one line, saying so
    run = cli("phantom", "--seed", "1", "--slices", "20", "--out", str(tmp_path / "o"))
    assert run.code == EXIT_INTERNAL
    assert re.fullmatch(r"medseg phantom: internal error \(ZeroDivisionError in broken, test_no_traceback.py:\d+\); "
                        r"no log written \(Not a directory\)\n", run.err), run.err


def test_the_entry_point_prints_one_line_for_errors_and_logs_internal_ones(tmp_path: Path) -> None:
    env = {"MEDSEG_LOG_DIR": str(tmp_path / "logs")}
    runs = [entry_point("segment", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), env=env),
            entry_point("mig", "plan", str(tmp_path), env=env),
            entry_point("serve", "--grpc-port", "99999", env=env),
            entry_point("phantom", "--seed", "x", "--out", str(tmp_path), env=env)]
    assert_clean(runs)
    code = ("import sys, medseg_client.io.studies\n"
            "def broken(*a, **k): raise KeyError('DOE^JANE')\n"
            "medseg_client.io.studies.write_phantom = broken\n"
            "from medseg_client.cli import main\n"
            f"sys.exit(main(['phantom', '--seed', '1', '--slices', '20', '--out', {str(tmp_path / 'o')!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == EXIT_INTERNAL and "Traceback" not in r.stderr
    assert re.fullmatch(r"medseg phantom: internal error \(KeyError in broken, <string>:2\); details in \S+\n",
                        r.stderr), r.stderr
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1 and "DOE^JANE" not in logs[0].read_text()


# --- medseg segment through the real server ---

def _fuzz_runs(cli: Any, cases: list[Case], url: str) -> list[Run]:
    runs = []
    for case in cases:
        root = Path(tempfile.mkdtemp(prefix="medseg-notb-"))
        try:
            mutate(case, root / "series", **FUZZ_SERIES)
            runs.append(cli("segment", "--url", url, str(root / "series"), "--out", str(root / "out")))
            # 0 and 1 (read and judged, nothing reported) write a whole result; a refusal or an error writes none
            assert runs[-1].code in (0, 1) or not (root / "out").exists(), f"{case}: partial output"
            assert not list(root.glob(".medseg-*")), f"{case}: staging left behind"
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return runs


def _fuzz_cases(n: int, first: int = 0) -> list[Case]:
    return [Case(seed=i, mutation=MUTATIONS[i % len(MUTATIONS)]) for i in range(first, first + n)]


@pytest.mark.server
def test_segment_over_a_sample_of_damaged_series_reads_or_refuses_in_one_line(cli: Any, server: Any) -> None:
    runs = _fuzz_runs(cli, _fuzz_cases(FUZZ_SAMPLE), server.grpc_url)
    assert_clean(runs)
    codes = {r.code for r in runs}  # some damage is harmless (read and judged: 0 or 1), most is refused (2)
    assert codes <= {0, 1, 2} and 2 in codes and codes & {0, 1}


@pytest.mark.server
@pytest.mark.slow
def test_segment_over_hundreds_of_damaged_series_reads_or_refuses_in_one_line(cli: Any, server: Any) -> None:
    assert_clean(_fuzz_runs(cli, _fuzz_cases(FUZZ_SLOW, first=FUZZ_SAMPLE), server.grpc_url))


# header fields of a NIfTI-1 file: (offset, struct format): dims, datatype, bitpix, pixdim, vox_offset,
# scl_slope/inter, qform/sform codes, quaternion and offsets, srow_x/y/z
NIFTI_FIELDS = ([(40 + 2 * k, "<h") for k in range(8)] + [(70, "<h"), (72, "<h")] + [(76 + 4 * k, "<f") for k in range(8)]
                + [(108, "<f"), (112, "<f"), (116, "<f"), (252, "<h"), (254, "<h")] + [(256 + 4 * k, "<f") for k in range(18)])
NIFTI_SAMPLE, NIFTI_SLOW = 24, 600


def _damaged_nifti(raw: bytes, seed: int) -> bytes:
    """The MR's uncompressed NIfTI with its header damaged: random bytes, a cut, or one field set to an absurd value."""
    rng = random.Random(seed)
    b = bytearray(raw)
    if seed % 3 == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(348)] = rng.randrange(256)
    elif seed % 3 == 1:
        b = b[: rng.randrange(len(b))]
    else:
        offset, fmt = rng.choice(NIFTI_FIELDS)
        value = rng.choice([0, -1, 1e30, float("nan"), float("inf"), 32767]) if fmt == "<f" else rng.choice([0, -1, 7, 32767])
        b[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(b)


def test_a_nifti_whose_voxel_axes_cannot_be_told_apart_is_refused(tmp_path: Path) -> None:
    import nibabel as nib

    from medseg_client.errors import StudyError
    from medseg_client.io.studies import read_study

    affine = np.diag([-3.0, -3.0, 3.0, 1.0])
    affine[0, 1] = 1e30  # a damaged sform: the j axis points along x, where i already does
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), affine), tmp_path / "sheared.nii")
    with pytest.raises(StudyError, match=r"^sheared.nii: the affine's voxel axes do not each point along their own"):
        read_study(tmp_path / "sheared.nii")


def _nifti_runs(cli: Any, seeds: range, url: str, root: Path) -> list[Run]:
    raw = gzip.decompress(realct.path(realct.MR).read_bytes())
    runs = []
    for seed in seeds:
        (root / "x.nii").write_bytes(_damaged_nifti(raw, seed))
        runs.append(cli("segment", "--url", url, "--timeout", "60", str(root / "x.nii"), "--out", str(root / f"o{seed}")))
        shutil.rmtree(root / f"o{seed}", ignore_errors=True)
    return runs


@pytest.mark.server
def test_segment_over_damaged_nifti_headers_reads_or_refuses_in_one_line(cli: Any, server: Any, tmp_path: Path) -> None:
    runs = _nifti_runs(cli, range(NIFTI_SAMPLE), server.grpc_url, tmp_path)
    assert_clean(runs)
    codes = {r.code for r in runs}
    assert codes <= {0, 1, 2} and 2 in codes and codes & {0, 1}


@pytest.mark.server
@pytest.mark.slow
def test_segment_over_hundreds_of_damaged_nifti_headers_reads_or_refuses_in_one_line(cli: Any, server: Any,
                                                                                     tmp_path: Path) -> None:
    assert_clean(_nifti_runs(cli, range(NIFTI_SAMPLE, NIFTI_SLOW), server.grpc_url, tmp_path))


@pytest.mark.server
def test_segment_over_every_pydicom_test_file_as_a_series_or_as_the_input(cli: Any, server: Any, tmp_path: Path) -> None:
    assert len(TEST_FILES) > 100
    runs = []
    for k, f in enumerate(TEST_FILES):
        folder = tmp_path / f"s{k}"
        folder.mkdir()
        shutil.copy(f, folder / f.name)
        runs.append(cli("segment", "--url", server.grpc_url, str(folder), "--out", str(tmp_path / f"o{k}")))
        runs.append(cli("segment", "--url", server.grpc_url, str(f), "--out", str(tmp_path / f"p{k}")))
        shutil.rmtree(folder)
    assert_clean(runs)
    assert not list(tmp_path.glob(".medseg-*"))


@pytest.mark.server
@pytest.mark.parametrize("case", [realct.DICOM_SERIES, *realct.NIFTI_CASES])
def test_segment_over_the_real_ct_and_mr_succeeds_without_noise(case: str, cli: Any, server: Any, tmp_path: Path) -> None:
    run = cli("segment", "--url", server.grpc_url, str(realct.path(case)), "--out", str(tmp_path / "out"))
    assert_clean([run])
    # the MR is read and judged not a CT (nothing reported); the chest scans may or may not show enough liver
    expected = {realct.MR: {1}, realct.CHEST_CTA: {0, 1}, realct.CHEST_CT_CROPPED: {0, 1}}.get(case, {0})
    assert run.code in expected and (tmp_path / "out" / "labels.nii.gz").exists(), run.err


@pytest.mark.server
def test_the_entry_point_segments_and_refuses_like_main(server: Any, tmp_path: Path) -> None:
    mutate(Case(seed=3, mutation="truncate"), tmp_path / "damaged", **FUZZ_SERIES)
    raw = gzip.decompress(realct.path(realct.MR).read_bytes())
    for seed in (30, 84):  # headers nibabel complains about in its log (a refused one, a read one)
        (tmp_path / f"header{seed}.nii").write_bytes(_damaged_nifti(raw, seed))
    inputs = [realct.path(realct.MR), tmp_path / "damaged", TEST_FILES[0], tmp_path / "header30.nii",
              tmp_path / "header84.nii"]
    runs = [entry_point("segment", "--url", server.grpc_url, str(source), "--out", str(tmp_path / f"out{k}"))
            for k, source in enumerate(inputs)]
    assert_clean(runs)
    assert [r.code for r in runs] == [1, 2, 2, 2, 1]  # the MR (and a damaged copy) read, judged not CT


@pytest.mark.server
def test_evaluate_over_real_and_broken_cases_reports_them_without_a_traceback(cli: Any, server: Any, tmp_path: Path) -> None:
    data = _nnunet_folder(tmp_path / "data")
    run = cli("evaluate", "-u", server.grpc_url, str(data), "--out", str(tmp_path / "report"), "--label-map", "liver=5")
    assert run.code == 0, run.err
    assert "Traceback" not in run.out + run.err  # its progress and each broken case's error go to stderr
    assert "truncated" in run.err and "grid" in run.err
    assert (tmp_path / "report" / "metrics.json").exists()


STAGES = ["read_study", "save_nifti", "write_seg", "write_preview", "findings_document"]


@pytest.mark.server
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("existing", [False, True], ids=["new_out", "existing_out"])
def test_a_failure_at_any_stage_of_segment_leaves_no_partial_output_and_no_staging(
        stage: str, existing: bool, cli: Any, server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medseg_client.segment

    series = tmp_path / "series"
    tiny_series(series, **FUZZ_SERIES)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "labels.nii.gz").write_text("an earlier result")
    original = getattr(medseg_client.segment, stage)

    quoted = "DOE" + "^JOHN"  # what a library's message can quote: a header value

    def fails(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)  # the stage does its work (files half written), then fails
        raise RuntimeError(f"injected failure in {stage}, quoting {quoted}")

    monkeypatch.setattr(medseg_client.segment, stage, fails)
    monkeypatch.setenv("MEDSEG_LOG_DIR", str(tmp_path / "internal-logs"))
    run = cli("segment", "--url", server.grpc_url, str(series), "--out", str(out))
    assert run.code == EXIT_INTERNAL and len(run.err.strip().splitlines()) == 1 and "Traceback" not in run.err
    # the line says what and where, never the message; the log's frames name the stage that failed
    assert "internal error (RuntimeError in fails, test_no_traceback.py:" in run.err
    logged = re.search(r"; details in (\S+)$", run.err.strip())
    assert logged, run.err
    log = Path(logged.group(1)).read_text()
    assert f"{stage}(" in log and "DOE^JOHN" not in log and "DOE^JOHN" not in run.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["internal-logs", *(["out"] if existing else []), "series"]
    if existing:  # the earlier result untouched, nothing of this run mixed in
        assert [p.name for p in out.iterdir()] == ["labels.nii.gz"]
        assert (out / "labels.nii.gz").read_text() == "an earlier result"
    monkeypatch.setattr(medseg_client.segment, stage, original)  # without the failure it writes everything
    # exit 1: read and judged, nothing reported (the tiny series holds no anatomy), still a whole result
    assert cli("segment", "--url", server.grpc_url, str(series), "--out", str(out)).code in (0, 1)
    assert sorted(p.name for p in out.iterdir()) == ["findings.json", "labels.nii.gz", "preview.png", "seg.dcm"]
    assert not list(tmp_path.glob(".medseg-*"))


@pytest.mark.server
def test_ctrl_c_while_writing_outputs_exits_130_and_leaves_nothing(cli: Any, server: Any,
                                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import medseg_client.segment

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(medseg_client.segment, "write_preview", interrupted)
    run = cli("segment", "--url", server.grpc_url, str(realct.path(realct.MR)), "--out", str(tmp_path / "out"))
    assert run.code == 130 and run.err == "medseg segment: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_the_fuzz_series_here_are_big_enough_to_reach_the_model(tmp_path: Path) -> None:
    from medseg_client.io.studies import read_study
    from medseg_client.validate import check_study

    tiny_series(tmp_path / "s", **FUZZ_SERIES)
    study = read_study(tmp_path / "s")
    assert check_study(study.ct.shape, study.ct.dtype, study.spacing) == study.ct.shape  # not refused as too small
