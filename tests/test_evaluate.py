"""``medseg evaluate``: the measures on small hand-made arrays, the data readers, and the command on the real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from medseg.accuracy.evaluate import (
    DEFAULT_LABEL_MAP,
    WORST,
    DataError,
    LabelMap,
    Truth,
    _WorstPictures,
    check_ignore_label,
    check_label_grid,
    find_cases,
    measure_case,
    parse_label_map,
    passed_checks,
    read_case,
    segment_role,
    summarize,
    true_tumors,
    truth_from_values,
    worst_cases,
)
from medseg.accuracy.metrics import dice, froc, froc_point, match_tumors
from tests.helpers import UNSEEN_SEEDS

SPACING = (2.0, 1.0, 1.0)  # (z, y, x) mm of the synthetic volumes
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # (x, y, z) index -> LPS mm for SPACING, origin 0


def ball(shape: tuple[int, int, int], centre_zyx: tuple[float, float, float], radius_mm: float,
         spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre_zyx[0]) * spacing[0]) ** 2 + ((yy - centre_zyx[1]) * spacing[1]) ** 2 + (
        (xx - centre_zyx[2]) * spacing[2]) ** 2 <= radius_mm**2


def reported(tumor_id: int, centroid_zyx: list[float], confidence: float = 0.9) -> dict[str, Any]:
    return {"id": tumor_id, "volume_ml": 0.5, "longest_axial_diameter_mm": 10.0, "centroid_voxel_zyx": centroid_zyx,
            "confidence": confidence}


# ------------------------------------------------------------------------------------------------- measures


def test_dice_leaves_out_ignored_voxels() -> None:
    truth = np.zeros((4, 4, 4), bool)
    truth[:2] = True
    pred = truth.copy()
    pred[3] = True  # wrong, but only where the annotation says "ignore"
    ignore = np.zeros_like(truth)
    ignore[3] = True
    assert dice(pred, truth) == pytest.approx(2 * 32 / (48 + 32))
    assert dice(pred, truth, ignore) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0  # both empty


def test_label_maps_parse_and_refuse_what_cannot_be_meant() -> None:
    assert parse_label_map(["liver=1,2", "tumor=2"]) == DEFAULT_LABEL_MAP
    only_liver = parse_label_map(["liver=5"])  # TotalSegmentator's liver: tumors not annotated
    assert only_liver.tumor is None and only_liver.organ == {5}
    assert parse_label_map(["liver=1", "tumor=2"]).organ == {1, 2}  # the organ includes its tumors
    for bad, says in ((["kidney=3"], "expected liver="), (["liver=a"], "integers"), (["liver=0"], "background"),
                      (["tumor=2"], "liver=V"), (["liver=1", "liver=2"], "twice"), (["liver"], "expected liver=")):
        with pytest.raises(DataError, match=says):
            parse_label_map(bad)
    with pytest.raises(DataError, match="also a liver or tumor value"):
        check_ignore_label(DEFAULT_LABEL_MAP, 2)
    check_ignore_label(DEFAULT_LABEL_MAP, 255)


def test_truth_masks_follow_the_label_map() -> None:
    values = np.array([0, 1, 2, 5, 255])
    t = truth_from_values(values, DEFAULT_LABEL_MAP, 255)
    assert t.organ.tolist() == [False, True, True, False, False]
    assert t.tumor is not None and t.tumor.tolist() == [False, False, True, False, False]
    assert t.ignore is not None and t.ignore.tolist() == [False, False, False, False, True]
    total = truth_from_values(values, LabelMap(frozenset({5}), None))
    assert total.organ.tolist() == [False, False, False, True, False] and total.tumor is None and total.ignore is None


def test_true_tumors_are_26_connected_components_sized_by_longest_axial_diameter() -> None:
    shape = (20, 64, 64)
    tumor = ball(shape, (10, 15, 15), 6.0) | ball(shape, (10, 45, 45), 3.5)
    tumor[2, 2, 2] = tumor[3, 3, 3] = True  # touching by a corner only: one tumor under 26-connectivity
    found = true_tumors(tumor, SPACING, AFFINE)
    assert len(found) == 3
    big, mid, tiny = found  # largest first
    assert big["size"] == "ge_10mm" and 12.0 <= big["diameter_mm"] <= 14.0
    assert mid["size"] == "5_to_10mm" and 7.0 <= mid["diameter_mm"] < 10.0
    assert tiny["size"] == "lt_5mm" and tiny["volume_ml"] == pytest.approx(2 * 2.0 / 1000)
    assert big["centroid_voxel_zyx"] == pytest.approx([10, 15, 15])
    assert big["center_mm"] == pytest.approx([15.0, 15.0, 20.0])  # LPS: x, y, z * 2 mm
    assert big["equivalent_diameter_mm"] == pytest.approx(12.0, abs=1.0)


def synthetic_case() -> tuple[np.ndarray, Truth]:
    """A liver block with a 12 mm and a 7 mm true tumor, an ignored slab; served: liver, the big tumor only."""
    shape = (20, 64, 64)
    organ = np.zeros(shape, bool)
    organ[4:16, 8:56, 8:56] = True
    tumor = ball(shape, (10, 20, 20), 6.0) | ball(shape, (10, 40, 40), 3.5)
    ignore = np.zeros(shape, bool)
    ignore[:, :, 60:] = True
    labels = organ.astype(np.uint8)
    labels[ball(shape, (10, 20, 20), 6.0)] = 2
    return labels, Truth(organ | tumor, tumor, ignore)


def test_a_case_counts_found_missed_false_and_ignored_tumors_by_size() -> None:
    labels, truth = synthetic_case()
    findings = {"status": {"code": "ok", "reported": True, "reason": "liver in view"},
                "liver": {"found": True, "volume_ml": 28.0}, "tumor_burden_ml": 0.9,
                "tumors": [reported(1, [10.0, 20.5, 20.0]),  # on the big tumor
                           reported(2, [10.0, 10.0, 50.0]),  # nowhere near a true tumor: false
                           reported(3, [10.0, 30.0, 62.0])]}  # in the ignored slab: neither
    r = measure_case(labels, findings, truth, SPACING, AFFINE)
    assert r["status"]["code"] == "ok"
    assert r["liver"]["annotated"] and r["liver"]["dice"] == 1.0 and not r["liver"]["true_negative"]
    t = r["tumors"]
    assert [x["verdict"] for x in t["reported"]] == ["true", "false", "ignored"]
    assert (t["false"], t["ignored"], t["unverified"]) == (1, 1, 0)
    assert t["found"] == {"ge_10mm": {"found": 1, "total": 1}, "5_to_10mm": {"found": 0, "total": 1},
                          "lt_5mm": {"found": 0, "total": 0}}
    assert [x["matched_id"] for x in t["truth"]] == [1, None]
    big = int(ball(labels.shape, (10, 20, 20), 6.0).sum())
    assert t["dice"] == pytest.approx(round(2 * big / (big + int(truth.tumor.sum())), 4))  # type: ignore[union-attr]
    assert t["voxels"]["both"] == big


def test_without_a_tumor_annotation_every_reported_tumor_is_unverified() -> None:
    labels, truth = synthetic_case()
    findings = {"status": {"code": "ok"}, "liver": {"volume_ml": 28.0}, "tumors": [reported(1, [10, 10, 50])],
                "tumor_candidates": [{"confidence": 0.9, "reported": True, "reason": None, "centroid_voxel_zyx": [10, 10, 50]}]}
    r = measure_case(labels, findings, Truth(truth.organ, None), SPACING, AFFINE)
    t = r["tumors"]
    assert not t["annotated"] and t["dice"] is None and t["froc"] is None and t["truth"] is None
    assert t["unverified"] == 1 and t["false"] == 0 and t["reported"][0]["verdict"] == "unverified"


def test_no_liver_annotated_and_nothing_reported_is_a_true_negative() -> None:
    empty = np.zeros((8, 16, 16), bool)
    findings = {"status": {"code": "region_not_supported", "reported": False}, "liver": {"volume_ml": 0.0}, "tumors": []}
    r = measure_case(empty.astype(np.uint8), findings, Truth(empty, empty), SPACING, AFFINE)
    assert r["liver"] == {"annotated": False, "dice": 1.0, "true_negative": True, "false_liver": False,
                          "truth_ml": 0.0, "reported_ml": 0.0}
    s = summarize([{"case": "a", **r, "timings_s": {"total_s": 1.0}}, {"case": "b", "error": "x", "stage": "read"}])
    assert s["liver_dice"]["n"] == 0 and s["liver_true_negatives"] == 1 and s["errors"] == 1
    assert s["statuses"] == {"region_not_supported": 1}


def test_froc_sweeps_the_candidates_that_passed_the_checks() -> None:
    assert passed_checks({"reported": True, "rejected_by": None, "reason": None})
    assert passed_checks({"reported": False, "rejected_by": "confidence",
                          "reason": "confidence 0.31 below the operating threshold 0.50"})
    assert not passed_checks({"reported": False, "rejected_by": "shape",
                              "reason": "a band or tube (40 mm long, 4 mm thick), not a mass"})
    assert not passed_checks({"reported": False, "rejected_by": "contrast", "reason": "no visible contrast"})
    cases = [  # scan 1: a 12 mm and a 6 mm tumor; scan 2: none
        {"truth_mm": [12.0, 6.0], "candidates": [
            {"confidence": 0.9, "reported": True, "matches": [0]},
            {"confidence": 0.4, "reported": False, "matches": [1]},
            {"confidence": 0.3, "reported": False, "matches": []}]},
        {"truth_mm": [], "candidates": [
            {"confidence": 0.6, "reported": True, "matches": []},
            {"confidence": 0.2, "reported": False, "matches": [], "false": False}]},  # in an ignored region
    ]
    curve = froc(cases)
    assert [p["threshold"] for p in curve] == pytest.approx([0.91, 0.9, 0.6, 0.4, 0.3, 0.2])
    sens = [(p["sensitivity"]["ge_10mm"], p["sensitivity"]["all"], p["false_per_scan"]) for p in curve]
    assert sens == [(0.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.5, 0.5), (1.0, 1.0, 0.5), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)]
    served = froc_point(cases, lambda c: c["reported"])
    assert served["sensitivity"] == {"ge_10mm": 1.0, "all": 0.5} and served["false_per_scan"] == 0.5
    assert froc_point([{"truth_mm": [], "candidates": []}], lambda c: True)["sensitivity"]["ge_10mm"] is None


def test_candidates_are_judged_by_the_same_rule_as_reported_tumors() -> None:
    labels, truth = synthetic_case()
    findings = {"status": {"code": "ok"}, "liver": {"volume_ml": 28.0}, "tumors": [reported(1, [10.0, 20.0, 20.0])],
                "tumor_candidates": [
                    {"confidence": 0.8, "reported": True, "reason": None, "centroid_voxel_zyx": [10.0, 20.0, 20.0]},
                    {"confidence": 0.3, "reported": False, "rejected_by": "confidence",
                     "reason": "confidence 0.30 below the operating threshold 0.50",
                     "centroid_voxel_zyx": [10.0, 41.0, 40.0]},
                    {"confidence": 0.7, "reported": False, "rejected_by": "shape",
                     "reason": "a band or tube (40 mm long, 4 mm thick), not a mass",
                     "centroid_voxel_zyx": [10.0, 10.0, 50.0]}]}
    r = measure_case(labels, findings, truth, SPACING, AFFINE)
    assert r["candidates"] == {"all": 3, "passed_checks": 2}
    assert r["tumors"]["froc"] == {"truth_mm": [t["diameter_mm"] for t in r["tumors"]["truth"]], "candidates": [
        {"confidence": 0.8, "reported": True, "matches": [0], "false": False},
        {"confidence": 0.3, "reported": False, "matches": [1], "false": False}]}


def test_the_worst_cases_kept_while_running_are_the_worst_of_the_run() -> None:
    records = [{"case": f"c{i}", "liver": {"annotated": True, "dice": d}, "tumors": {"false": f}}
               for i, (d, f) in enumerate([(0.9, 0), (0.5, 3), (0.95, 1), (0.7, 3), (0.2, 0)])]
    picked = worst_cases(records, n=2)
    assert picked == {"lowest_liver_dice": ["c4", "c1"], "most_false_tumors": ["c1", "c3"]}
    kept = _WorstPictures(2)
    for r in records:
        if kept.wants(r):
            kept.offer(r, r["case"].encode())
    assert set(kept.pictures()) == {c for names in picked.values() for c in names}
    assert set(WORST) == set(picked)


def test_a_run_without_tumor_annotations_reports_unverified_tumors_and_no_froc(tmp_path: Path) -> None:
    from datetime import datetime, timezone

    from medseg.accuracy.evaluate import build_document, write_outputs

    labels, truth = synthetic_case()
    findings = {"status": {"code": "ok", "reported": True}, "liver": {"volume_ml": 28.0}, "tumor_burden_ml": 0.9,
                "tumors": [reported(1, [10.0, 20.0, 20.0]), reported(2, [10.0, 10.0, 50.0])],
                "model": {"ensemble": "ct_liver", "version": 1, "weights_sha256": "ab" * 32},
                "tumor_operating_point": {"confidence_threshold": 0.5}}
    record = {"case": "one|two", **measure_case(labels, findings, Truth(truth.organ, None), SPACING, AFFINE),
              "timings_s": {"total_s": 2.0}, "_model": findings["model"], "_threshold": 0.5}
    records = [record, {"case": "broken", "error": "broken: no annotation (labels file missing)", "stage": "read"}]
    doc = build_document(records, started=datetime.now(timezone.utc), url="h:1", model_name="ct_liver", pictures={"one|two"},
                         data={"folder": "Task", "layout": "nnunet", "cases": 2, "limit": None,
                               "label_map": {"liver": [5], "tumor": None}, "ignore_label": None})
    s = doc["summary"]
    assert (s["evaluated"], s["errors"], s["unverified_tumors"], s["false_tumors"], s["tumor_annotated_cases"]) == (1, 1, 2, 0, 0)
    assert s["false_tumors_per_scan"] is None and s["tumors"]["ge_10mm"]["sensitivity"] is None
    assert doc["froc"]["points"] == [] and doc["froc"]["operating_point"] is None
    assert doc["worst"] == {"lowest_liver_dice": [{"case": "one|two", "picture": "worst/one_two.png"}], "most_false_tumors": []}
    assert doc["server"]["model"]["version"] == 1 and "_model" not in doc["cases"][0]
    out = tmp_path / "report"
    (out / "worst").mkdir(parents=True)
    (out / "worst" / "old.png").write_bytes(b"an earlier run's")
    write_outputs(doc, {"one|two": b"png"}, out)
    assert sorted(p.name for p in out.iterdir()) == ["dice.png", "froc.png", "metrics.json", "report.md", "worst"]
    assert [p.name for p in (out / "worst").iterdir()] == ["one_two.png"]  # worst/ is this run's only
    report = (out / "report.md").read_text()
    assert "No case has tumors annotated: no FROC curve." in report and "| one\\|two | ok |" in report
    assert "label map liver=5" in report and "| broken | error (read): broken: no annotation" in report
    assert json.loads((out / "metrics.json").read_text())["summary"] == s
    assert not list(tmp_path.glob(".medseg-*"))


# ------------------------------------------------------------------------------------------------- reading


def _nifti_pair(folder: Path, case: str, ct_zyx: np.ndarray, labels_zyx: np.ndarray, codes: str) -> None:
    """An image and its labels, both stored in the voxel order ``codes`` (e.g. "ASR") instead of the canonical."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    affine_ras = np.array([[-1.0, 0, 0, 3.0], [0, -1.0, 0, -7.0], [0, 0, 2.0, 11.0], [0, 0, 0, 1]])  # canonical LPS
    (folder / "imagesTs").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTs").mkdir(parents=True, exist_ok=True)
    for volume, path in ((ct_zyx, folder / "imagesTs" / f"{case}_0000.nii.gz"),
                         (labels_zyx, folder / "labelsTs" / f"{case}.nii.gz")):
        img = nib.Nifti1Image(volume.transpose(2, 1, 0), affine_ras)
        ornt = ornt_transform(io_orientation(affine_ras), axcodes2ornt(tuple(codes)))
        nib.save(img.as_reoriented(ornt), str(path))


