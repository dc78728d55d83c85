"""Small PET DICOM series written with pydicom for the tests: known Bq/ml voxels, known SUV factor, per-slice
RescaleSlope, files in shuffled order under random names."""

from pathlib import Path

import numpy as np

PET_SOP = "1.2.840.10008.5.1.4.1.1.128"          # PET Image Storage
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"             # CT Image Storage
F18_HALF_LIFE = 6586.2                           # s
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _ds(x):
    """A DS value (at most 16 characters)."""
    return f"{float(x):.10g}"


def stored_volume(shape=(8, 16, 16), seed=0):
    """(stored integers (z, y, x) uint16, per-slice RescaleSlope in Bq/ml per unit): Bq/ml = stored * slope
    exactly, a different slope on every slice."""
    rng = np.random.default_rng(seed)
    stored = rng.integers(50, 400, size=shape).astype(np.uint16)
    stored[2:6, 4:12, 4:12] += 1500                       # a hot region
    slopes = np.array([3.0 + 0.75 * k for k in range(shape[0])])
    return stored, slopes


def suv_factor(weight_kg=75.0, dose_bq=370e6, decay_s=3600.0, half_life_s=F18_HALF_LIFE):
    """The factor the reader must find: weight [g] / dose decayed over ``decay_s``."""
    return weight_kg * 1000.0 / (dose_bq * 2.0 ** (-decay_s / half_life_s))


def write_series(folder, stored=None, slopes=None, *, spacing=(2.0, 2.5, 3.0), origin=(-20.0, -30.0, 100.0),
                 orientation=AXIAL, modality="PT", units="BQML", decay="START", weight="75", dose="370000000",
                 half_life=_ds(F18_HALF_LIFE), start_time="100000", start_datetime=None, series_time="110000",
                 series_date="20240102", acquisition_time="110000", acquisition_date="20240102",
                 series_uid=None, description="PET WB", drop=(), drop_item=(), extra=None, seed=0):
    """Write one series into ``folder`` (created): slice k at ``origin + k * spacing[2] * normal``; PixelSpacing is
    (row spacing, column spacing) = (spacing[1], spacing[0]). String arguments are written as given; None or a name
    in ``drop`` (a dataset keyword) / ``drop_item`` (a RadiopharmaceuticalInformationSequence keyword) leaves the
    tag out. ``extra``: {keyword: value} set on every slice. Returns the file paths (in writing order)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    if stored is None:
        stored, slopes = stored_volume(seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(stored.shape[0])
    paths = []
    for k in order:
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PET_SOP if modality == "PT" else CT_SOP
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        item = Dataset()
        fields = {
            "SOPClassUID": meta.MediaStorageSOPClassUID, "SOPInstanceUID": sop_uid, "Modality": modality,
            "StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "FrameOfReferenceUID": frame_uid,
            "SeriesDescription": description, "PatientName": "Test^PET", "PatientID": "PWB-TEST",
            "PatientWeight": weight, "Units": units, "DecayCorrection": decay, "CorrectedImage": ["ATTN", "DECY"],
            "SeriesDate": series_date, "SeriesTime": series_time, "AcquisitionDate": acquisition_date,
            "AcquisitionTime": acquisition_time, "InstanceNumber": int(stored.shape[0] - k),
            "NumberOfSlices": int(stored.shape[0]),
            "ImageOrientationPatient": [_ds(v) for v in orientation],
            "ImagePositionPatient": [_ds(v) for v in np.array(origin) + k * spacing[2] * n],
            "PixelSpacing": [_ds(spacing[1]), _ds(spacing[0])], "SliceThickness": _ds(spacing[2]),
            "Rows": int(stored.shape[1]), "Columns": int(stored.shape[2]), "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15,
            "PixelRepresentation": 0, "RescaleSlope": _ds(slopes[k]), "RescaleIntercept": "0",
        }
        fields.update(extra or {})
        for key, value in fields.items():
            if value is not None and key not in drop:
                setattr(ds, key, value)
        for key, value in (("RadionuclideTotalDose", dose), ("RadionuclideHalfLife", half_life),
                           ("RadiopharmaceuticalStartTime", start_time),
                           ("RadiopharmaceuticalStartDateTime", start_datetime)):
            if value is not None and key not in drop_item:
                setattr(item, key, value)
        if "RadiopharmaceuticalInformationSequence" not in drop:
            ds.RadiopharmaceuticalInformationSequence = Sequence([item])
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()
        path = folder / f"{rng.integers(1 << 40):012x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_geometry(shape=(8, 16, 16), spacing=(2.0, 2.5, 3.0), origin=(-20.0, -30.0, 100.0), orientation=AXIAL):
    """(origin, spacing, direction row-major) a correct reader gives for :func:`write_series`."""
    r, c = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(r, c)
    return tuple(origin), tuple(spacing), tuple(np.stack([r, c, n], axis=1).reshape(-1))


def decay_seconds(start="100000", scan="110000"):
    """Seconds between two DICOM times of day (``scan`` later, possibly the next day)."""
    s = lambda t: int(t[:2]) * 3600 + int(t[2:4]) * 60 + float(t[4:])
    d = s(scan) - s(start)
    return d if d >= 0 else d + 86400

