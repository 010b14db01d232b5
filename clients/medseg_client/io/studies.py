"""Reading and writing studies: NIfTI files and CT DICOM series, on the model's canonical grid.

A study is held as an int16 HU volume on the canonical grid: array axes (z, y, x) with x towards the
patient's left, y posterior, z superior (LPS), as the model was trained. ``Study.to_native`` maps a
label volume back to the input file's own voxel order, so outputs share the input's grid and affine.
Error messages name files and geometry, never patient identifiers.

Anonymizers blank or drop attributes a series still needs (SOP class and instance UIDs, series, study and
frame-of-reference UIDs, Modality): ``repair_headers`` fills them in from what the files still say, the same
way for the reader and the SEG writer, and records each repair in ``Study.repairs``; what cannot be repaired
is refused naming the file and the attribute.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medseg_client.errors import StudyError

HU_MIN, HU_MAX = -1024, 3071
MAX_MATRIX = 4096  # rows or columns of one slice
MAX_FRAMES = 10_000  # frames of one multi-frame file
MAX_TILT_DEG = 30.0  # gantry tilt corrected by shifting slices in-plane; more is refused
MIN_TILT_DEG = 0.05  # below this a series is taken as untilted
MAX_VOXELS = 2**31 // 2  # int16 voxels of a whole series (2 GiB)
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage SOP class
_LPS = ("L", "P", "S")
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Study:
    """A CT volume on the canonical (z, y, x) LPS grid and how to map results back to its source (read once,
    never changed: the reader builds it whole)."""

    ct: np.ndarray  # int16 (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm
    affine_lps: np.ndarray  # 4x4: canonical (x, y, z) index -> LPS mm
    native_affine_ras: np.ndarray  # 4x4: the source's (i, j, k) index -> RAS mm (NIfTI convention)
    ornt: np.ndarray  # nibabel orientation transform from native (i, j, k) to canonical (x, y, z)
    source: str  # "nifti" or "dicom"
    dicom_files: list[Path] = field(default_factory=list)  # sorted source slices (DICOM input)
    frame_indices: list[int] = field(default_factory=list)  # frame of each dicom_files entry (multi-frame)
    slice_shifts: np.ndarray | None = None  # gantry tilt: per-slice in-plane offsets (rows, cols) undone on input
    series_uid: str = ""  # the DICOM series read
    note: str = ""  # how the series was chosen, for the user
    dicom_headers: list[Any] = field(default_factory=list)  # repaired header (no pixels) of each dicom_files entry
    repairs: list[str] = field(default_factory=list)  # what repair_headers filled in, for the user and findings

    def to_native(self, labels_zyx: np.ndarray) -> np.ndarray:
        """A (z, y, x) canonical label volume in the source's (i, j, k) voxel order."""
        from nibabel.orientations import apply_orientation

        if labels_zyx.shape != self.ct.shape:
            raise StudyError(f"labels have shape {labels_zyx.shape}, the study {self.ct.shape}")
        inverse = np.empty_like(self.ornt)
        for native_axis, (canon_axis, flip) in enumerate(self.ornt):
            inverse[int(canon_axis)] = (native_axis, flip)
        # Fortran order: the (z, y, x) C-ordered labels are (x, y, z) in Fortran order, so this is a copy in memory
        # order (flips at most), and NIfTI writes it as it lies
        native = np.asfortranarray(apply_orientation(labels_zyx.transpose(2, 1, 0), inverse))
        return native if self.slice_shifts is None else retilt_labels(native, self.slice_shifts)

    def lps_mm(self, voxel_zyx: list[float]) -> list[float]:
        """Patient (LPS) coordinates in mm of a canonical (z, y, x) voxel position."""
        p = self.affine_lps @ np.array([voxel_zyx[2], voxel_zyx[1], voxel_zyx[0], 1.0])
        return [round(float(v), 2) for v in p[:3]]


