"""PET DICOM series in: the voxels in SUV (body weight), the factor from the series' own tags.

:func:`read_pet_dicom` reads one PET (Modality PT) series from a folder with pydicom (not SimpleITK/GDCM, which
inverts MONOCHROME1 images on read): slices sorted along the slice normal, orientation, spacing and size checked
to agree, RescaleSlope/RescaleIntercept applied per slice, geometry in LPS as ITK uses it, values multiplied by
the SUVbw factor of :func:`suv_from_headers`. :func:`suv_factor_of_files` gives that factor for a list of files
(the Slicer side: the files of a volume loaded from the DICOM database). :func:`read_pet` is the PET input of the
commands: an image file, or a PET DICOM series.

SUVbw factor (QIBA FDG-PET/CT Profile, Appendix G "Vendor-neutral pseudo-codes for SUV calculation"; DICOM PS3.3
C.8.9.1 PET Series and C.8.9.2 PET Isotope modules):

* Units GML: the voxels are SUV already, factor 1 (SUVType, when given, must be BW).
* Units BQML: factor = PatientWeight [kg] * 1000 / decayed dose [Bq], where
  decayed dose = RadionuclideTotalDose * 2 ** (-decay time / RadionuclideHalfLife);
  - DecayCorrection START: the images are decay-corrected to the start of the acquisition; decay time = scan
    time - injection time. Scan time: SeriesDate/SeriesTime unless they are after the earliest
    AcquisitionDate/AcquisitionTime of the series' images (a post-processed series, whose series time is when it
    was made); then GE's private scan time (0009,xx0D of "GEMS_PETD_01") when present, else the earliest
    acquisition time. Injection time: RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the
    scan's date; an injection time of day later than the scan's was the day before (midnight in between).
  - DecayCorrection ADMIN: the images are decay-corrected to the injection time: no decay (factor 1).
  - DecayCorrection NONE (or anything else): refused; each frame would need its own decay correction.
* Other units (CNTS, ...) are refused.

Every problem is an :class:`~PETWorkbenchLib.errors.InputError` naming the series, the tag and what to do.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import abc
from pathlib import Path

from .errors import InputError, ResourceError, os_error_reason

PT_MODALITY = "PT"
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
# tags the BQML SUV needs, in the order messages name them
_SUV_TAGS = ("Units", "DecayCorrection", "PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife",
             "RadiopharmaceuticalStartTime", "SeriesTime")
_HINT = ("SUV cannot be computed from the tags; convert the series to NIfTI/NRRD and give --units BQML "
         "--weight-kg ... --injected-dose-mbq ... (or convert it to SUV)")


# ------------------------------------------------------------------------------------------------ reading headers
def _read_header(path):
    """pydicom dataset without pixel data, or None when the file is not DICOM."""
    import pydicom
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(128)
            magic = f.read(4) == b"DICM"
        if not magic and p.suffix.lower() != ".dcm":
            return None
        return pydicom.dcmread(str(p), stop_before_pixels=True, force=not magic)
    except OSError as e:
        raise InputError(f"DICOM file {p} cannot be read: {os_error_reason(e)}") from None
    except Exception:  # noqa: BLE001 - pydicom raises many types for damaged files: the file is not usable
        return None


def _headers(files):
    """[(path, dataset)] of the DICOM image files among ``files`` (DICOMDIR and non-DICOM files left out) and
    how many files were not readable as DICOM."""
    out, unreadable = [], 0
    for f in files:
        ds = _read_header(f)
        if ds is None or "SOPClassUID" not in ds and "Modality" not in ds:
            unreadable += 1
            continue
        if str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP:
            continue
        out.append((Path(f), ds))
    return out, unreadable


def _describe_series(uid, items):
    ds = items[0][1]
    desc = str(ds.get("SeriesDescription", "") or "").strip() or "no SeriesDescription"
    return f"{ds.get('Modality', '?')} '{desc}' ({len(items)} files, SeriesInstanceUID {uid})"


def _one_pet_series(headers, where, series_uid=None):
    """The [(path, dataset)] of the one PT series in ``headers`` (or of ``series_uid``)."""
    series = {}
    for path, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "") or "?"), []).append((path, ds))
    if series_uid is not None:
        if str(series_uid) not in series:
            raise InputError(f"{where}: no series with SeriesInstanceUID {series_uid}; it holds "
                             + "; ".join(_describe_series(u, s) for u, s in series.items()))
        series = {str(series_uid): series[str(series_uid)]}
    if len(series) > 1:
        raise InputError(f"{where} holds {len(series)} series: "
                         + "; ".join(_describe_series(u, s) for u, s in series.items())
                         + ". Put the PET series in a folder of its own")
    uid, items = next(iter(series.items()))
    modality = str(items[0][1].get("Modality", "") or "")
    if any(str(ds.get("Modality", "") or "") != PT_MODALITY for _, ds in items):
        raise InputError(f"{where} is not a PET series: Modality is {modality or 'missing'} "
                         f"({_describe_series(uid, items)}); a PET series has Modality PT")
    return uid, items


# ------------------------------------------------------------------------------------------------ times
def _text(ds, keyword):
    """The value as text ('' when absent); a multi-valued one joined by backslashes, as DICOM stores it."""
    v = ds.get(keyword, None)
    if v is None:
        return ""
    if isinstance(v, abc.Sequence) and not isinstance(v, (str, bytes)):
        return "\\".join(str(x).strip() for x in v)
    return str(v).strip()


def _parse_time(text):
    """DICOM TM (HHMMSS.FFFFFF, or the old HH:MM:SS) -> seconds after midnight, None when empty or invalid."""
    t = text.replace(":", "").strip()
    if not t:
        return None
    try:
        whole, _, frac = t.partition(".")
        if not whole.isdigit() or len(whole) not in (2, 4, 6):
            return None
        h, m, s = int(whole[0:2]), int(whole[2:4] or 0), int(whole[4:6] or 0)
        if h > 23 or m > 59 or s > 60:
            return None
        return h * 3600 + m * 60 + s + (float("0." + frac) if frac.isdigit() else 0.0)
    except ValueError:
        return None


def _parse_date(text):
    t = text.replace(".", "").replace("-", "").strip()
    if len(t) != 8 or not t.isdigit():
        return None
    try:
        return _dt.date(int(t[:4]), int(t[4:6]), int(t[6:8]))
    except ValueError:
        return None


def _parse_datetime(text):
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) -> (date, seconds after midnight); the UTC offset is dropped (the
    scan times it is compared with carry none)."""
    t = text.strip()
    for sign in "+-":
        if sign in t[8:]:
            t = t[:8] + t[8:].split(sign)[0]
    d = _parse_date(t[:8]) if len(t) >= 8 else None
    if d is None:
        return None
    s = _parse_time(t[8:]) if len(t) > 8 else 0.0
    return None if s is None else (d, s)