def test_nifti_labels_are_reoriented_exactly_like_the_ct(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ct = rng.integers(-200, 200, (10, 14, 12)).astype(np.int16)
    labels = rng.integers(0, 3, ct.shape).astype(np.uint8)
    labels[0, 0, :3] = 255
    _nifti_pair(tmp_path, "flipped", ct, labels, "ASR")
    layout, cases = find_cases(tmp_path)
    assert layout == "nnunet" and [c.name for c in cases] == ["flipped"]
    study, truth, source = read_case(cases[0], None, 255)
    assert source["format"] == "nifti"
    # read_study puts the CT back on the canonical grid it was made on; the labels must land on it voxel for voxel
    assert np.array_equal(study.ct, ct)
    canon = np.zeros(study.ct.shape, np.uint8)
    assert truth.tumor is not None and truth.ignore is not None
    canon[truth.organ] = 1
    canon[truth.tumor] = 2
    canon[truth.ignore] = 255
    assert np.array_equal(canon, labels)


def test_a_label_grid_that_is_not_the_images_is_refused_naming_the_case(tmp_path: Path) -> None:
    import nibabel as nib

    ct = np.zeros((6, 8, 8), np.int16)
    _nifti_pair(tmp_path, "good", ct, np.zeros(ct.shape, np.uint8), "LPS")
    _nifti_pair(tmp_path, "shifted", ct, np.zeros(ct.shape, np.uint8), "LPS")
    path = tmp_path / "labelsTs" / "shifted.nii.gz"
    img: Any = nib.load(str(path))
    moved = img.affine.copy()
    moved[0, 3] += 0.5
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), moved), str(path))
    _nifti_pair(tmp_path, "short", ct, np.zeros(ct.shape, np.uint8), "LPS")
    path = tmp_path / "labelsTs" / "short.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, :5], img.affine), str(path))
    (tmp_path / "imagesTs" / "nolabel_0000.nii.gz").write_bytes((tmp_path / "imagesTs" / "good_0000.nii.gz").read_bytes())
    cases = {c.name: c for c in find_cases(tmp_path)[1]}
    read_case(cases["good"], None, None)
    with pytest.raises(DataError, match=r"^shifted: the labels' affine differs from the image's by up to 0\.5 mm"):
        read_case(cases["shifted"], None, None)
    with pytest.raises(DataError, match=r"^short: labels of shape \(8, 8, 5\) do not match the image's \(8, 8, 6\)"):
        read_case(cases["short"], None, None)
    with pytest.raises(DataError, match=r"^nolabel: no annotation"):
        read_case(cases["nolabel"], None, None)
    check_label_grid("x", (2, 2, 2), np.eye(4), (2, 2, 2), np.eye(4) + 0.001)  # within 0.01 mm: the same grid


