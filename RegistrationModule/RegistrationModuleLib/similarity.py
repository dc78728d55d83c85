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

import torch

from . import ops

EPS = 1e-5


def _wmean(x, weight):
    if weight is None:
        return x.mean()
    return (x * weight).sum() / (weight.sum() * x.shape[1] + EPS)


class LNCC:
    """LNCC against a fixed image whose local statistics are computed once (3 box filters per evaluation)."""

    def __init__(self, fixed, window=7):
        self.f, self.window = fixed, window
        self.mu_f = ops.box_filter(fixed, window)
        self.var_f = (ops.box_filter(fixed * fixed, window) - self.mu_f ** 2).clamp_min(0)

    def __call__(self, warped, weight=None):
        stats = ops.box_filter(torch.cat([warped, warped * warped, self.f * warped], 1), self.window)
        mu_w = stats[:, 0:1]
        var_w = (stats[:, 1:2] - mu_w * mu_w).clamp_min(0)
        cov = stats[:, 2:3] - self.mu_f * mu_w
        cc = cov * cov / (self.var_f * var_w + EPS)
        return -_wmean(cc, weight)


def lncc(fixed, warped, window=7, weight=None):
    return LNCC(fixed, window)(warped, weight)


def mse(fixed, warped, weight=None):
    return _wmean((fixed - warped) ** 2, weight)


def mind(image, radius=1, dilation=2):
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


def mind_loss(fixed_desc, warped_desc, weight=None):
    return _wmean((fixed_desc - warped_desc) ** 2, weight)


def soft_dice(fixed_onehot, warped_onehot, weight=None):
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


def lncc_term(fixed, moving, window):
    f = LNCC(fixed, window)
    return lambda warp, weight: f(warp(moving), weight)


def mse_term(fixed, moving, window):
    return lambda warp, weight: mse(fixed, warp(moving), weight)


def mind_term(fixed, moving, window):
    fixed_desc, moving_desc = mind(fixed), mind(moving)       # the moving descriptor is computed once and warped
    return lambda warp, weight: mind_loss(fixed_desc, warp(moving_desc), weight)


def image_term(name, fixed, moving, window):
    """The loss of the registered term ``name`` (:mod:`RegistrationModuleLib.similarities`) for these images, or
    None for a label-only term."""
    from .similarities import similarity_term
    term = similarity_term(name)
    return globals()[term.builder](fixed, moving, window) if term.uses_images else None