def _canonical(native: np.ndarray, affine_ras: np.ndarray, source: str, files: list[Path] | None = None,
               where: str = "") -> Study:
    """Reorient a native (i, j, k) volume with its RAS affine onto the canonical LPS grid."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    start = io_orientation(affine_ras)
    if np.isnan(start).any():  # two voxel axes closest to one patient axis, or one too short to count
        raise StudyError(f"{where or source}: the affine's voxel axes do not each point along their own patient "
                         f"axis (voxel sizes {np.round(nib.affines.voxel_sizes(affine_ras), 4).tolist()} mm)")
    ornt = ornt_transform(start, axcodes2ornt(_LPS))
    canon_xyz = apply_orientation(native, ornt)
    affine_canon_ras = affine_ras @ inv_ornt_aff(ornt, native.shape)
    zooms = nib.affines.voxel_sizes(affine_canon_ras)
    spacing = (float(zooms[2]), float(zooms[1]), float(zooms[0]))
    ct = np.ascontiguousarray(canon_xyz.transpose(2, 1, 0))
    return Study(ct, spacing, _RAS_FROM_LPS @ affine_canon_ras, affine_ras, ornt, source, files or [])


def _to_hu_int16(data: np.ndarray, what: str) -> np.ndarray:
    if not np.issubdtype(data.dtype, np.number):
        raise StudyError(f"{what}: voxel data must be numeric, got {data.dtype}")
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise StudyError(f"{what}: voxel data contains NaN or infinite values")
        data = np.rint(data)
    return np.clip(data, HU_MIN, HU_MAX).astype(np.int16, copy=False)


def load_nifti_volume(path: Path, what: str = "CT volume") -> tuple[np.ndarray, Any]:
    """(3-D voxel data after scl_slope/inter, the nibabel image) of a NIfTI file, or a StudyError naming the file
    and what is wrong (a trailing 4th axis of length 1 is dropped)."""
    import nibabel as nib

    try:
        img: Any = _load_gzipped(path) if path.name.endswith(".gz") else nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files (and isal/gzip for broken streams)
        raise StudyError(f"{path.name}: not a readable NIfTI file ({type(e).__name__}: {' '.join(str(e).split())})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise StudyError(f"{path.name}: expected a 3-D {what}, got {data.ndim}-D data of shape {data.shape}")
    return data, img


def _gzip_codec() -> Any:
    """ISA-L's gzip module where installed (inflate ~3x, deflate at level 1 ~8x zlib's speed), else the standard
    library's: both have ``compress`` and ``decompress``."""
    try:
        from isal import igzip
    except ImportError:
        import gzip as igzip  # type: ignore[no-redef]
    return igzip


def _gunzip(raw: bytes) -> bytes:
    """A gzip stream's content."""
    return _gzip_codec().decompress(raw)  # type: ignore[no-any-return]


def _gzip(data: bytes) -> bytes:
    """A gzip stream of ``data`` at the fastest level (labels are mostly background: level 1 loses little size)."""
    return _gzip_codec().compress(data, compresslevel=1)  # type: ignore[no-any-return]


def _load_gzipped(path: Path) -> Any:
    """A gzipped NIfTI-1 or NIfTI-2 image, inflated in one call rather than through nibabel's gzip stream
    (on a 512 x 512 x 300 CT: 0.5 s instead of 1.4 s); the image's data are then read from memory."""
    import nibabel as nib

    data = _gunzip(path.read_bytes())
    if len(data) < 4:
        raise ValueError(f"{len(data)} bytes after decompression: no NIfTI header")
    # sizeof_hdr, in either byte order: 348 for NIfTI-1, 540 for NIfTI-2
    sizes = {int.from_bytes(data[:4], "little"), int.from_bytes(data[:4], "big")}
    klass = nib.Nifti2Image if 540 in sizes else nib.Nifti1Image
    return klass.from_bytes(data)


def read_nifti(path: Path) -> Study:
    """A CT NIfTI file (3-D, HU after scl_slope/inter) on the canonical grid."""
    data, img = load_nifti_volume(path)
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise StudyError(f"{path.name}: the NIfTI affine is missing or singular")
    return _canonical(_to_hu_int16(data, path.name), np.asarray(affine, np.float64), "nifti", where=path.name)


def _quiet_pydicom() -> None:
    """pydicom's reading-validation warnings quote element values (names, IDs): never let them reach a log."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE


MULTIFRAME_CT = {"1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}  # Enhanced / Legacy Converted
CT_SOP_CLASSES = {CT_IMAGE_STORAGE, *MULTIFRAME_CT}
_SERIES_UIDS = ("FrameOfReferenceUID", "StudyInstanceUID", "SeriesInstanceUID")  # one value per series
# Type 2 patient and study attributes a SEG copies from its source: an anonymizer may drop them altogether
_COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


@dataclass(frozen=True)
class SliceGeometry:
    """A series' in-plane axes and slice normal (LPS unit vectors) and pixel spacing, computed once from its first
    slice: sorting, the geometry rules, the tilt correction and the affine all use these."""

    row_dir: np.ndarray  # direction of increasing column index (along a row)
    col_dir: np.ndarray  # direction of increasing row index (along a column)
    normal: np.ndarray  # row_dir x col_dir
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm

    @staticmethod
    def of(first: Frame) -> SliceGeometry:
        row_dir, col_dir = first.iop[:3], first.iop[3:]
        normal = np.cross(row_dir, col_dir)
        dr, dc = first.pixel_spacing
        if not (abs(np.linalg.norm(normal) - 1) < 1e-2 and dr > 0 and dc > 0):
            raise StudyError(f"{first.name}: ImageOrientationPatient or PixelSpacing is degenerate "
                             f"(orientation {first.iop.tolist()}, spacing {dr} x {dc} mm)")
        return SliceGeometry(row_dir, col_dir, normal, (dr, dc))

    def position(self, frame: Frame) -> float:
        """The frame's position along the normal (mm)."""
        return float(frame.ipp @ self.normal)