def test_data_that_is_no_evaluation_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        find_cases(tmp_path / "nope")
    (tmp_path / "imagesTs").mkdir()
    with pytest.raises(DataError, match="no labelsTs/"):
        find_cases(tmp_path)
    (tmp_path / "labelsTs").mkdir()
    with pytest.raises(DataError, match=r"no <case>_0000\.nii\.gz"):
        find_cases(tmp_path)


def test_seg_segments_map_to_liver_and_tumor_by_their_description() -> None:
    assert segment_role("Liver", "10200004", "Liver") == "liver"
    assert segment_role("Liver tumor", "108369006", "Neoplasm") == "tumor"
    assert segment_role("lesion 1", "", "") == "tumor"
    assert segment_role("Hepatic vessels", "59820001", "Blood vessel") is None
    assert segment_role("Spleen", "78961009", "Spleen") is None


def test_a_dicom_series_with_its_seg_reads_onto_the_studys_grid(tmp_path: Path) -> None:
    from medseg.synth.phantom import Phantom
    from medseg_client.io.seg import write_seg
    from medseg_client.io.studies import read_study, write_dicom_series

    rng = np.random.default_rng(1)
    ct = rng.integers(-100, 200, (6, 24, 20)).astype(np.int16)
    labels = np.zeros(ct.shape, np.uint8)
    labels[1:5, 4:18, 3:15] = 1
    labels[2:4, 8:12, 6:9] = 2
    ph = Phantom(seed=77, ct=ct, labels=labels, spacing=(3.0, 0.8, 0.8), origin_mm=(-8.0, -9.0, 100.0))
    case = tmp_path / "case7"
    write_dicom_series(ph, case / "ct")
    study = read_study(case / "ct")
    assert np.array_equal(study.ct, ct)
    write_seg(case / "truth.dcm", study.dicom_files, study.to_native(labels), {})
    layout, cases = find_cases(tmp_path)
    assert layout == "dicom" and [(c.name, c.labels) for c in cases] == [("case7", case / "truth.dcm")]
    study, truth, source = read_case(cases[0], None, None)
    assert source["segments"] == {"liver": [1], "tumor": [2]}
    assert np.array_equal(truth.organ, labels > 0) and truth.tumor is not None and np.array_equal(truth.tumor, labels == 2)
    # by segment numbers: liver only, tumors then not annotated
    _, truth, source = read_case(cases[0], parse_label_map(["liver=1,2"]), None)
    assert truth.tumor is None and np.array_equal(truth.organ, labels > 0)
    with pytest.raises(DataError, match=r"^case7: the SEG has no segment \[5\]"):
        read_case(cases[0], parse_label_map(["liver=5"]), None)


