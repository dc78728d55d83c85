"""Image-domain low-dose simulation for users who only have a reconstructed PET image.

forward-project (with attenuation from a CT when given, PSF) -> scale to a count level -> Poisson sample
(the "measured" full-dose data) -> binomial thinning by the DRF -> the same OSEM for both.  Deterministic for a
given seed.  The outputs are in the units of the input image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.progress import Reporter

from .lowdose import check_drf, thin_counts
from .osem import osem, sensitivity
from .projector import PETSystem

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["simulate_lowdose_image", "square_pixel_reference"]


def square_pixel_reference(img: sitk.Image) -> sitk.Image:
    """A grid like ``img`` but with square in-plane pixels (the smaller of the x/y spacings)."""
    sx, sy, sz = img.GetSpacing()
    if abs(sx - sy) <= 1e-3 * sx:
        return img
    s = min(sx, sy)
    size = [int(round(img.GetSize()[0] * sx / s)), int(round(img.GetSize()[1] * sy / s)), img.GetSize()[2]]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing((s, s, sz))
    ref.SetDirection(img.GetDirection())
    ref.SetOrigin(img.TransformContinuousIndexToPhysicalPoint((-0.5 + s / sx / 2, -0.5 + s / sy / 2, 0)))
    return ref


def simulate_lowdose_image(img: sitk.Image, drf: float, ct: sitk.Image | None = None, counts_per_cm: float = 2.0e6,
                           psf_fwhm_mm: float = 4.0, n_iter: int = 3, n_subsets: int = 8,
                           post_filter_mm: float = 0.0, seed: int = 0, device: str | torch.device = "cpu",
                           progress: Callable[[float, str], None] | None = None,
                           cancel: Callable[[], bool] | None = None) -> dict:
    """Low-dose version of a PET image at dose reduction factor ``drf`` (and the matching re-simulated full dose).

    Returns dict(low_dose=Image, full_dose=Image, prompts=float, prompts_low=float).
    """
    rep = Reporter(progress, cancel)
    d = check_drf(drf)
    if not isinstance(img, sitk.Image):
        raise InputError("the PET input must be a SimpleITK image")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"the PET input must be a 3D scalar volume, got {img.GetDimension()}D with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    if not counts_per_cm > 0:
        raise InputError(f"count level must be > 0, got {counts_per_cm}")
    ref = square_pixel_reference(img)
    pet = sitk.Cast(img, sitk.sitkFloat32) if ref is img else \
        sitk.Resample(sitk.Cast(img, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    a = sitk.GetArrayFromImage(pet).astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise InputError("the PET image contains NaN or infinite values")
    a = np.clip(a, 0, None)
    if float(a.sum()) <= 0:
        raise InputError("the PET image has no positive activity (zero counts)")
    mu = None
    if ct is not None:
        from .simulate import hu_to_mu
        ct_r = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), pet, sitk.Transform(), sitk.sitkLinear, -1000.0)
        mu = hu_to_mu(sitk.GetArrayFromImage(ct_r))
    sp = pet.GetSpacing()
    system = PETSystem(a.shape, (sp[2], sp[1], sp[0]), psf_fwhm_mm=psf_fwhm_mm, mu=mu,
                       n_subsets=n_subsets, device=device)
    rep(0.05, "forward projection")
    ybar = system.forward(torch.from_numpy(a))
    counts = counts_per_cm * a.shape[0] * sp[2] / 10.0
    scale = counts / float(ybar.sum())
    rng = np.random.default_rng(seed)
    prompts = torch.from_numpy(rng.poisson((ybar * scale).double().cpu().numpy()).astype(np.float32))
    low = thin_counts(prompts, d, rng)
    sens = sensitivity(system)
    kw = dict(n_iter=n_iter, post_filter_fwhm_mm=post_filter_mm, sens=sens)
    full = osem(system, prompts, progress=rep.sub(0.1, 0.55), **kw) / scale
    lowr = osem(system, low, progress=rep.sub(0.55, 1.0), **kw) * (d / scale)

    def back(arr):
        im = sitk.GetImageFromArray(arr.cpu().numpy().astype(np.float32))
        im.CopyInformation(pet)
        if ref is not img:
            im = sitk.Resample(im, img, sitk.Transform(), sitk.sitkLinear, 0.0)
        return im

    return dict(low_dose=back(lowr), full_dose=back(full), prompts=float(prompts.sum()), prompts_low=float(low.sum()))