@dataclass
class Frame:
    """One image plane of a series: a single-frame file, or one frame of a multi-frame file."""

    path: Path
    index: int  # frame number within the file (0 for a single-frame file)
    ds: Any
    iop: np.ndarray
    ipp: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    rescale: tuple[float, float]  # slope, intercept

    @property
    def name(self) -> str:
        return self.path.name if self.index == 0 and not _is_multiframe(self.ds) else f"{self.path.name} frame {self.index + 1}"


def _is_multiframe(ds: Any) -> bool:
    return sop_class(ds) in MULTIFRAME_CT


def _text(ds: Any, keyword: str) -> str:
    """An element's value as text, '' when the element is absent or empty."""
    value = ds.get(keyword) if ds is not None else None
    return "" if value is None else str(value).strip()


def _from_meta(ds: Any, keyword: str) -> str:
    return _text(getattr(ds, "file_meta", None), keyword)


_META_UIDS = {"SOPClassUID": "MediaStorageSOPClassUID", "SOPInstanceUID": "MediaStorageSOPInstanceUID"}
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def _usable(keyword: str, value: str) -> bool:
    """A SOP class UID pydicom knows as a SOP class; a SOP instance UID of digits and dots (leading zeros, which
    old scanners write, allowed), at most 64 characters."""
    if keyword == "SOPClassUID":
        from pydicom.uid import UID

        return UID(value).type == "SOP Class"
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def _sop_uid(ds: Any, keyword: str) -> tuple[str, str]:
    """A file's SOPClassUID or SOPInstanceUID and where it comes from: state "" (the dataset's own), "meta"
    (the dataset's is blank or damaged, the file meta's is used) or "unusable" (neither is usable)."""
    own = _text(ds, keyword)
    if own and _usable(keyword, own):
        return own, ""
    meta = _from_meta(ds, _META_UIDS[keyword])
    if meta and _usable(keyword, meta):
        return meta, "meta"
    return own, "unusable"


def sop_class(ds: Any) -> str:
    """The SOP class: the dataset's, or where an anonymizer blanked it (or it is damaged), the file meta's."""
    return _sop_uid(ds, "SOPClassUID")[0]


def _modality(ds: Any) -> str:
    """Modality, or CT where it is blank and the SOP class is a CT one."""
    return _text(ds, "Modality") or ("CT" if sop_class(ds) in CT_SOP_CLASSES else "")


def _is_localizer(ds: Any) -> bool:
    """ImageType says LOCALIZER (a blank or missing ImageType does not)."""
    value = ds.get("ImageType")
    values = [value] if isinstance(value, str) else list(value or [])
    return "LOCALIZER" in [str(v).strip().upper() for v in values]


