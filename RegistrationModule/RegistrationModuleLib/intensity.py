"""Locally estimated intensity mapping of one modality onto another, for multi-modal registration.

:func:`local_intensity_map` replaces every voxel of the fixed image (e.g. a CT) by the *local conditional mean*
of the moving image (e.g. a PET) given the fixed image's intensity: the fixed intensities are split into ``bins``
soft (triangular) bins over their 1-99 % range inside the mask, and for each bin the moving image's mean over the
voxels of that bin is estimated within a Gaussian neighbourhood of ``sigma_mm`` (normalised convolution).  The
result lies on the fixed grid, keeps the fixed image's edges (it is a function of the fixed intensity at each
voxel) and takes the moving image's contrast between them.  A global mapping cannot give a CT the PET's contrast
where tissues of the same density take up different amounts of tracer (liver and muscle); a local one can, as far
as the bins separate them in each neighbourhood.  It is the conditional-expectation step of intensity-corrected
registration (Guimond et al., Med Image Anal 2001; Roche et al.'s correlation ratio), estimated locally; it is our
addition, not part of the registration papers the engine follows (``METHOD.md`` §5 records what it bought).

The mapping is estimated once, before the registration, with the images as they are (the misalignment that the
registration removes is a few mm against a ``sigma_mm`` neighbourhood of several cm).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError


def _smooth(a: np.ndarray, ref: sitk.Image, sigma_mm: float) -> np.ndarray:
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.CopyInformation(ref)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm))).astype(np.float64)


def local_intensity_map(fixed: sitk.Image, moving: sitk.Image, mask: np.ndarray | sitk.Image | None = None,
                        bins: int = 16, sigma_mm: float = 20.0) -> sitk.Image:
    """The fixed image mapped to the moving image's intensities by their local conditional mean.

    ``fixed``, ``moving``: scalar SimpleITK images of the same dimension (the moving one is resampled onto the
    fixed grid, linearly, zero outside it); ``mask``: numpy array on the fixed grid (array order) or a label map
    on it, the region whose voxels estimate the mapping (default: all voxels of the fixed image that the moving
    image covers). Returns a float32 image on the fixed grid; outside the mask, and where the moving image does not
    cover the fixed grid, it is 0 (the registration excludes points outside the moving image by itself).
    Where a bin has (almost) no voxel in a neighbourhood, the bin's mean over the whole region is used.
    """
    if bins < 2:
        raise InputError(f"bins must be at least 2, got {bins}")
    if not (sigma_mm > 0 and np.isfinite(sigma_mm)):
        raise InputError(f"sigma_mm must be a finite number > 0, got {sigma_mm}")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"fixed image is {fixed.GetDimension()}D and moving image is {moving.GetDimension()}D")
    f = sitk.GetArrayFromImage(fixed).astype(np.float64)
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    covered = sitk.Resample(ones, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    m = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), fixed, sitk.Transform(),
                                             sitk.sitkLinear, 0.0)).astype(np.float64)
    region = sitk.GetArrayFromImage(covered) > 0
    if isinstance(mask, sitk.Image):
        mask = sitk.GetArrayFromImage(mask)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != f.shape:
            raise InputError(f"mask shape {mask.shape} does not match the fixed image {f.shape}")
        region &= mask > 0
    if not region.any():
        raise InputError("the mask (or the part of the fixed image the moving image covers) is empty")
    if not (np.isfinite(f[region]).all() and np.isfinite(m[region]).all()):
        raise InputError("the images contain NaN or infinite values inside the mask")
    lo, hi = np.percentile(f[region], [1.0, 99.0])
    # values outside the region take no part (a NaN there must not spread through the smoothing)
    f = np.where(region, f, lo)
    m = np.where(region, m, 0.0)
    t = np.clip((f - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * (bins - 1)
    w = region.astype(np.float64)
    out = np.zeros_like(f)
    for k in range(bins):
        member = np.clip(1.0 - np.abs(t - k), 0.0, 1.0)          # triangular memberships, summing to 1
        if not member[region].any():
            continue
        # the smoothing preserves constants, so ``count`` is the bin's share of the neighbourhood (0..1)
        count = _smooth(member * w, fixed, sigma_mm)
        total = _smooth(member * w * m, fixed, sigma_mm)
        overall = float((member * w * m).sum() / (member * w).sum())
        out += member * np.where(count > 1e-6, total / np.maximum(count, 1e-6), overall)
    out[~region] = 0.0
    img = sitk.GetImageFromArray(out.astype(np.float32))
    img.CopyInformation(fixed)
    return img
