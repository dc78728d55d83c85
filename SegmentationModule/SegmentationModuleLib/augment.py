"""Training augmentation, most importantly LDOS's PET/CT misalignment augmentation.

The organ labels come from CT; in a real PET/CT they are not perfectly aligned with the PET (breathing, patient
motion). LDOS (after Salimi et al. 2025) trains with the label map shifted and deformed against the PET so that the
network does not learn to trust the exact CT boundary. :func:`misalign_labels` applies, to the label map only, a
random global translation plus a smooth random deformation (a coarse random displacement grid upsampled with
trilinear interpolation), resampled with nearest neighbour.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence


def _identity_grid(shape, device):
    d, h, w = shape
    zs = torch.linspace(-1, 1, d, device=device)
    ys = torch.linspace(-1, 1, h, device=device)
    xs = torch.linspace(-1, 1, w, device=device)
    z, y, x = torch.meshgrid(zs, ys, xs, indexing="ij")
    return torch.stack([x, y, z], -1)  # grid_sample wants (x, y, z)


def random_displacement(batch: int, shape: Sequence[int], spacing_mm: Sequence[float], max_shift_mm: float = 6.0,
                        max_deform_mm: float = 4.0, control_points: int = 4, generator: torch.Generator | None = None,
                        device: str | torch.device = "cpu") -> torch.Tensor:
    """Random displacement in voxels, (B, 3, D, H, W) ordered (z, y, x): translation + smooth deformation."""
    sp = torch.as_tensor(spacing_mm, dtype=torch.float32, device=device).view(1, 3, 1, 1, 1)
    shift = (torch.rand(batch, 3, 1, 1, 1, generator=generator) * 2 - 1).to(device) * max_shift_mm
    coarse = (torch.rand(batch, 3, control_points, control_points, control_points, generator=generator) * 2 - 1)
    smooth = F.interpolate(coarse.to(device), size=tuple(shape), mode="trilinear", align_corners=True) * max_deform_mm
    return (shift + smooth) / sp


def warp_labels(label: torch.Tensor, disp_vox: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour pull-back of an integer label batch (B, D, H, W) by a voxel displacement (B,3,D,H,W)."""
    b, d, h, w = label.shape
    grid = _identity_grid((d, h, w), label.device).unsqueeze(0).repeat(b, 1, 1, 1, 1)
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1), 2.0 / max(d - 1, 1)], device=label.device)
    disp_xyz = disp_vox.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]] * scale
    out = F.grid_sample(label[:, None].float(), grid + disp_xyz, mode="nearest", padding_mode="border",
                        align_corners=True)
    return out[:, 0].round().long()


def misalign_labels(label: torch.Tensor, spacing_mm: Sequence[float], p: float = 0.5, max_shift_mm: float = 6.0,
                    max_deform_mm: float = 4.0, control_points: int = 4,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the misalignment augmentation to each batch element with probability ``p``."""
    b = label.shape[0]
    apply = torch.rand(b, generator=generator) < p
    if not bool(apply.any()):
        return label
    disp = random_displacement(b, label.shape[1:], spacing_mm, max_shift_mm, max_deform_mm, control_points,
                               generator, label.device)
    disp = disp * apply.view(b, 1, 1, 1, 1).to(disp)
    return warp_labels(label, disp)
