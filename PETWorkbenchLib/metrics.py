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


# ------------------------------------------------------------------------------------------- uptake measures
# SUVpeak follows PERCIST 1.0 (Wahl et al. 2009): the highest mean SUV in a 1 cm^3 sphere (radius 6.2 mm); the sphere
# centre may be any voxel of the region and the sphere mean uses every image voxel whose centre lies inside it.
PEAK_VOLUME_ML = 1.0
PEAK_RADIUS_MM = (3.0 * PEAK_VOLUME_ML * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)  # 6.2035 mm


def sphere_kernel(spacing_zyx, radius_mm=PEAK_RADIUS_MM):
    """Binary ball of ``radius_mm`` on a (z, y, x) grid of this spacing (voxel centres inside the sphere)."""
    r = [int(np.floor(radius_mm / s)) for s in spacing_zyx]
    zz, yy, xx = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, spacing_zyx)], indexing="ij")
    return (zz ** 2 + yy ** 2 + xx ** 2 <= radius_mm ** 2 + 1e-9).astype(np.float64)


def sphere_mean(pet, spacing_zyx, radius_mm=PEAK_RADIUS_MM):
    """Mean of ``pet`` in a ball of ``radius_mm`` around every voxel (voxels outside the image do not count):
    the map whose maximum over a region is the region's SUVpeak."""
    kernel = sphere_kernel(spacing_zyx, radius_mm)
    pet = np.asarray(pet, dtype=np.float64)
    sums = ndimage.correlate(pet, kernel, mode="constant", cval=0.0)
    counts = ndimage.correlate(np.ones_like(pet), kernel, mode="constant", cval=0.0)
    return sums / counts


def percist_liver_threshold(liver_values):
    """PERCIST 1.0 threshold of measurable lesions: 1.5 x liver SUVmean + 2 x liver SD (Wahl et al. 2009, who
    measure the liver in a 3 cm sphere of the right lobe; here the voxels given, e.g. an eroded liver segment)."""
    v = np.asarray(liver_values, dtype=np.float64)
    if v.size < 2:
        raise InputError("the liver reference region has fewer than 2 voxels; the PERCIST threshold needs a liver")
    return float(1.5 * v.mean() + 2.0 * v.std(ddof=1))
