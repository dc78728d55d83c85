"""Image metrics every engine reports, defined once.

* ``psnr``: 10 log10(R^2 / MSE) with R = max of the reference unless ``data_range`` is given (PET in SUV, whose
  minimum is 0: the convention of DRMC and of our tables); CT callers pass the HU range they mean.
* ``ssim``: Gaussian-window SSIM (sigma 1.5, truncated at 3.5 sigma), C1 = (0.01 R)^2, C2 = (0.03 R)^2.
* Surface distances: the surface of a mask is the set of its voxels with at least one face-neighbour outside it;
  distances in mm with the voxel spacing. HD95 = max of the two directed 95th percentiles (MONAI's
  ``compute_hausdorff_distance`` with percentile 95); ASD = mean of all distances from both surfaces.
"""

import numpy as np
from scipy import ndimage

from .errors import InputError


def _pair(pred, ref, mask=None):
    pred = np.asarray(pred, np.float64)
    ref = np.asarray(ref, np.float64)
    if pred.shape != ref.shape:
        raise InputError(f"estimate shape {pred.shape} differs from reference shape {ref.shape}")
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    return pred, ref


def _range(ref, data_range, what):
    r = float(ref.max()) if data_range is None else float(data_range)
    if r <= 0:
        raise InputError(f"reference image is empty (maximum <= 0); {what} undefined")
    return r


def psnr(pred, ref, data_range=None, mask=None):
    """PSNR (dB) of ``pred`` against ``ref`` (inside ``mask`` when given); inf when they are equal."""
    pred, ref = _pair(pred, ref, mask)
    r = _range(ref, data_range, "PSNR")
    mse = float(np.mean((pred - ref) ** 2))
    return float("inf") if mse == 0 else float(10.0 * np.log10(r * r / mse))


def ssim(pred, ref, data_range=None, sigma=1.5):
    pred, ref = _pair(pred, ref)
    r = _range(ref, data_range, "SSIM")
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    f = lambda a: ndimage.gaussian_filter(a, sigma, truncate=3.5)
    mx, my = f(pred), f(ref)
    sxx = f(pred * pred) - mx * mx
    syy = f(ref * ref) - my * my
    sxy = f(pred * ref) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())


def surface(mask):
    """Voxels of a boolean mask with a face-neighbour outside it (any dimension)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def surface_distances(pred, ref, spacing=None):
    """(distances from pred's surface to ref's, from ref's surface to pred's), in mm with ``spacing`` (array
    order); both masks must be non-empty."""
    sp, sr = surface(pred), surface(ref)
    dt_ref = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dt_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dt_ref[sp], dt_pred[sr]


def hd95_asd(pred, ref, spacing=None):
    """(HD95, ASD) in mm of two non-empty masks (conventions in the module docstring). The distance transforms run
    on the joint bounding box plus one voxel, which gives the same distances with far less work."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    idx = np.argwhere(pred | ref)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = idx.max(0) + 2
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    d_pr, d_rp = surface_distances(np.pad(pred[sl], 1), np.pad(ref[sl], 1), spacing)
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    asd = (d_pr.sum() + d_rp.sum()) / (len(d_pr) + len(d_rp))
    return float(hd95), float(asd)
