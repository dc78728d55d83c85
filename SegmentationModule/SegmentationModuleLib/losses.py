"""LDOS losses (paper Eq. 5-9).

* ``L_g = sum_z w^z |P^z_full-dose - r^z|``: L1 between the denoising decoder's output at every scale z and the
  full-dose PET (average-pooled to that scale);
* ``L_s = sum_z v^z (CE + Dice)``: cross-entropy plus soft Dice (softmax probabilities vs one-hot labels,
  labels nearest-downsampled to scale z);
* ``L_total = phi * L_g + lambda * L_s`` with ``phi = exp(-0.002 * epoch)`` and ``lambda = 1``.

Deep-supervision weights follow nnU-Net: ``1 / 2^z`` for z = 0 (full resolution) .. Z-1, the lowest resolution set
to 0, normalised to sum 1 (used for both ``w^z`` and ``v^z``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence


def deep_supervision_weights(n: int) -> list[float]:
    w = [1.0 / (2 ** i) for i in range(n)]
    if n > 1:
        w[-1] = 0.0
    s = sum(w)
    return [x / s for x in w]


def phi_schedule(epoch: float, ell: float = 0.002) -> float:
    """Weight of the denoising loss at ``epoch`` (paper: phi = exp(-l E), l = 0.002)."""
    return math.exp(-ell * float(epoch))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                   include_background: bool = False) -> torch.Tensor:
    """1 - mean soft Dice over classes, batch Dice as in nnU-Net (sums over batch and space)."""
    probs = torch.softmax(logits.float(), 1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3, 4)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)
    return 1.0 - dice.mean()


def seg_loss_single(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), target.long()) + soft_dice_loss(logits, target)


def _down_label(label, shape):
    if tuple(label.shape[-3:]) == tuple(shape):
        return label
    return F.interpolate(label[:, None].float(), size=shape, mode="nearest")[:, 0].long()


def _down_image(img, shape):
    if tuple(img.shape[-3:]) == tuple(shape):
        return img
    return F.adaptive_avg_pool3d(img, shape)


def segmentation_loss(seg_outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor,
                      weights: Sequence[float] | None = None) -> torch.Tensor | float:
    """L_s over deep-supervision outputs (list, highest resolution first) or a single logits tensor."""
    if torch.is_tensor(seg_outputs):
        seg_outputs = [seg_outputs]
    weights = weights or deep_supervision_weights(len(seg_outputs))
    total = 0.0
    for w, out in zip(weights, seg_outputs):
        if w == 0:
            continue
        total = total + w * seg_loss_single(out, _down_label(label, out.shape[2:]))
    return total


def denoising_loss(den_outputs: torch.Tensor | Sequence[torch.Tensor], full_dose: torch.Tensor,
                   weights: Sequence[float] | None = None) -> torch.Tensor | float:
    """L_g: weighted L1 to the full-dose image at every scale."""
    if torch.is_tensor(den_outputs):
        den_outputs = [den_outputs]
    weights = weights or deep_supervision_weights(len(den_outputs))
    total = 0.0
    for w, out in zip(weights, den_outputs):
        if w == 0:
            continue
        total = total + w * (out.float() - _down_image(full_dose, out.shape[2:])).abs().mean()
    return total


def ldos_loss(outputs: dict, label: torch.Tensor, full_dose: torch.Tensor | None = None, epoch: float = 0,
              ell: float = 0.002, lam: float = 1.0, phi: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. ``outputs`` is the network's dict. Without a "den" output (segmentation-only
    baseline) the total is ``lam * L_s``."""
    ls = segmentation_loss(outputs["seg"], label)
    parts = {"L_s": float(ls.detach())}
    total = lam * ls
    if "den" in outputs and outputs["den"] is not None:
        if full_dose is None:
            raise ValueError("the LDOS loss needs the full-dose image for the denoising decoder")
        lg = denoising_loss(outputs["den"], full_dose)
        p = phi_schedule(epoch, ell) if phi is None else phi
        total = total + p * lg
        parts.update(L_g=float(lg.detach()), phi=p)
    parts["total"] = float(total.detach())
    return total, parts