def _when(date, seconds):
    """A datetime; a missing date is a fixed day (only differences of times count then)."""
    base = _dt.datetime.combine(date or _dt.date(2000, 1, 2), _dt.time())
    return base + _dt.timedelta(seconds=seconds)


def _ge_scan_time(ds):
    try:
        v = ds.get_private_item(0x0009, 0x0D, "GEMS_PETD_01").value
    except (KeyError, ValueError, AttributeError):
        return None
    return _parse_datetime(str(v)) if v else None


def _scan_time(headers, first, where):
    """(datetime, dated, source) of the reference time of START decay correction (QIBA, see the module docstring)."""
    series_t = _parse_time(_text(first, "SeriesTime"))
    if series_t is None:
        raise InputError(f"{where}: SeriesTime is missing or not a time ({_text(first, 'SeriesTime') or 'empty'}): "
                         f"the decay from injection to scan cannot be computed; {_HINT}")
    series_d = _parse_date(_text(first, "SeriesDate"))      # without it, only times of day count
    acquisitions = []
    for _, ds in headers:
        t = _parse_time(_text(ds, "AcquisitionTime"))
        if t is not None:
            d = _parse_date(_text(ds, "AcquisitionDate")) if series_d is not None else None
            acquisitions.append(_when(d or series_d, t))
    series_when = _when(series_d, series_t)
    dated = series_d is not None
    if not acquisitions or series_when <= min(acquisitions):
        return series_when, dated, "SeriesTime"
    ge = _ge_scan_time(first)
    if ge is not None:
        return _when(ge[0] if dated else None, ge[1]), dated, "GE private scan time (0009,100D)"
    return min(acquisitions), dated, "earliest AcquisitionTime (SeriesTime is after it)"