# ------------------------------------------------------------------------------------------- on the server


@pytest.fixture(scope="module")
def phantoms() -> dict[str, Any]:
    from medseg.synth.phantom import generate

    a, b, head = UNSEEN_SEEDS
    return {"a": generate(a, num_slices=40, slice_thickness=5.0), "b": generate(b, num_slices=40, slice_thickness=5.0),
            "head": generate(head, region="head", num_slices=40, slice_thickness=5.0)}


def _components(mask: np.ndarray) -> int:
    return int(ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[1])


@pytest.mark.server
def test_evaluate_an_nnunet_folder_through_the_server(server: Any, phantoms: dict[str, Any], tmp_path: Path) -> None:
    from medseg.ops.postprocess import longest_axial_diameter
    from medseg_client import cli
    from medseg_client.client import SegmentationClient
    from medseg_client.io.studies import read_study, write_phantom

    data = tmp_path / "Dataset042_Liver"
    for name in ("images", "labels"):
        (data / f"{name}Ts").mkdir(parents=True)
    for case, ph in phantoms.items():
        write_phantom(ph, tmp_path / case, "nifti")
        (tmp_path / case / "ct.nii.gz").rename(data / "imagesTs" / f"liver_{case}_0000.nii.gz")
        (tmp_path / case / "labels_truth.nii.gz").rename(data / "labelsTs" / f"liver_{case}.nii.gz")
    # a case whose labels are on another grid (not read) and one too small for the model (refused): errors, the run goes on
    (data / "imagesTs" / "zz_grid_0000.nii.gz").write_bytes((data / "imagesTs" / "liver_b_0000.nii.gz").read_bytes())
    (data / "labelsTs" / "zz_grid.nii.gz").write_bytes((data / "labelsTs" / "liver_a.nii.gz").read_bytes())
    tiny = np.zeros((4, 8, 8), np.int16)
    _nifti_pair(tmp_path / "tiny", "zz_tiny", tiny, tiny.astype(np.uint8), "LPS")
    for sub, name in (("imagesTs", "zz_tiny_0000.nii.gz"), ("labelsTs", "zz_tiny.nii.gz")):
        (tmp_path / "tiny" / sub / name).rename(data / sub / name)
    out = tmp_path / "report"
    assert cli.main(["evaluate", "-u", server.grpc_url, str(data), "--out", str(out)]) == 0
    for name in ("metrics.json", "report.md", "froc.png", "dice.png"):
        assert (out / name).stat().st_size > 0, name
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["schema"] == "medseg-evaluate/1" and doc["data"]["folder"] == "Dataset042_Liver"
    assert doc["data"]["layout"] == "nnunet" and doc["server"]["model"]["weights_sha256"]
    assert doc["machine"]["cpu_count"] and doc["summary"]["cases"] == 5 and doc["summary"]["errors"] == 2
    errors = {r["case"]: r for r in doc["cases"] if r.get("error")}
    assert errors["zz_grid"]["stage"] == "read" and errors["zz_grid"]["error"].startswith("zz_grid: ")
    assert errors["zz_tiny"]["stage"] == "segment"
    for entries in doc["worst"].values():
        for e in entries:
            assert (out / e["picture"]).stat().st_size > 0
    assert "| liver_a |" in (out / "report.md").read_text()
    records = {r["case"]: r for r in doc["cases"]}
    head = records["liver_head"]
    assert not head["liver"]["annotated"] and head["liver"]["truth_ml"] == 0 and head["tumors"]["truth"] == []

    # one case's figures, recomputed from the labels and findings the server gives for it
    study = read_study(data / "imagesTs" / "liver_a_0000.nii.gz")
    with SegmentationClient(server.grpc_url) as client:
        result = client.segment(study.ct, study.spacing)
    truth = phantoms["a"].labels  # the phantom is written in canonical order
    assert study.ct.shape == truth.shape
    r = records["liver_a"]
    assert r["status"]["code"] == result.findings["status"]["code"]
    assert r["liver"]["dice"] == round(dice(result.labels > 0, truth > 0), 4)
    assert r["tumors"]["dice"] == round(dice(result.labels == 2, truth == 2), 4)
    voxel_ml = float(np.prod(study.spacing)) / 1000
    assert r["liver"]["truth_ml"] == pytest.approx(float((truth > 0).sum()) * voxel_ml, abs=0.01)
    comp, n = ndimage.label(truth == 2, structure=np.ones((3, 3, 3), bool))
    assert len(r["tumors"]["truth"]) == n == _components(truth == 2)
    expected = []
    for i in range(1, n + 1):
        m = comp == i
        centre = np.argwhere(m).mean(axis=0)
        expected.append({"center_mm": study.lps_mm(list(centre)),
                         "diameter_mm": round(longest_axial_diameter(m, study.spacing), 1)})
    found = [{"id": t["id"], "centroid_lps_mm": study.lps_mm(t["centroid_voxel_zyx"])} for t in result.findings["tumors"]]
    matched = match_tumors(expected, found)
    by_diameter = sorted((e["diameter_mm"], m["matched_id"] is not None) for e, m in zip(expected, matched, strict=True))
    assert sorted((t["diameter_mm"], t["found"]) for t in r["tumors"]["truth"]) == by_diameter
    assert len(r["tumors"]["reported"]) == len(result.findings["tumors"])
    assert r["tumors"]["reported_burden_ml"] == result.findings["tumor_burden_ml"]


