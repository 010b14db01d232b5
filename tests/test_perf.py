"""perf/: perf_analyzer's output read right, the report's arithmetic and its README table, the MONAI
baseline agreeing with this project's pipeline, and the real perf_analyzer against the real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medseg.accuracy.metrics import dice
from medseg.paths import REPO_ROOT
from medseg.synth.phantom import generate
from medseg_client.spec import SPEC
from perf import pa, report

# a CSV written by perf_analyzer 2.48.0 against this ensemble (60-slice study), microseconds
RECORDED_CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,0.473274,4477,35654,3,34451,1792242,202439,7,2055590,2296723,2316161,2316161
2,0.562292,6308,939035,3,44328,2247832,184811,8,3483528,3753514,3782756,3782756
"""


def test_perf_analyzer_csv_is_read_in_milliseconds(tmp_path: Path) -> None:
    path = tmp_path / "pa.csv"
    path.write_text(RECORDED_CSV)
    rows = pa.parse_csv(path)
    assert [r.concurrency for r in rows] == [1, 2]
    assert rows[0].throughput == pytest.approx(0.473274)
    assert rows[0].p50_ms == pytest.approx(2055.59) and rows[1].p99_ms == pytest.approx(3782.756)
    assert rows[0].client_send_ms == pytest.approx(4.477)


def test_statistics_breakdown_is_the_mean_per_request_between_snapshots() -> None:
    before = {"m": {"count": 2.0, "queue": 1e6, "compute_input": 2e6, "compute_infer": 10e6, "compute_output": 4e6}}
    after = {"m": {"count": 6.0, "queue": 5e6, "compute_input": 6e6, "compute_infer": 50e6, "compute_output": 8e6},
             "idle": {"count": 0.0, "queue": 0.0, "compute_input": 0.0, "compute_infer": 0.0, "compute_output": 0.0}}
    got = pa.breakdown(before, after)
    assert got == {"m": {"requests": 4.0, "queue": 1.0, "compute_input": 1.0, "compute_infer": 10.0, "compute_output": 1.0}}


def test_inputs_are_written_raw_with_their_shapes(tmp_path: Path) -> None:
    ct = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    shapes = pa.write_inputs(tmp_path, ct, (2.0, 0.5, 0.5))
    assert shapes == ["--shape=CT:2,3,4", "--shape=SPACING:3"]
    assert np.array_equal(np.fromfile(tmp_path / "CT", np.int16).reshape(2, 3, 4), ct)
    assert np.fromfile(tmp_path / "SPACING", np.float32).tolist() == [2.0, 0.5, 0.5]


def _doc(served_s: float, monai_s: float) -> dict[str, Any]:
    names = [lab.name for lab in SPEC.labels[1:]]
    steps = {m: {"requests": 3.0, "queue": 0.1, "compute_input": 10.0, "compute_infer": 500.0, "compute_output": 20.0}
             for m in (SPEC.preprocess.name, SPEC.segmenter.name, SPEC.postprocess.name)}
    steps[SPEC.ensemble.name] = {"requests": 3.0, "queue": 0.0, "compute_input": 50.0, "compute_infer": 1800.0,
                                 "compute_output": 300.0}
    pa_rows = [{"concurrency": 1, "throughput": 0.3, "p50_ms": 3000.0, "p90_ms": 3100.0, "p99_ms": 3200.0,
                "client_send_ms": 1.0, "client_recv_ms": 1.0}]
    row = {"slices": 300, "shape_zyx": [300, 512, 512], "spacing_zyx_mm": [1.25, 0.78, 0.78], "voxels": 300 * 512 * 512,
           "monai_s": [monai_s], "reference_s": [2.0, 2.1, 2.2], "served_s": [served_s] * 3,
           "served_shm_s": [served_s - 0.5] * 3, "steps_ms": steps,
           "dice_served_vs_reference": dict.fromkeys(names, 1.0),
           "dice_served_shm_vs_reference": dict.fromkeys(names, 1.0), "dice_monai_vs_reference": dict.fromkeys(names, 0.95),
           "dice_vs_truth": {"served": dict.fromkeys(names, 0.9), "monai": dict.fromkeys(names, 0.9)},
           "speedup_vs_monai": round(monai_s / served_s, 2), "perf_analyzer": {"grpc": pa_rows, "system_shm": pa_rows}}
    return {"machine": {"label": "2core-test", "platform": "linux", "cores": 2, "processor": "test"}, "flavor": "cpu",
            "full": False, "repeat": 3, "seed": 5101, "slice_mm": 1.25, "pixel_mm": 0.78, "rows": [row], "instances": [],
            "wall_s": 1.0, "date": "2026-11-24"}