def _injection_time(item, scan_when, scan_dated, where):
    """(datetime of injection, how it was found)."""
    full = _parse_datetime(_text(item, "RadiopharmaceuticalStartDateTime"))
    if full is not None and scan_dated:
        when = _when(*full)
        if when > scan_when:
            raise InputError(f"{where}: RadiopharmaceuticalStartDateTime {when:%Y-%m-%d %H:%M:%S} is after the scan "
                             f"({scan_when:%Y-%m-%d %H:%M:%S}); {_HINT}")
        return when, "RadiopharmaceuticalStartDateTime"
    t = full[1] if full is not None else _parse_time(_text(item, "RadiopharmaceuticalStartTime"))
    if t is None:
        raise InputError(f"{where}: RadiopharmaceuticalStartTime is missing or not a time: the decay from "
                         f"injection to scan cannot be computed; {_HINT}")
    when = _when(scan_when.date(), t)
    source = "RadiopharmaceuticalStartTime"
    if when > scan_when:               # a time of day after the scan's: the injection was the day before
        when -= _dt.timedelta(days=1)
        source += " (the day before the scan)"
    return when, source


# ------------------------------------------------------------------------------------------------ SUV factor
def _number(ds, keyword):
    v = ds.get(keyword, None)
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _agree(headers, keyword, where, number=False):
    """The value of ``keyword`` in the series' first image; InputError when the images disagree."""
    seen = {}
    for _, ds in headers:
        v = _number(ds, keyword) if number else _text(ds, keyword).upper()
        seen.setdefault(v, ds)
    values = list(seen)
    if len(values) > 1:
        if number and all(v is not None for v in values) and max(values) - min(values) <= 1e-6 * max(map(abs, values)):
            return values[0]
        values.sort(key=lambda v: (v in (None, ""), v or 0) if number else v)
        shown = ", ".join("missing" if v in (None, "") else f"{v:g}" if number else v for v in values[:4])
        raise InputError(f"{where}: {keyword} differs between the images of the series ({shown}); one value is "
                         "needed for SUV")
    return values[0]