def _derived_uid(keyword: str, *sources: str) -> str:
    """A UID for a blank ``keyword``, derived from stable values the files still carry: the same files,
    the same UID, on every run and machine."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[f"medseg-derived-{keyword}", *sources]))


def _most_common(values: list[str]) -> str:
    """The value most files carry (ties: the first in sorted order)."""
    return max(sorted(set(values)), key=values.count)


def _series_instance_uids(headers: list[tuple[Path, Any]]) -> list[str]:
    return sorted(_sop_uid(ds, "SOPInstanceUID")[0] for _, ds in headers)


def _derived_series_uid(headers: list[tuple[Path, Any]]) -> str:
    """The SeriesInstanceUID of files whose series UID is blank: from their sorted SOP instance UIDs."""
    return _derived_uid("SeriesInstanceUID", *_series_instance_uids(headers))


def repair_headers(headers: list[tuple[Path, Any]]) -> list[str]:
    """Fill in, in place, what an anonymizer left blank in one series' headers, from what the files still
    say; returns the repairs made (one line per kind, with its count of files), never values.

    - SOPClassUID / SOPInstanceUID blank or missing (or damaged: not a known SOP class / not a UID): the
      file meta's MediaStorageSOPClassUID / MediaStorageSOPInstanceUID; where that is not usable either,
      a StudyError naming the file and the attribute;
    - two files with one SOPInstanceUID: refused, naming both;
    - Modality blank and a CT SOP class: CT;
    - FrameOfReferenceUID, StudyInstanceUID, SeriesInstanceUID blank: the value the series' other files carry,
      else a UID derived from the series' sorted SOP instance UIDs (the study's from the frame of reference
      UID, so the series of one acquisition share it): the same files always get the same UIDs. Files of the
      series that carry different values are refused, naming the first that differs (a SEG has one study
      and one frame of reference);
    - patient and study attributes a SEG copies (type 2) missing altogether: added empty.

    The reader calls it on the series it reads, the SEG writer on its sources: both see the same headers.
    Already repaired headers are left as they are.
    """
    counts: dict[str, int] = {}

    def noted(what: str, n: int = 1) -> None:
        counts[what] = counts.get(what, 0) + n

    seen: dict[str, Path] = {}
    carried: dict[str, list[str]] = {keyword: [] for keyword in _SERIES_UIDS}
    for path, ds in headers:
        try:
            for keyword, meta_keyword in _META_UIDS.items():
                own = _text(ds, keyword)
                value, state = _sop_uid(ds, keyword)
                if state == "":
                    continue
                if state == "unusable":
                    what = "a known SOP class" if keyword == "SOPClassUID" else "a valid UID"
                    if own:
                        problem = f"is not {what}, nor is the file meta's {meta_keyword}"
                    elif _from_meta(ds, meta_keyword):
                        problem = f"is blank and the file meta's {meta_keyword} is not {what}"
                    else:
                        problem = f"is blank and the file meta has no {meta_keyword} to take it from"
                    raise StudyError(f"{path.name}: {keyword} {problem}")
                setattr(ds, keyword, value)
                noted(f"{keyword} {'damaged, ' if own else ''}taken from the file meta")
            if not _text(ds, "Modality") and _text(ds, "SOPClassUID") in CT_SOP_CLASSES:
                ds.Modality = "CT"
                noted("Modality set to CT from the SOP class")
            for keyword in _COPIED_TYPE2:
                if keyword not in ds:
                    setattr(ds, keyword, "")
                    noted(f"{keyword} missing, added empty")
            for keyword in _SERIES_UIDS:
                carried[keyword].append(_text(ds, keyword))
            uid = _text(ds, "SOPInstanceUID")
        except StudyError:
            raise
        except Exception as e:  # pydicom decodes elements lazily: a damaged one raises on access
            raise StudyError(f"{path.name}: DICOM header could not be decoded ({type(e).__name__})") from e
        if uid in seen:
            raise StudyError(f"{path.name}: SOPInstanceUID is the same as {seen[uid].name}'s: two files claim one "
                             "instance")
        seen[uid] = path
    for keyword in _SERIES_UIDS:  # frame of reference first: a derived study UID comes from it
        values = carried[keyword]
        present = [v for v in values if v]
        if len(set(present)) > 1:
            common = _most_common(present)
            k = next(k for k, v in enumerate(values) if v and v != common)
            raise StudyError(f"{headers[k][0].name}: {keyword} differs from the one the series' other files carry")
        blank = [k for k, v in enumerate(values) if not v]
        if not blank:
            continue
        if present:
            value = present[0]
            noted(f"{keyword} blank, taken from the series' other files", len(blank))
        elif keyword == "StudyInstanceUID":  # one frame of reference, one study: the series of a study agree
            value = _derived_uid(keyword, carried["FrameOfReferenceUID"][0])
            noted(f"{keyword} blank, derived from the frame of reference UID", len(blank))
        else:
            value = _derived_uid(keyword, *sorted(seen))
            noted(f"{keyword} blank, derived from the series' SOP instance UIDs", len(blank))
        for k in blank:
            setattr(headers[k][1], keyword, value)
            values[k] = value
    return [f"{what} ({n} file{'s' if n != 1 else ''})" for what, n in counts.items()]


def _floats(value: Any, n: int, what: str, where: str) -> np.ndarray:
    try:
        out = np.array([float(v) for v in value], np.float64)
    except Exception as e:
        raise StudyError(f"{where}: {what} is missing or not {n} numbers") from e
    if out.shape != (n,) or not np.isfinite(out).all():
        raise StudyError(f"{where}: {what} is not {n} finite numbers")
    return out


def _group(ds: Any, frame_groups: Any, keyword: str) -> Any:
    """A functional group item: per-frame if present, else shared; None if neither has it."""
    for groups in (frame_groups, ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if groups is not None and keyword in groups:
            return groups[keyword].value[0]
    return None


def _frames_of(path: Path, ds: Any) -> list[Frame]:
    """The frames of one CT file, with their geometry and rescale (single- or multi-frame)."""
    if _is_multiframe(ds):
        n = _header_int(ds, "NumberOfFrames", path, 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
        if not 1 <= n <= MAX_FRAMES or len(per_frame) != n:
            raise StudyError(f"{path.name}: NumberOfFrames {n} does not match its {len(per_frame)} per-frame groups")
        frames = []
        for i, groups in enumerate(per_frame):
            where = f"{path.name} frame {i + 1}"
            orient, pos, meas = (_group(ds, groups, k) for k in
                                 ("PlaneOrientationSequence", "PlanePositionSequence", "PixelMeasuresSequence"))
            pvt = _group(ds, groups, "PixelValueTransformationSequence")
            if orient is None or pos is None or meas is None:
                raise StudyError(f"{where}: plane orientation, position or pixel measures are missing")
            spacing = _floats(meas.get("PixelSpacing"), 2, "PixelSpacing", where)
            frames.append(Frame(path, i, ds, _floats(orient.get("ImageOrientationPatient"), 6, "orientation", where),
                                _floats(pos.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
                                (float(spacing[0]), float(spacing[1])), _rescale(pvt, where)))
        return frames
    where = path.name
    spacing = _floats(ds.get("PixelSpacing"), 2, "PixelSpacing", where)
    return [Frame(path, 0, ds, _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", where),
                  _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", where),
                  (float(spacing[0]), float(spacing[1])), _rescale(ds, where))]


def _scan(files: list[Path]) -> dict[str, list[tuple[Path, Any]]]:
    """CT image files by SeriesInstanceUID; localizers and non-CT objects left out. Files whose series UID
    is blank form one series, under the UID ``repair_headers`` derives for them."""
    import pydicom

    series: dict[str, list[tuple[Path, Any]]] = {}
    for p in files:
        try:
            ds = pydicom.dcmread(p, defer_size=4096)  # header now, pixel data when needed
        except OSError as e:
            if e.errno is not None:  # unreadable (permissions, I/O): say so rather than pass it over as not DICOM
                raise StudyError(f"{p.name}: cannot be read ({e.strerror})") from e
            if claims_dicom(p):  # pydicom raises a bare OSError on some damaged files
                raise StudyError(f"{p.name}: DICOM file could not be parsed ({type(e).__name__})") from e
            continue
        except Exception as e:
            if claims_dicom(p):
                raise StudyError(f"{p.name}: DICOM file could not be parsed ({type(e).__name__})") from e
            continue  # not DICOM: other files may sit beside a series
        try:
            if "PixelData" not in ds or _modality(ds) != "CT":
                continue
            if "ImagePositionPatient" not in ds and not _is_multiframe(ds):
                continue
            if _is_localizer(ds):
                continue
            uid = _text(ds, "SeriesInstanceUID")
        except Exception as e:  # pydicom decodes elements lazily: a damaged one raises on access
            raise StudyError(f"{p.name}: DICOM header could not be decoded ({type(e).__name__})") from e
        series.setdefault(uid, []).append((p, ds))
    if "" in series:
        blank = series.pop("")
        series.setdefault(_derived_series_uid(blank), []).extend(blank)
    return series


def read_dicom_series(folder: Path, series_uid: str | None = None) -> Study:
    """A CT series from a folder (``series_uid``, or else the one with most slices): single-frame or
    enhanced multi-frame, localizers dropped, slices sorted along the slice normal (never by file name
    or InstanceNumber), rescaled to HU."""
    _quiet_pydicom()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise StudyError(f"{folder}: no files found")
    series = _scan(files)
    if not series:
        raise StudyError(f"{folder}: no CT image slices found among {len(files)} files")
    if series_uid is not None:
        if series_uid not in series:
            raise StudyError(f"{folder}: no CT series {series_uid}; found {len(series)}: " + ", ".join(
                f"{uid} ({len(v)} files)" for uid, v in sorted(series.items())))
        chosen = series_uid
    else:
        chosen = max(series, key=lambda uid: len(series[uid]))
    frames: list[Frame] = []
    repairs = repair_headers(series[chosen])
    for p, ds in series[chosen]:
        try:
            frames.extend(_frames_of(p, ds))
        except StudyError:
            raise
        except Exception as e:
            raise StudyError(f"{p.name}: DICOM header could not be decoded ({type(e).__name__})") from e
    note = f"series {chosen} ({len(frames)} slices)" + (
        f", picked as the largest of {len(series)} CT series (choose with --series)"
        if len(series) > 1 and series_uid is None else "")
    if len(frames) < 2:
        raise StudyError(f"{folder}: the CT series has {len(frames)} slice; at least 2 are needed")
    first = frames[0]
    geometry = SliceGeometry.of(first)
    frames.sort(key=geometry.position)
    dz, tilt = check_slice_geometry(frames, folder, geometry)
    rows, cols = _header_int(first.ds, "Rows", first.path), _header_int(first.ds, "Columns", first.path)
    if not (0 < rows <= MAX_MATRIX and 0 < cols <= MAX_MATRIX):
        raise StudyError(f"{first.name}: image matrix {rows}x{cols} is outside 1..{MAX_MATRIX}")
    if len(frames) * rows * cols > MAX_VOXELS:
        raise StudyError(f"{folder}: {len(frames)} slices of {rows}x{cols} exceed {MAX_VOXELS} voxels")
    volume = np.empty((len(frames), rows, cols), np.int16)
    decoded: dict[Path, np.ndarray] = {}
    for k, f in enumerate(frames):
        volume[k] = _frame_hu(f, rows, cols, decoded)
    for f in frames:  # the volume holds the pixels; the headers stay for the SEG
        if "PixelData" in f.ds:
            del f.ds.PixelData
    shifts = tilt_shifts(frames, geometry) if tilt > MIN_TILT_DEG else None
    if shifts is not None:
        volume = untilt(volume, shifts)
    # affine from (column i, row j, slice k) index to LPS, then to RAS for the orientation code
    dr, dc = geometry.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = geometry.row_dir * dc
    lps[:3, 1] = geometry.col_dir * dr
    lps[:3, 2] = geometry.normal * dz
    lps[:3, 3] = frames[0].ipp
    native = volume.transpose(2, 1, 0)  # (i=column, j=row, k=slice)
    study = _canonical(native, _RAS_FROM_LPS @ lps, "dicom", [f.path for f in frames], where=str(folder))
    native_affine_ras = study.native_affine_ras
    if shifts is not None:  # outputs go back onto the tilted slices: a sheared affine
        sheared = lps.copy()
        sheared[:3, 2] = (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1)
        native_affine_ras = _RAS_FROM_LPS @ sheared
        note += f"; gantry tilt of {tilt:.1f} degrees corrected by shifting slices in-plane"
    return replace(study, frame_indices=[f.index for f in frames], dicom_headers=[f.ds for f in frames],
                   repairs=repairs, native_affine_ras=native_affine_ras, slice_shifts=shifts, series_uid=chosen,
                   note=note)


def check_slice_geometry(frames: list[Frame], folder: Path, geometry: SliceGeometry | None = None) -> tuple[float, float]:
    """The series' geometry rules, on frames sorted along the normal; returns the slice spacing (mm) and the
    gantry tilt (degrees).

    - every slice has the series' orientation and pixel spacing (within 1e-3): otherwise refused;
    - no two slices share a position along the normal (duplicates);
    - the steps along the normal agree within 1% + 0.01 mm (jitter tolerated); a step that is a
      whole multiple of the others is reported as missing slices;
    - the in-plane offset of the slices grows linearly (a constant step, within the same tolerance);
      a gantry tilt (that step not along the normal) up to 30 degrees is corrected by the reader,
      a larger one refused.
    Each breach is refused with what and where.
    """
    geometry = geometry or SliceGeometry.of(frames[0])
    iop, normal = frames[0].iop, geometry.normal
    for f in frames:
        if np.abs(f.iop - iop).max() > 1e-3:
            raise StudyError(f"{f.name}: orientation {f.iop.round(4).tolist()} differs from the series' "
                             f"{iop.round(4).tolist()}: slices are not parallel")
        if np.abs(np.subtract(f.pixel_spacing, frames[0].pixel_spacing)).max() > 1e-3:
            raise StudyError(f"{f.name}: pixel spacing {f.pixel_spacing} differs from the series' {frames[0].pixel_spacing}")
    z = np.array([geometry.position(f) for f in frames])
    gaps = np.diff(z)
    dup = np.flatnonzero(gaps < 1e-3)
    if len(dup):
        k = int(dup[0])
        raise StudyError(f"{folder}: {frames[k].name} and {frames[k + 1].name} share the position {z[k]:.2f} mm "
                         "along the slice normal")
    dz = float(np.median(gaps))
    off = np.flatnonzero(np.abs(gaps - dz) > 0.01 * dz + 0.01)
    if len(off):
        k = int(off[0])
        ratio = gaps[k] / dz
        where = f"between {frames[k].name} ({z[k]:.2f} mm) and {frames[k + 1].name} ({z[k + 1]:.2f} mm)"
        if abs(ratio - round(ratio)) < 0.05 and round(ratio) >= 2:
            raise StudyError(f"{folder}: {round(ratio) - 1} slice(s) missing {where} (spacing {dz:.3f} mm)")
        raise StudyError(f"{folder}: slice spacing is uneven: {gaps[k]:.3f} mm {where}, elsewhere {dz:.3f} mm")
    step = (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1)
    along = float(step @ normal)
    drift = np.array([f.ipp - frames[0].ipp - k * step for k, f in enumerate(frames)])
    bad = np.flatnonzero(np.linalg.norm(drift - np.outer(drift @ normal, normal), axis=1) > 0.01 * dz + 0.01)
    if len(bad):
        raise StudyError(f"{folder}: {frames[int(bad[0])].name} is shifted in-plane off the series' regular grid")
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(step - along * normal), abs(along))))
    if tilt > MAX_TILT_DEG:
        raise StudyError(f"{folder}: gantry tilt of {tilt:.1f} degrees exceeds the {MAX_TILT_DEG:.0f} degrees "
                         "this reader corrects")
    return dz, tilt


def tilt_shifts(frames: list[Frame], geometry: SliceGeometry) -> np.ndarray:
    """Per slice, the in-plane offset (rows, columns) of a tilted series from the first slice."""
    d = np.array([f.ipp - frames[0].ipp for f in frames])
    d -= np.outer(d @ geometry.normal, geometry.normal)
    dr, dc = geometry.pixel_spacing
    return np.stack([d @ geometry.col_dir / dr, d @ geometry.row_dir / dc], axis=1)


def untilt(volume: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift each (rows, columns) slice by its offset onto the grid orthogonal to the normal (linear, air outside)."""
    from scipy import ndimage

    out = np.empty_like(volume)
    for k, (sr, sc) in enumerate(shifts):
        moved = ndimage.shift(volume[k].astype(np.float32), (sr, sc), order=1, mode="constant", cval=HU_MIN)
        out[k] = np.rint(moved).astype(np.int16)
    return out