@pytest.mark.server
def test_evaluate_a_dicom_series_with_its_seg_through_the_server(server: Any, phantoms: dict[str, Any], tmp_path: Path) -> None:
    from medseg_client import cli
    from medseg_client.io.seg import write_seg
    from medseg_client.io.studies import read_study, write_phantom

    ph = phantoms["b"]
    case = tmp_path / "data" / "patient_b"
    write_phantom(ph, case, "dicom")
    study = read_study(case / "dicom")
    assert np.array_equal(study.ct, ph.ct)
    write_seg(case / "truth_seg.dcm", study.dicom_files, study.to_native(ph.labels), {})
    out = tmp_path / "report"
    assert cli.main(["evaluate", "--url", server.grpc_url, str(tmp_path / "data"), "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["data"]["layout"] == "dicom" and doc["summary"]["errors"] == 0
    [r] = doc["cases"]
    assert r["case"] == "patient_b" and r["source"]["format"] == "dicom"
    assert r["source"]["segments"] == {"liver": [1], "tumor": [2]}
    assert r["source"]["series_instance_uid"] == study.series_uid
    assert r["liver"]["truth_ml"] == pytest.approx(float((ph.labels > 0).sum()) * float(np.prod(ph.spacing)) / 1000, abs=0.01)
    assert len(r["tumors"]["truth"]) == _components(ph.labels == 2)


def test_evaluate_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medseg_client import cli

    data, out = tmp_path / "data", tmp_path / "out"
    ct = np.zeros((4, 8, 8), np.int16)
    _nifti_pair(data, "c1", ct, ct.astype(np.uint8), "LPS")
    for args, says in (([str(tmp_path / "nope")], "nope: no such folder"),
                       ([str(data), "--label-map", "kidney=3"], "--label-map: expected liver="),
                       ([str(data), "--ignore-label", "2"], "--ignore-label 2 is also a liver or tumor value"),
                       ([str(data), "--limit", "0"], "--limit must be at least 1"),
                       ([str(data), "--timeout", "2"], "unavailable")):  # nothing listens on port 1
        assert cli.main(["evaluate", "-u", "127.0.0.1:1", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("medseg evaluate: error: ") and err.count("\n") == 1 and says in err, err
    assert not out.exists() and not list(tmp_path.glob(".medseg-*"))
