"""Similarity terms (losses, lower is better), all with an optional voxel weight map (masks).

* ``lncc``: local normalised cross-correlation (squared, box window, as in VoxelMorph / NIO: window 7 at full
  resolution), same modality.
* ``mind``: MIND descriptors (Heinrich et al. 2012; 6-neighbourhood in 3D, 4 in 2D) compared by mean squared
  difference; the descriptor of the moving image is computed once and warped.  Chosen as the multi-modal measure
  because it is local and dense (mutual information is a global histogram statistic that under-constrains a
  dense field), it is robust to the non-functional intensity relations between CT, MR and PET, and it is the
  measure used by the ConvexAdam/instance-optimisation line of work the NIO paper builds on.
* ``mse``: mean squared difference (same modality, same intensity scale).
* ``dice``: soft Dice between one-hot label maps (label-driven mode).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import ops

if TYPE_CHECKING:
    from collections.abc import Callable

    # ``loss(warp, weight)``: ``warp`` resamples a moving-side tensor with the current deformation,
    # ``weight`` is the voxel weight map (masks) or None
    ImageLoss = Callable[[Callable[[torch.Tensor], torch.Tensor], torch.Tensor | None], torch.Tensor]

EPS = 1e-5
# LNCC's stabiliser in ``cov² / (var_f var_w + LNCC_EPS)`` on images normalised to [0, 1] (0.5-99.5 percentiles).
# It acts as a floor on the product of the local variances, i.e. on local standard deviations of about
# LNCC_EPS ** 0.25 of the intensity range: 1e-5 (VoxelMorph's value) floors them at 5.6 % (about 80 HU on the
# benchmark's abdomen CT), which flattens soft-tissue contrast and leaves most of a CT body to the regulariser;
# 1e-7 floors them at 1.8 % (about 26 HU).
# Measured on the registration benchmark (METHOD.md, "LNCC's stabiliser"; iterations (100, 60, 30)): CT 0.068 ->
# 0.039 voxel, MNI 0.081 -> 0.069; with independent noise added to both images it costs (ct_noise 0.085 -> 0.091,
# mni_noise 0.112 -> 0.127), as a lower floor lets more of the noise count as structure.
LNCC_EPS = 1e-7


def _wmean(x, weight):
    if weight is None:
        return x.mean()
    return (x * weight).sum() / (weight.sum() * x.shape[1] + EPS)


class LNCC:
    """LNCC against a fixed image whose local statistics are computed once (3 box filters per evaluation)."""

    def __init__(self, fixed: torch.Tensor, window: int = 7, eps: float | None = None):
        self.f, self.window = fixed, window
        self.eps = LNCC_EPS if eps is None else float(eps)
        self.mu_f = ops.box_filter(fixed, window)
        self.var_f = (ops.box_filter(fixed * fixed, window) - self.mu_f ** 2).clamp_min(0)

    def __call__(self, warped, weight=None):
        stats = ops.box_filter(torch.cat([warped, warped * warped, self.f * warped], 1), self.window)
        mu_w = stats[:, 0:1]
        var_w = (stats[:, 1:2] - mu_w * mu_w).clamp_min(0)
        cov = stats[:, 2:3] - self.mu_f * mu_w
        cc = cov * cov / (self.var_f * var_w + self.eps)
        return -_wmean(cc, weight)


def lncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 7,
         weight: torch.Tensor | None = None, eps: float | None = None) -> torch.Tensor:
    return LNCC(fixed, window, eps)(warped, weight)


def mse(fixed: torch.Tensor, warped: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return _wmean((fixed - warped) ** 2, weight)


def mind(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND descriptor ``(1, 2*ndim, *spatial)`` of a normalised image ``(1, 1, *spatial)``."""
    nd = ops.spatial_ndim(image)
    size = 2 * radius + 1
    dists = []
    for ax in range(nd):
        for sgn in (-1, 1):
            shifted = torch.roll(image, shifts=sgn * dilation, dims=2 + ax)
            # replicate the border instead of wrapping
            idx = [slice(None)] * image.dim()
            if sgn > 0:
                idx[2 + ax] = slice(0, dilation)
            else:
                idx[2 + ax] = slice(-dilation, None)
            shifted[tuple(idx)] = image[tuple(idx)]
            dists.append(ops.box_filter((image - shifted) ** 2, size))
    D = torch.cat(dists, dim=1)
    V = D.mean(dim=1, keepdim=True)
    V = V.clamp(min=V.mean() * 1e-3 + 1e-8, max=V.mean() * 1e3 + 1e-8)
    desc = torch.exp(-D / V)
    return desc / desc.amax(dim=1, keepdim=True).clamp_min(1e-8)


def mind_loss(fixed_desc: torch.Tensor, warped_desc: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return _wmean((fixed_desc - warped_desc) ** 2, weight)


def soft_dice(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 − mean soft Dice over channels (labels)."""
    nd = ops.spatial_ndim(fixed_onehot)
    dims = tuple(range(2, 2 + nd))
    if weight is not None:
        fixed_onehot = fixed_onehot * weight
        warped_onehot = warped_onehot * weight
    inter = (fixed_onehot * warped_onehot).sum(dims)
    den = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    present = den > 0
    dice = 2 * inter / den.clamp_min(EPS)
    return 1.0 - dice[present].mean()


def _moving_side(moving: torch.Tensor, mode: str) -> torch.Tensor:
    """The tensor the ``warp`` callback samples with the sampler ``mode``: the moving-side tensor itself
    ("bilinear"), or its preparation for a prepared mode (:data:`ops.PREPARED_MODES`)."""
    return ops.PREPARED_MODES[mode][0](moving) if mode in ops.PREPARED_MODES else moving


def lncc_term(fixed: torch.Tensor, moving: torch.Tensor, window: int, mode: str = "bilinear",
              eps: float | None = None) -> ImageLoss:
    f, mv = LNCC(fixed, window, eps), _moving_side(moving, mode)
    return lambda warp, weight: f(warp(mv), weight)


def mse_term(fixed: torch.Tensor, moving: torch.Tensor, window: int, mode: str = "bilinear") -> ImageLoss:
    mv = _moving_side(moving, mode)
    return lambda warp, weight: mse(fixed, warp(mv), weight)


def mind_term(fixed: torch.Tensor, moving: torch.Tensor, window: int, mode: str = "bilinear") -> ImageLoss:
    fixed_desc = mind(fixed)
    moving_desc = _moving_side(mind(moving), mode)        # the moving descriptor is computed once and warped
    return lambda warp, weight: mind_loss(fixed_desc, warp(moving_desc), weight)


def image_term(name: str, fixed: torch.Tensor, moving: torch.Tensor, window: int,
               mode: str = "bilinear", lncc_eps: float | None = None) -> ImageLoss | None:
    """The loss of the registered term ``name`` (:mod:`RegistrationModuleLib.similarities`) for these images, or
    None for a label-only term.  ``lncc_eps``: LNCC's stabiliser (None: :data:`LNCC_EPS`; other terms ignore it,
    as they ignore ``window``)."""
    from .similarities import similarity_term
    term = similarity_term(name)
    if not term.uses_images:
        return None
    extra = {"eps": lncc_eps} if term.uses_lncc else {}
    return globals()[term.builder](fixed, moving, window, mode, **extra)