def retilt_labels(native: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Labels in native (i=column, j=row, k) order back onto the tilted slices (nearest)."""
    from scipy import ndimage

    out = np.empty_like(native)
    for k, (sr, sc) in enumerate(shifts):
        out[:, :, k] = ndimage.shift(native[:, :, k], (-sc, -sr), order=0, mode="constant", cval=0)
    return out


def _frame_hu(frame: Frame, rows: int, cols: int, decoded: dict[Path, np.ndarray]) -> np.ndarray:
    """One frame's pixels in HU with the frame's rescale (a multi-frame file is decoded once)."""
    if _is_multiframe(frame.ds):
        if frame.path not in decoded:
            decoded[frame.path] = _decode_pixels(frame.ds, frame.path, rows, cols)
        pixels = decoded[frame.path][frame.index]
    else:
        pixels = _slice_pixels(frame.ds, frame.path, rows, cols)
    slope, intercept = frame.rescale
    if not (np.isfinite(slope) and np.isfinite(intercept) and slope != 0):
        raise StudyError(f"{frame.name}: rescale slope {slope} / intercept {intercept} are not usable")
    return _to_hu_int16(pixels.astype(np.float64) * slope + intercept, frame.name)


def _decode_pixels(ds: Any, path: Path, rows: int, cols: int) -> np.ndarray:
    """All frames of a multi-frame file as (frames, rows, cols), from its already-parsed header."""
    try:
        n = _header_int(ds, "NumberOfFrames", path, 1)
        if _header_int(ds, "Rows", path) != rows or _header_int(ds, "Columns", path) != cols:
            raise StudyError(f"{path.name}: frames are {ds.get('Rows')}x{ds.get('Columns')}, the series {rows}x{cols}")
        pixels = ds.pixel_array
    except StudyError:
        raise
    except Exception as e:
        raise StudyError(f"{path.name}: pixel data could not be decoded ({type(e).__name__})") from e
    pixels = pixels.reshape((1, *pixels.shape)) if pixels.ndim == 2 else pixels
    if pixels.shape != (n, rows, cols):
        raise StudyError(f"{path.name}: decoded pixels have shape {pixels.shape}, expected {(n, rows, cols)}")
    return pixels


def _slice_pixels(ds: Any, path: Path, rows: int, cols: int) -> np.ndarray:
    """One slice's stored pixels from its already-parsed header (pixel data read now, then released),
    or a StudyError naming the file and what is wrong with it."""
    try:
        return _decode_slice(ds, path, rows, cols)
    except StudyError:
        raise
    except Exception as e:  # a damaged element raises on access; name the file, keep the traceback as cause
        raise StudyError(f"{path.name}: not a readable CT slice ({type(e).__name__})") from e
    finally:
        if "PixelData" in ds:
            del ds.PixelData  # the volume holds the pixels now; keep the header only


def _decode_slice(ds: Any, path: Path, rows: int, cols: int) -> np.ndarray:
    if _header_int(ds, "Rows", path) != rows or _header_int(ds, "Columns", path) != cols:
        raise StudyError(f"{path.name}: slice is {ds.get('Rows')}x{ds.get('Columns')}, the series {rows}x{cols}")
    if _header_int(ds, "SamplesPerPixel", path, 1) != 1 or _header_int(ds, "NumberOfFrames", path, 1) != 1:
        raise StudyError(f"{path.name}: expected one grayscale frame per file")
    try:
        pixels = ds.pixel_array
    except Exception as e:  # pixel-data handlers raise many types for corrupt or unsupported data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise StudyError(f"{path.name}: pixel data could not be decoded (transfer syntax {syntax}: "
                         f"{type(e).__name__})") from e
    if pixels.shape != (rows, cols):
        raise StudyError(f"{path.name}: decoded pixels have shape {pixels.shape}, expected {(rows, cols)}")
    return np.asarray(pixels)


def _header_int(ds: Any, keyword: str, path: Path, default: int = 0) -> int:
    """An integer header element, or a StudyError naming the file and the element."""
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise StudyError(f"{path.name}: {keyword} is not an integer") from e


def _number(value: Any, default: float) -> float:
    """A DS value as float; ``default`` only when the element is absent or empty."""
    return default if value is None or value == "" else float(value)


def _rescale(item: Any, where: str) -> tuple[float, float]:
    """(slope, intercept) of a dataset or functional-group item (1, 0 where absent)."""
    try:
        return (_number(item.get("RescaleSlope") if item is not None else None, 1.0),
                _number(item.get("RescaleIntercept") if item is not None else None, 0.0))
    except (TypeError, ValueError) as e:
        raise StudyError(f"{where}: RescaleSlope/RescaleIntercept are not numbers") from e


def claims_dicom(path: Path) -> bool:
    """True if the file has the DICOM Part 10 marker: then failing to parse it is an error, not noise."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def read_study(path: Path, series_uid: str | None = None) -> Study:
    """A DICOM series folder (optionally one series of it) or a NIfTI file."""
    if not path.exists():
        raise StudyError(f"{path}: no such file or folder")
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise StudyError(f"{path}: the folder cannot be read (permission denied)")
        return read_dicom_series(path, series_uid)
    if not path.is_file():  # a pipe or a device would block or never end
        raise StudyError(f"{path}: not a regular file or a folder")
    if path.name.endswith((".nii", ".nii.gz")):
        return read_nifti(path)
    if claims_dicom(path):
        raise StudyError(f"{path.name}: a single DICOM file; pass the folder that holds its series")
    raise StudyError(f"{path.name}: expected a DICOM series folder or a .nii/.nii.gz file")


def save_nifti(volume_native: np.ndarray, affine_ras: np.ndarray, path: Path) -> None:
    """Write a volume in native (i, j, k) order with the given RAS affine (sform and qform)."""
    import nibabel as nib

    img = nib.Nifti1Image(volume_native, affine_ras)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    if not path.name.endswith(".gz"):
        nib.save(img, str(path))
        return
    # NIfTI stores voxels in Fortran order: an F-ordered volume is written as it lies in memory (a C-ordered one
    # is transposed on the way), then compressed in one call at the fastest level
    path.write_bytes(_gzip(img.to_bytes()))


def write_phantom(phantom: Any, out: Path, fmt: str) -> list[Path]:
    """Write a phantom as a DICOM series (``out/dicom``) or NIfTI (``out/ct.nii.gz``), with its truth."""
    out.mkdir(parents=True, exist_ok=True)
    affine_ras = _RAS_FROM_LPS @ phantom.affine_lps()
    written = []
    if fmt == "nifti":
        save_nifti(phantom.ct.transpose(2, 1, 0), affine_ras, out / "ct.nii.gz")
        written.append(out / "ct.nii.gz")
    elif fmt == "dicom":
        written.extend(write_dicom_series(phantom, out / "dicom"))
    else:
        raise StudyError(f"format must be dicom or nifti, got {fmt!r}")
    save_nifti(phantom.labels.transpose(2, 1, 0), affine_ras, out / "labels_truth.nii.gz")
    (out / "phantom.json").write_text(json.dumps(phantom.describe(), indent=2) + "\n")
    return [*written, out / "labels_truth.nii.gz", out / "phantom.json"]


def write_dicom_series(phantom: Any, folder: Path) -> list[Path]:
    """One CT Image Storage file per slice, with UIDs derived from the seed (deterministic)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    seed = str(phantom.seed)
    study_uid = generate_uid(entropy_srcs=["medseg-phantom-study", seed])
    series_uid = generate_uid(entropy_srcs=["medseg-phantom-series", seed])
    frame_uid = generate_uid(entropy_srcs=["medseg-phantom-frame", seed])
    sz, sy, sx = phantom.spacing
    paths = []
    for k in range(phantom.ct.shape[0]):
        sop_uid = generate_uid(entropy_srcs=["medseg-phantom-instance", seed, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.PatientName, ds.PatientID = f"PHANTOM^{seed}", f"PH{seed}"
        ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "", "O", f"ACC{seed}"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Modality, ds.Manufacturer = "CT", "medseg phantom"
        ds.ReferringPhysicianName, ds.AcquisitionNumber = "", 1
        ds.PatientPosition, ds.BodyPartExamined = "FFS", "ABDOMEN"
        ds.SeriesDescription = "medseg synthetic abdomen"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (phantom.origin_mm[0], phantom.origin_mm[1], phantom.origin_mm[2] + k * sz)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{phantom.origin_mm[2] + k * sz:.4f}"
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]
        ds.SliceThickness = f"{sz:.6g}"
        ds.KVP, ds.RescaleType = "120", "HU"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = phantom.ct.shape[1], phantom.ct.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.WindowCenter, ds.WindowWidth = "40", "400"
        ds.PixelData = (phantom.ct[k].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
