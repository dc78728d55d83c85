"""The local intensity mapping used before multi-modal registration (RegistrationModuleLib.intensity)."""

import numpy as np
import pytest
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError
from RegistrationModuleLib.intensity import local_intensity_map


def _image(a, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(a.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _two_halves():
    """A 'CT' with two tissues (values 0 and 1) in a checkerboard of blocks, and a 'PET' that gives tissue 1 the
    uptake 5 in the left half and 1 in the right half (same density, different uptake), tissue 0 the uptake 2."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in (24, 24, 48)], indexing="ij")
    tissue = (((z // 4) + (y // 4) + (x // 4)) % 2).astype(np.float64)
    pet = np.where(tissue > 0, np.where(x < 24, 5.0, 1.0), 2.0)
    return tissue, pet


def test_local_mapping_gives_same_density_tissues_their_local_uptake():
    tissue, pet = _two_halves()
    out = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), _image(pet), bins=2, sigma_mm=8.0))
    far_left, far_right = (slice(None), slice(None), slice(0, 12)), (slice(None), slice(None), slice(36, 48))
    # away from the middle the mapped CT reproduces the PET: tissue 1 is 5 on the left and 1 on the right
    assert np.abs(out[far_left] - pet[far_left]).max() < 0.05
    assert np.abs(out[far_right] - pet[far_right]).max() < 0.05
    # a global mapping (one neighbourhood for the whole image) cannot: it gives tissue 1 its mean uptake, 3
    glob = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), _image(pet), bins=2, sigma_mm=1e4))
    assert np.abs(glob[tissue > 0] - 3.0).max() < 0.05


def test_soft_bins_follow_a_nonlinear_relation_between_the_bin_centres():
    # a smooth "CT" whose intensity the "PET" follows through a non-monotonic curve: 16 soft bins reproduce it to
    # the interpolation error between bin centres, a hard binning or a wrong membership would not
    z, y, x = np.meshgrid(*[np.arange(n) for n in (16, 20, 60)], indexing="ij")
    ct = 1000.0 * (x / 59.0) + 5.0 * np.sin(y / 3.0)
    g = lambda v: np.sin(2.5 * np.pi * v / 1000.0) + (v / 1000.0) ** 2
    out = sitk.GetArrayFromImage(local_intensity_map(_image(ct), _image(g(ct)), bins=16, sigma_mm=1e4))
    inner = (x >= 3) & (x <= 56)                     # away from the clipped 1 % at either end
    err = np.abs(out - g(ct))[inner]
    # bound: linear interpolation between bin centres (g'' h^2 / 8, h = 1/15) plus the triangle average
    # (g'' h^2 / 12): about 0.06 for |g''| <= 64
    assert err.max() < 0.07 and err.mean() < 0.03
    hard = sitk.GetArrayFromImage(local_intensity_map(_image(ct), _image(g(ct)), bins=4, sigma_mm=1e4))
    assert np.abs(hard - g(ct))[inner].max() > 3 * err.max()     # fewer bins: visibly coarser


def test_only_what_the_moving_image_covers_estimates_the_mapping():
    tissue, pet = _two_halves()
    # the moving image covers the left half of the fixed grid only (physical placement, not the array index)
    moving = _image(pet[:, :, :24], origin=(0.0, 0.0, 0.0))
    out = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), moving, bins=2, sigma_mm=8.0))
    assert np.all(out[:, :, 25:] == 0)                             # not covered: 0
    assert np.abs(out[:, :, :12] - pet[:, :, :12]).max() < 0.05
    shifted = _image(pet[:, :, 24:], origin=(48.0, 0.0, 0.0))      # the right half, placed at x = 48 mm
    out = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), shifted, bins=2, sigma_mm=8.0))
    assert np.all(out[:, :, :24] == 0) and np.abs(out[:, :, 36:] - pet[:, :, 36:]).max() < 0.05


def test_nan_outside_the_mask_does_not_spread():
    tissue, pet = _two_halves()
    mask = np.zeros(tissue.shape, bool)
    mask[:, :, 8:40] = True
    pet[:, :, :4] = np.nan
    out = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), _image(pet), mask=mask, bins=2,
                                                     sigma_mm=8.0))
    assert np.isfinite(out).all()
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    label.SetSpacing((2.0, 2.0, 2.0))
    out2 = sitk.GetArrayFromImage(local_intensity_map(_image(tissue), _image(pet), mask=label, bins=2,
                                                      sigma_mm=8.0))
    assert np.array_equal(out, out2)                                # a label map works as the mask too


def test_mapping_is_on_the_fixed_grid_and_zero_outside_the_mask():
    tissue, pet = _two_halves()
    fixed = _image(tissue, spacing=(2.0, 2.0, 2.0))
    moving = _image(pet[::2, ::2, ::2], spacing=(4.0, 4.0, 4.0), origin=(1.0, 1.0, 1.0))   # another grid
    mask = np.zeros(tissue.shape, bool)
    mask[4:20, 4:20, 4:44] = True
    out = local_intensity_map(fixed, moving, mask=mask, bins=4, sigma_mm=10.0)
    assert out.GetSize() == fixed.GetSize() and out.GetSpacing() == fixed.GetSpacing()
    a = sitk.GetArrayFromImage(out)
    assert np.all(a[~mask] == 0) and np.isfinite(a).all() and a[mask].max() > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"bins": 1}, "bins"),
    ({"sigma_mm": 0.0}, "sigma_mm"),
    ({"mask": np.zeros((24, 24, 48), bool)}, "empty"),
    ({"mask": np.ones((3, 3, 3), bool)}, "does not match"),
])
def test_bad_arguments_get_one_clear_message(kwargs, message):
    tissue, pet = _two_halves()
    with pytest.raises(InputError, match=message):
        local_intensity_map(_image(tissue), _image(pet), **kwargs)


def test_nan_and_dimension_mismatch_are_named():
    tissue, pet = _two_halves()
    pet[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        local_intensity_map(_image(tissue), _image(pet))
    with pytest.raises(InputError, match="2D"):
        local_intensity_map(_image(tissue), sitk.GetImageFromArray(pet[0].astype(np.float32)))