@pytest.mark.parametrize(("served_s", "monai_s", "verdicts"), [
    (3.0, 30.0, ["met", "met", "met"]), (4.2, 30.0, ["NOT met", "met", "met"]), (5.0, 15.0, ["NOT met", "NOT met", "NOT met"]),
])
def test_report_states_each_target_as_measured(tmp_path: Path, served_s: float, monai_s: float, verdicts: list[str]) -> None:
    written = report.write(_doc(served_s, monai_s), tmp_path)
    assert {p.name for p in written} >= {"bench.json", "bench.csv", "bench.md", "breakdown.png", "latency_vs_size.png"}
    md = (tmp_path / "bench.md").read_text()
    target_rows = [line for line in md.splitlines() if line.startswith("| end to end") or line.startswith("| >= ")]
    assert [row.rsplit("|", 2)[1].strip() for row in target_rows] == verdicts
    assert f"x{monai_s / served_s:.1f}" in report.headline_block(md)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["served_s"] == [served_s] * 3
    assert (tmp_path / "breakdown.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cuda_reports_targets_are_the_gpu_ones(tmp_path: Path) -> None:
    doc = _doc(0.12, 1.5)
    doc["flavor"] = "cuda"
    pa = doc["rows"][0]["perf_analyzer"]
    pa["cuda_shm"] = [{**pa["grpc"][0], "p50_ms": 140.0, "throughput": 7.0},
                      {**pa["grpc"][0], "concurrency": 4, "p50_ms": 300.0, "throughput": 12.5}]
    doc["rows"][0]["dice_served_vs_reference"]["liver_tumor"] = 0.985  # the GPU's labels drift from the cpu flavor's
    report.write(doc, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    assert "| end to end" not in md  # the cpu flavor's targets are not the GPU's
    rows = [line for line in md.splitlines() if line.startswith(("| p50", "| >= ", "| labels as"))]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["met", "NOT met", "met", "NOT met"]
    assert "12.5 (4 in flight)" in md and "140 ms" in md and "x12.5" in md and "0.9850 (lowest)" in md


def _command_row(study: str, wall_s: float, monai_s: float) -> dict[str, Any]:
    run = {"wall_s": wall_s, "start_s": 0.4, "read_study_s": 0.6, "request_s": wall_s - 1.5, "preprocess_s": 0.4,
           "segmenter_s": 1.9, "postprocess_s": 0.8, "write_outputs_s": 0.5, "total_s": wall_s - 0.4}
    return {"study": study, "file": "ct.nii.gz", "file_mb": 77.1, "shape_xyz": [512, 512, 300],
            "spacing_xyz_mm": [0.71, 0.59, 1.12], "medseg": [run] * 3,
            "monai": [{"wall_s": monai_s + 9, "file_to_file_s": monai_s, "load_s": 4.0, "pipeline_s": monai_s - 7,
                       "save_s": 3.0, "setup_s": 0.1}],
            "speedup_vs_monai": round(monai_s / wall_s, 2)}


def test_the_whole_command_is_reported_with_its_parts_targets_and_bounds(tmp_path: Path) -> None:
    doc = _doc(3.0, 30.0)
    doc["command"] = [_command_row("phantom 5101", 3.8, 40.0), _command_row("real CT", 6.2, 57.5)]
    report.write(doc, tmp_path)
    md = (tmp_path / "bench.md").read_text()
    headline = report.headline_block(md)
    assert "| real CT, 512 x 512 x 300 (77 MB) | 6.20 s | 0.40 / 0.60 / 4.70 / 0.50 s | 0.40 / 1.90 / 0.80 s | 57.50 s" \
        " | **x9.3** |" in headline
    rows = [line for line in md.splitlines() if line.startswith(("| whole command", "| >= 8x", "| request <="))]
    assert [r.rsplit("|", 2)[1].strip() for r in rows] == ["met", "met", "NOT met", "NOT met", "met", "NOT met"]
    # what bounds it: the request less the server's steps is the transfer (4.70 - 3.10)
    assert "What bounds it (real CT): of 6.20 s" in md and "1.60 s." in md
    assert "real CT" in report.command_line(doc["command"][1])


def test_the_real_ct_is_resampled_over_its_own_extent(tmp_path: Path) -> None:
    import nibabel as nib

    from perf.command import real_ct_file

    affine = np.array([[-3.0, 0, 0, 100], [0, 3.0, 0, -50], [0, 0, 2.5, 20], [0, 0, 0, 1]])
    data = np.full((10, 8, 6), 40, np.int16)
    data[:, :, 3:] = -900
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "src.nii.gz"))
    out = real_ct_file(tmp_path / "src.nii.gz", tmp_path / "big.nii.gz", (20, 32, 12))
    img = nib.load(str(out))
    got = np.asarray(img.dataobj)
    assert got.shape == (20, 32, 12) and got.dtype == np.int16 and img.header["sform_code"] == 1
    # the outer edges of both grids lie at the same place: the extent is the source's
    for corner_old, corner_new in (([-0.5] * 3, [-0.5] * 3), ([9.5, 7.5, 5.5], [19.5, 31.5, 11.5])):
        assert np.allclose(affine @ [*corner_old, 1], img.affine @ [*corner_new, 1])
    assert (got[:, :, :5] == 40).all() and (got[:, :, 7:] == -900).all()  # the slab boundary stays in the middle