def suv_from_headers(headers, where="PET DICOM series"):
    """The SUVbw factor of one PET series from its headers ([(path, pydicom dataset)]), with what it came from:
    ``{"suv_factor", "units", "weight_kg", "injected_dose_bq", "half_life_s", "decay_correction", "decay_time_s",
    "decay_factor", "decayed_dose_bq", "injection_time", "reference_time", "reference_time_source"}``
    (times as ISO text; the date is 2000-01-02 when the series gives none). Rules: the module docstring."""
    from .units import suv_factor
    first = headers[0][1]
    units = _agree(headers, "Units", where)
    info = {"units": units or None, "weight_kg": None, "injected_dose_bq": None, "half_life_s": None,
            "decay_correction": None, "decay_time_s": None, "decay_factor": None, "decayed_dose_bq": None,
            "injection_time": None, "reference_time": None, "reference_time_source": None}
    if units == "GML":
        suv_type = _text(first, "SUVType").upper()
        if suv_type and suv_type != "BW":
            raise InputError(f"{where}: Units GML with SUVType {suv_type}; the models expect SUV normalised by body "
                             "weight (SUVType BW)")
        return dict(info, suv_factor=1.0)
    weight = _agree(headers, "PatientWeight", where, number=True)
    decay_corr = _agree(headers, "DecayCorrection", where)
    seq = first.get("RadiopharmaceuticalInformationSequence", None)
    item = seq[0] if seq else None
    needed = {"Units": bool(units), "PatientWeight": bool(weight and weight > 0), "DecayCorrection": bool(decay_corr)}
    if item is not None:
        dose, half = _number(item, "RadionuclideTotalDose"), _number(item, "RadionuclideHalfLife")
        needed["RadionuclideTotalDose"] = bool(dose and dose > 0)
        needed["RadionuclideHalfLife"] = bool(half and half > 0)
        needed["RadiopharmaceuticalStartTime"] = bool(_text(item, "RadiopharmaceuticalStartTime")
                                                      or _text(item, "RadiopharmaceuticalStartDateTime"))
    needed["SeriesTime"] = bool(_text(first, "SeriesTime"))
    if decay_corr == "ADMIN":          # decay-corrected to the injection: no decay time needed
        for k in ("RadionuclideHalfLife", "RadiopharmaceuticalStartTime", "SeriesTime"):
            needed.pop(k, None)
    missing = [k for k in _SUV_TAGS if k in needed and not needed[k]]
    if item is None:
        missing.append("RadiopharmaceuticalInformationSequence (RadionuclideTotalDose, RadionuclideHalfLife, "
                       "RadiopharmaceuticalStartTime)")
    if units and units != "BQML":
        raise InputError(f"{where}: Units {units} are not supported (BQML or GML are); {_HINT}")
    if missing:
        words = [f"{k} is missing or 0" if k in ("PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife")
                 else f"{k} is missing" for k in missing]
        raise InputError(f"{where}: {'; '.join(words)}: {_HINT}")
    corrected = _text(first, "CorrectedImage").upper()
    if decay_corr not in ("START", "ADMIN"):
        raise InputError(f"{where}: DecayCorrection is {decay_corr}: the images are not decay-corrected to one time, "
                         "so each frame would need its own decay correction (FrameReferenceTime, DecayFactor), "
                         f"which PETWorkbench does not do; {_HINT}")
    if corrected and ("ATTN" not in corrected or "DECY" not in corrected):
        lacking = " and ".join(c for c in ("ATTN", "DECY") if c not in corrected)
        raise InputError(f"{where}: CorrectedImage ({corrected.replace(chr(92), ', ')}) lacks {lacking}: the images "
                         "are not attenuation- and decay-corrected, SUV would be meaningless")
    for k in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
              "RadiopharmaceuticalStartDateTime"):
        vals = set()
        for _, ds in headers:
            s = ds.get("RadiopharmaceuticalInformationSequence", None)
            vals.add(_text(s[0], k) if s else "")
        if len(vals) > 1:
            raise InputError(f"{where}: {k} differs between the images of the series ({', '.join(sorted(vals))}); "
                             "one value is needed for SUV")
    info.update(weight_kg=weight, injected_dose_bq=dose, decay_correction=decay_corr)
    if decay_corr == "ADMIN":
        decay = 1.0
        info.update(decay_time_s=0.0, reference_time_source="injection (DecayCorrection ADMIN)")
    else:
        scan_when, dated, source = _scan_time(headers, first, where)
        inject_when, inject_source = _injection_time(item, scan_when, dated, where)
        decay_s = (scan_when - inject_when).total_seconds()
        decay = 2.0 ** (-decay_s / half)
        info.update(half_life_s=half, decay_time_s=decay_s, injection_time=inject_when.isoformat(),
                    reference_time=scan_when.isoformat(), reference_time_source=source,
                    injection_time_source=inject_source)
    info.update(decay_factor=decay, decayed_dose_bq=dose * decay, suv_factor=suv_factor(weight, dose, decay))
    return info


def suv_factor_of_files(files, where=None):
    """SUVbw factor of the PET series made of ``files`` (headers only, no voxels): the dict of
    :func:`suv_from_headers` plus ``series_uid`` and ``slices``. For the Slicer side, where a volume loaded from the
    DICOM database names its files."""
    files = [Path(f) for f in files]
    if not files:
        raise InputError("No DICOM files given for the PET series")
    where = where or f"PET DICOM series {files[0].parent}"
    for f in files:
        if not f.is_file():
            raise InputError(f"{where}: the file {f} is missing (moved or deleted from the DICOM database?)")
    headers, unreadable = _headers(files)
    if unreadable or not headers:
        raise InputError(f"{where}: {unreadable or len(files)} of its {len(files)} files cannot be read as DICOM")
    uid, items = _one_pet_series(headers, where)
    return dict(suv_from_headers(items, where), series_uid=uid, slices=len(items))


