"""Images, units, resampling and multi-centre patch sampling for DRMC.

Intensity normalisation (documented in METHOD.md): the network works on SUV (body weight) divided by
``suv_scale`` (config key, default 1.0), after clipping negatives to 0. Volumes are resampled to 2 mm isotropic
(linear interpolation for PET, nearest neighbour for label maps) before patches are drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.manifest import select  # noqa: F401 - the engine's name for it
from PETWorkbenchLib.imageio import resample_to_spacing

TARGET_SPACING = (2.0, 2.0, 2.0)


# ----------------------------------------------------------------------------------------------- resampling
def to_2mm_array(image: sitk.Image, label: bool = False) -> tuple[np.ndarray, sitk.Image]:
    """(array (z, y, x) float32 or int, resampled image) on the 2 mm isotropic grid."""
    if label:
        img = resample_to_spacing(image, TARGET_SPACING, label=True)
        return sitk.GetArrayFromImage(img).astype(np.int32), img
    img = resample_to_spacing(sitk.Cast(image, sitk.sitkFloat32), TARGET_SPACING)
    return sitk.GetArrayFromImage(img).astype(np.float32), img


def normalise(suv: np.ndarray, suv_scale: float = 1.0) -> np.ndarray:
    """SUV / ``suv_scale`` after clipping negatives to 0, as a new float32 array (one copy)."""
    out = np.clip(suv, 0.0, None, dtype=np.float32)
    out /= float(suv_scale)
    return out


# -------------------------------------------------------------------------------------------------- manifest
MANIFEST_REQUIRED = ("case_id", "center", "split", "full_dose", "low_dose")


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a simulated multi-centre manifest.csv (:func:`PETWorkbenchLib.manifest.read_manifest`) with the
    columns DRMC needs."""
    from PETWorkbenchLib.manifest import read_manifest as read
    return read(path, MANIFEST_REQUIRED)


def load_pair_2mm(row: dict, suv_scale: float = 1.0, low_key: str = "low_dose") -> tuple[np.ndarray, np.ndarray]:
    """(low, full) normalised float32 arrays on the 2 mm grid for one manifest row."""
    low, _ = to_2mm_array(sitk.ReadImage(row[low_key]))
    full, _ = to_2mm_array(sitk.ReadImage(row["full_dose"]))
    return normalise(low, suv_scale), normalise(full, suv_scale)


# ------------------------------------------------------------------------------------------- patch sampling
def _crop(arr, start, size):
    z, y, x = start
    sl = arr[z:z + size[0], y:y + size[1], x:x + size[2]]
    if sl.shape != tuple(size):  # volume smaller than the patch along some axis: zero-pad
        pad = [(0, s - n) for s, n in zip(size, sl.shape)]
        sl = np.pad(sl, pad)
    return sl


class CenterPatchSampler:
    """Random patches per centre: ``sample(center, batch, rng) -> (low, full)`` of shape (B, 1, p, p, p).

    Patches are drawn uniformly from the volume (the paper). With ``lesion_oversample`` = q > 0, a fraction q of
    the patches is instead placed so that it contains a random lesion voxel (position inside the patch uniform),
    as nnU-Net oversamples foreground: a deviation for short CPU budgets, where uniform 32^3 patches rarely
    contain one of the few lesions and the model learns to flatten them (SUVmax bias).
    """

    def __init__(self, volumes_by_center: dict, patch_size, lesion_oversample=0.0, lesions_by_center=None):
        if not volumes_by_center:
            raise InputError("no training volumes")
        if not 0.0 <= float(lesion_oversample) <= 1.0:
            raise InputError(f"lesion_oversample must be in [0, 1], got {lesion_oversample}")
        self.volumes = volumes_by_center  # center -> list of (low, full) arrays
        self.patch = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        self.centers = sorted(volumes_by_center)
        self.lesion_oversample = float(lesion_oversample)
        # center -> list (per volume) of lesion voxel coordinates (n, 3), or None
        self.lesions = lesions_by_center or {}

    def _start(self, shape, rng, vox=None):
        if vox is None:
            return [int(rng.integers(0, max(1, n - p + 1))) for n, p in zip(shape, self.patch)]
        return [int(np.clip(v - rng.integers(0, p), 0, max(0, n - p))) for v, n, p in zip(vox, shape, self.patch)]

    def sample(self, center, batch, rng):
        vols = self.volumes[center]
        lows, fulls = [], []
        for _ in range(batch):
            i = int(rng.integers(len(vols)))
            low, full = vols[i]
            vox = None
            les = self.lesions.get(center)
            if self.lesion_oversample > 0 and rng.random() < self.lesion_oversample and les and len(les[i]):
                vox = les[i][rng.integers(len(les[i]))]
            start = self._start(low.shape, rng, vox)
            lows.append(_crop(low, start, self.patch))
            fulls.append(_crop(full, start, self.patch))
        return np.stack(lows)[:, None], np.stack(fulls)[:, None]

    @classmethod
    def from_manifest(cls, rows, patch_size, suv_scale=1.0, progress=None, lesion_oversample=0.0):
        vols, lesions = {}, {}
        for i, r in enumerate(rows):
            if progress:
                progress(i / max(1, len(rows)), f"loading {r['case_id']}")
            vols.setdefault(r["center"], []).append(load_pair_2mm(r, suv_scale))
            if lesion_oversample > 0:
                coords = np.zeros((0, 3), dtype=np.int64)
                if r.get("lesions") and Path(r["lesions"]).is_file():
                    lab, _ = to_2mm_array(sitk.ReadImage(r["lesions"]), label=True)
                    coords = np.argwhere(lab > 0)
                    if lab.shape != vols[r["center"]][-1][0].shape:
                        raise InputError(f"lesion map of {r['case_id']} is not on the PET grid")
                lesions.setdefault(r["center"], []).append(coords)
        return cls(vols, patch_size, lesion_oversample, lesions)