def test_the_monai_pipeline_runs_on_a_file_as_a_script_would(tmp_path: Path) -> None:
    import nibabel as nib

    from medseg_client.io.studies import read_study, write_phantom
    from perf.monai_baseline import run_file

    ph = generate(5101, num_slices=40, slice_thickness=5.0)
    source = write_phantom(ph, tmp_path, "nifti")[0]
    timings = run_file(source, tmp_path / "out")
    assert set(timings) == {"setup_s", "load_s", "pipeline_s", "save_s", "file_to_file_s"}
    (labels_file,) = (tmp_path / "out").glob("*.nii.gz")
    labels = read_study(labels_file).ct  # on the canonical grid, through its own affine
    assert labels.shape == ph.ct.shape and int(nib.load(str(labels_file)).get_data_dtype().itemsize) == 1
    assert dice(labels > 0, ph.labels > 0) >= 0.8


def test_readme_update_replaces_only_the_headline_block(tmp_path: Path) -> None:
    report.write(_doc(3.0, 30.0), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{report.BEGIN}\nold table\n{report.END}\n\noutro\n")
    report.update_readme(readme, tmp_path / "bench.md")
    text = readme.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\noutro\n") and "old table" not in text
    assert report.headline_block(text) == report.headline_block((tmp_path / "bench.md").read_text())


def test_the_readme_table_is_a_committed_reports() -> None:
    readme = report.headline_block((REPO_ROOT / "README.md").read_text())
    reports = [report.headline_block(p.read_text()) for p in (REPO_ROOT / "perf" / "results").glob("*/bench.md")]
    assert readme in reports, "README's bench table differs from every perf/results/*/bench.md: run `make bench`"


def test_the_monai_baseline_agrees_with_this_projects_pipeline() -> None:
    from medseg.model.pipeline import ReferencePipeline
    from perf.monai_baseline import MonaiBaseline

    ph = generate(5101, num_slices=40, slice_thickness=5.0)
    labels = MonaiBaseline()(ph.ct, ph.spacing)
    assert labels.shape == ph.ct.shape and labels.dtype == np.uint8
    ref, _ = ReferencePipeline()(ph.ct, ph.spacing)
    assert dice(labels > 0, ref > 0) >= 0.9  # the same weights around a different pipeline


@pytest.mark.server
def test_the_real_perf_analyzer_measures_the_served_ensemble(server: Any, tmp_path: Path) -> None:
    try:
        pa.binary()
    except Exception as e:
        pytest.fail(f"{e}")
    ph = generate(5101, num_slices=24, slice_thickness=10.0)
    shapes = pa.write_inputs(tmp_path / "in", ph.ct, ph.spacing)
    for transport in ("none", "system"):
        rows = pa.run(server.grpc_url, tmp_path / "in", shapes, tmp_path / f"{transport}.csv", concurrency=(1, 1),
                      shared_memory=transport, output_bytes=int(ph.ct.size) + (1 << 20), requests_per_window=2)
        assert len(rows) == 1 and rows[0].throughput > 0 and rows[0].p50_ms > 0


def test_readmes_imported_model_table_is_a_measured_one() -> None:
    from perf.imported import BEGIN, END

    readme = report.headline_block((REPO_ROOT / "README.md").read_text(), BEGIN, END)
    reports = [report.headline_block(p.read_text(), BEGIN, END) for p in (REPO_ROOT / "perf" / "results").glob("*/imported.md")]
    assert readme in reports, "README's imported-model table differs from every perf/results/*/imported.md: run `make bench`"


def test_the_segmenter_variants_are_timed_and_checked_against_eager(tmp_path: Path) -> None:
    """The GPU check's knobs (channels-last here; torch.compile on the GPU) run on torch's CPU device through the
    same harness, give eager's labels, and an unknown knob is a row that says why, not a crash."""
    from perf import segmenter_variants as sv

    doc = sv.measure("cpu", slices=12, repeat=1, budget_s=600.0,
                     variants=(("contiguous", "no"), ("channels_last", "no"), ("sideways", "no")))
    fast, last, bad = doc["rows"]
    assert fast["ms"] > 0 and fast["label_agreement"] == 1.0 and fast["max_probability_diff"] == 0.0
    assert last["label_agreement"] >= 0.9999 and last["max_probability_diff"] <= 1e-3
    assert "memory_format must be one of" in bad["failed"]
    md = sv.markdown(doc)
    assert "| channels_last | no |" in md and "x1.00" in md
    assert sv.parse_variants("channels_last:default,contiguous:no") == (("channels_last", "default"), ("contiguous", "no"))