# ------------------------------------------------------------------------------------------------ geometry, voxels
def _vector(ds, keyword, n, where, path):
    v = ds.get(keyword, None)
    try:
        out = [float(x) for x in v]
    except (TypeError, ValueError):
        out = []
    if len(out) != n:
        raise InputError(f"{where}: {keyword} is missing or malformed in {path.name}; the geometry cannot be built")
    return out


def _geometry(items, where):
    """(sorted items, origin, spacing (x, y, z), direction (row-major 3x3), rows, columns) in LPS."""
    import numpy as np
    first_path, first = items[0]
    iop = np.array(_vector(first, "ImageOrientationPatient", 6, where, first_path))
    ps = _vector(first, "PixelSpacing", 2, where, first_path)
    rows, cols = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    for path, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"{where}: {path.name} is a multi-frame image (NumberOfFrames "
                             f"{ds.get('NumberOfFrames')}); only single-frame PET series are read")
        if not np.allclose(_vector(ds, "ImageOrientationPatient", 6, where, path), iop, atol=1e-4):
            raise InputError(f"{where}: ImageOrientationPatient differs between images ({path.name}); the series is "
                             "not one volume")
        if not np.allclose(_vector(ds, "PixelSpacing", 2, where, path), ps, rtol=1e-4, atol=1e-6):
            raise InputError(f"{where}: PixelSpacing differs between images ({path.name}); the series is not one "
                             "volume")
        if (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) != (rows, cols):
            raise InputError(f"{where}: the image size differs between images ({path.name}: "
                             f"{ds.get('Rows')} x {ds.get('Columns')}, others {rows} x {cols})")
    if rows < 1 or cols < 1 or min(ps) <= 0:
        raise InputError(f"{where}: Rows, Columns or PixelSpacing is missing or 0")
    r, c = iop[:3], iop[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise InputError(f"{where}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    n = np.cross(r, c)
    positions = {path: np.array(_vector(ds, "ImagePositionPatient", 3, where, path)) for path, ds in items}
    ordered = sorted(items, key=lambda it: float(positions[it[0]] @ n))
    if len(ordered) < 2:
        raise InputError(f"{where} has one image; a 3D volume (at least 2 slices) is needed")
    z = np.array([positions[p] @ n for p, _ in ordered])
    steps = np.diff(z)
    if steps.min() < 1e-3:
        i = int(np.argmin(steps))
        raise InputError(f"{where}: {ordered[i][0].name} and {ordered[i + 1][0].name} lie at the same position: a "
                         "dynamic or gated series (several frames per position) is not one volume")
    dz = float(np.median(steps))
    if np.abs(steps - dz).max() > max(1e-2 * dz, 1e-3):
        i = int(np.argmax(np.abs(steps - dz)))
        raise InputError(f"{where}: the slices are not evenly spaced ({steps[i]:.3g} mm between "
                         f"{ordered[i][0].name} and {ordered[i + 1][0].name}, {dz:.3g} mm elsewhere): a slice is "
                         "missing or the series is not one volume")
    p0 = positions[ordered[0][0]]
    for (path, _), zi in zip(ordered, z):
        offset = positions[path] - p0 - (zi - z[0]) * n
        if np.linalg.norm(offset) > max(1e-2 * dz, 1e-2):
            raise InputError(f"{where}: the slice positions do not lie along the slice normal ({path.name} is "
                             f"{np.linalg.norm(offset):.3g} mm off: gantry tilt?); such series are not read")
    direction = np.stack([r, c, n], axis=1)          # columns: x (along a row), y (down the columns), slice normal
    return ordered, p0.tolist(), (float(ps[1]), float(ps[0]), dz), direction.reshape(-1).tolist(), rows, cols


def _pixels(path, ds_header, where):
    import numpy as np
    import pydicom
    try:
        ds = pydicom.dcmread(str(path), force=True)
        a = ds.pixel_array
    except OSError as e:
        raise InputError(f"{where}: {path.name} cannot be read: {os_error_reason(e)}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated data, unknown compression: the image is not usable
        ts = getattr(getattr(ds_header, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(ts, "name", ts) or "unknown transfer syntax"
        raise InputError(f"{where}: the pixel data of {path.name} cannot be decoded ({name}; "
                         f"{type(e).__name__}: {str(e)[:120]}); a truncated file or a compression pydicom cannot "
                         "decode here") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or a.ndim != 2:
        raise InputError(f"{where}: {path.name} is not a single grey-value image (PhotometricInterpretation "
                         f"{ds.get('PhotometricInterpretation')}, shape {a.shape})")
    slope = _number(ds, "RescaleSlope")
    intercept = _number(ds, "RescaleIntercept")
    # MONOCHROME1 only says how to display the values: the stored values keep their meaning (not inverted here)
    return a.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)


def read_pet_dicom(folder, what="PET", *, series_uid=None, voxel_limit=None):
    """(SimpleITK float32 image in SUVbw, info) from the PET DICOM series in ``folder`` (its files, not sub-folders).

    ``series_uid`` chooses a series when the folder holds several (otherwise refused, naming them).
    ``voxel_limit(spacing) -> (max voxels, why)`` is the engine's memory bound, applied from the headers before any
    voxel is read (as :func:`PETWorkbenchLib.imageio.read_image`). ``info``: the dict of :func:`suv_from_headers`
    plus ``folder``, ``series_uid``, ``series_description``, ``slices``, ``size``, ``spacing``.
    """
    import numpy as np
    import SimpleITK as sitk
    folder = Path(folder)
    where = f"{what} DICOM series {folder}"
    if not folder.is_dir():
        raise InputError(f"{what} DICOM folder not found: {folder}")
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as e:
        raise InputError(f"{where} cannot be listed: {os_error_reason(e)}") from None
    headers, unreadable = _headers(files)
    if not headers:
        raise InputError(f"{what} {folder} is a DICOM folder, but none of its {len(files)} files can be read as a "
                         "DICOM image (damaged or incomplete copy?)")
    uid, items = _one_pet_series(headers, where, series_uid)
    expected = int(_number(items[0][1], "NumberOfSlices") or 0)
    if int(_number(items[0][1], "NumberOfTimeSlices") or 1) > 1:
        raise InputError(f"{where}: a dynamic series (NumberOfTimeSlices {items[0][1].get('NumberOfTimeSlices')}); "
                         "one static volume is needed")
    if expected and expected != len(items):
        raise InputError(f"{where} is incomplete: NumberOfSlices says {expected}, the folder holds {len(items)} "
                         "images of the series")
    suv = suv_from_headers(items, where)
    ordered, origin, spacing, direction, rows, cols = _geometry(items, where)
    size = (cols, rows, len(ordered))
    nvox = math.prod(size)
    max_voxels, why = voxel_limit(spacing) if voxel_limit else (None, "")
    if max_voxels is not None and nvox > max_voxels:
        raise InputError(f"{where} is too large: {' x '.join(map(str, size))} = {nvox:,} voxels, the limit is "
                         f"{int(max_voxels):,} ({why}); crop it or resample it to a coarser grid first")
    try:
        volume = np.empty((len(ordered), rows, cols), np.float32)
        for k, (path, ds) in enumerate(ordered):
            a = _pixels(path, ds, where)
            if a.shape != (rows, cols):
                raise InputError(f"{where}: the pixel data of {path.name} is {a.shape[0]} x {a.shape[1]}, its "
                                 f"header says {rows} x {cols}")
            volume[k] = a * suv["suv_factor"]
    except MemoryError:
        raise ResourceError(f"Not enough memory to read {where} ({nvox:,} voxels)") from None
    bad = int(volume.size - np.count_nonzero(np.isfinite(volume)))
    if bad:
        raise InputError(f"{where} contains {bad} NaN or infinite voxel values")
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    info = dict(suv, folder=str(folder), series_uid=uid, slices=len(ordered), size=list(size), spacing=list(spacing),
                series_description=_text(items[0][1], "SeriesDescription"), unreadable_files=unreadable)
    return image, info


# ------------------------------------------------------------------------------------------------ the PET input
OPTION_NAMES = {"units": "--units", "weight_kg": "--weight-kg", "injected_dose_mbq": "--injected-dose-mbq",
                "decay_factor": "--decay-factor"}


def units_conflicts(info, units=None, weight_kg=None, injected_dose_mbq=None, decay_factor=1.0, names=None):
    """The units options (as a :class:`~PETWorkbenchLib.units.PETUnits` request has them) that contradict the tags
    of a PET DICOM series (``info`` of :func:`suv_from_headers`), in words naming each option (``names``: how to
    call them, the command-line options by default) and what the tags say; [] when none does. Options left at
    their defaults (SUV, no weight, no dose, decay factor 1) contradict nothing."""
    from .units import normalise_units
    names = dict(OPTION_NAMES, **(names or {}))
    out = []
    series_units = normalise_units(info["units"])
    if normalise_units(units or "SUV") == "BQML" and series_units == "SUV":
        out.append(f"{names['units']} {units} (the series is in SUV: Units {info['units']})")
    if series_units != "BQML":
        return out
    close = lambda a, b, rel=0.01: abs(a - b) <= rel * abs(b)
    decay = float(decay_factor or 1.0)
    if weight_kg and not close(float(weight_kg), info["weight_kg"]):
        out.append(f"{names['weight_kg']} {float(weight_kg):g} (PatientWeight {info['weight_kg']:g} kg)")
    if injected_dose_mbq:
        if not close(float(injected_dose_mbq) * 1e6 * decay, info["decayed_dose_bq"]):
            out.append(f"{names['injected_dose_mbq']} {float(injected_dose_mbq):g} x {names['decay_factor']} "
                       f"{decay:g} (the tags give RadionuclideTotalDose {info['injected_dose_bq'] / 1e6:.4g} MBq x "
                       f"decay {info['decay_factor']:.4g} = {info['decayed_dose_bq'] / 1e6:.4g} MBq)")
    elif decay != 1.0 and not close(decay, info["decay_factor"]):
        out.append(f"{names['decay_factor']} {decay:g} (the tags give {info['decay_factor']:.4g})")
    return out


def read_pet(path, what="PET", args=None, *, voxel_limit=None):
    """The PET input of a command: (image in SUV checked by :func:`~PETWorkbenchLib.units.check_pet_image`, factor
    SUV per input unit, units of the input).

    An image file is read with :func:`~PETWorkbenchLib.imageio.read_image` and converted with the units options of
    ``args`` (a :class:`~PETWorkbenchLib.units.PETUnits` request or namespace; None: SUV). A folder holding a PET
    DICOM series is read with :func:`read_pet_dicom`, its SUV from its tags; units options in ``args`` that
    contradict the tags are refused, naming them. ``voxel_limit`` as in :func:`read_pet_dicom`.
    """
    from .imageio import is_dicom_folder, read_image
    from .units import check_pet_image, normalise_units, pet_in_suv
    if path is None or str(path) == "":
        raise InputError(f"{what} not found: no file or DICOM folder given")
    p = Path(path)
    name = f"{what} {p.name}"
    if p.is_dir() and is_dicom_folder(p):
        image, info = read_pet_dicom(p, what, voxel_limit=voxel_limit)
        wrong = [] if args is None else units_conflicts(
            info, args.units, args.weight_kg, args.injected_dose_mbq, args.decay_factor)
        if wrong:
            raise InputError(f"{what} DICOM series {p}: the SUV comes from its tags, and these options contradict "
                             f"them: {'; '.join(wrong)}. Leave the units options out for DICOM input")
        return check_pet_image(image, name), info["suv_factor"], normalise_units(info["units"])
    image = read_image(p, what, voxel_limit=voxel_limit)
    if args is None:
        return check_pet_image(image, name), 1.0, "SUV"
    image, factor = pet_in_suv(image, args, name)
    return image, factor, args.units


def is_pet_dicom_input(path):
    """True for a folder that :func:`read_pet` reads as a DICOM series."""
    from .imageio import is_dicom_folder
    p = Path(path)
    return p.is_dir() and is_dicom_folder(p)


def series_fingerprint(folder):
    """SHA-256 (hex) of the files of a DICOM folder: names and contents, in name order."""
    import hashlib
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()

