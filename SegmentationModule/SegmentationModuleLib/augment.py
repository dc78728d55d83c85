"""Training augmentation: nnU-Net's default pipeline (MONAI transforms) and LDOS's PET/CT misalignment augmentation.

nnU-Net's default training augmentation (nnU-Net v2 ``get_training_transforms``, the recipe LDOS trains with), built
from MONAI's transforms rather than written here, in nnU-Net's order and with its probabilities:

==========================  ====================================  ==============================  ============
nnU-Net transform           MONAI transform                       parameters                      applied to
==========================  ====================================  ==============================  ============
rotation (p 0.2)            RandRotated                           +-30 deg about each axis        all
scaling (p 0.2)             RandZoomd                             scale 0.7-1.4 (zoom 1/scale)    all
Gaussian noise (p 0.1)      RandGaussianNoised                    std up to sqrt(0.1) x s         input
Gaussian blur (p 0.2 x 0.5) RandGaussianSmoothd                   sigma 0.5-1 voxel               input
brightness (p 0.15)         RandScaleIntensityd                   x 0.75-1.25                     input+target
contrast (p 0.15)           RandScaleIntensityFixedMeand          x 0.75-1.25 about the mean,     input+target
                                                                  range preserved
low resolution (p 0.25x0.5) RandSimulateLowResolutiond            zoom 0.5-1, nearest down,       input
                                                                  trilinear up
gamma, inverted (p 0.1)     RandAdjustContrastd(invert_image)     gamma 0.7-1.5, stats retained   input+target
gamma (p 0.3)               RandAdjustContrastd                   gamma 0.7-1.5, stats retained   input+target
mirroring (p 0.5 per axis)  RandFlipd                             axes z, y, x                    all
==========================  ====================================  ==============================  ============

Mirroring can be switched off (``{"preset": "nnunet", "mirror_axes": []}``, the shipped configs): a mirror image
turns organs with a side (liver, spleen) into each other (METHOD.md has the measurement).

"all" = input, full-dose target and label map (labels with nearest-neighbour interpolation). As nnU-Net, the
spatial transforms act on a larger patch (``spatial_margin``) that is centre-cropped to the training patch
afterwards, so rotations and zooms do not bring empty corners in. Deviations, because LDOS has a second, denoising
target: the intensity *mappings* (brightness, contrast, gamma) are applied with the same random draw to the
low-dose input and the full-dose target, so that the target stays the full-dose version of the augmented input;
the *degradations* (noise, blur, low resolution) to the input only. nnU-Net's noise variance is for z-scored
images; here the standard deviation is scaled by ``s``, the intensity standard deviation of the training inputs.

The organ labels come from CT; in a real PET/CT they are not perfectly aligned with the PET (breathing, patient
motion). LDOS (after Salimi et al. 2025) trains with the label map shifted and deformed against the PET so that the
network does not learn to trust the exact CT boundary. :func:`misalign_labels` applies, to the label map only, a
random global translation plus a smooth random deformation (a coarse random displacement grid upsampled with
trilinear interpolation), resampled with nearest neighbour.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence

    from monai.transforms import Compose


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


NNUNET_DEFAULT = {
    "rotation_deg": 30.0, "p_rotation": 0.2,
    "scaling": [0.7, 1.4], "p_scaling": 0.2,
    "noise_variance": 0.1, "p_noise": 0.1,
    "blur_sigma": [0.5, 1.0], "p_blur": 0.1,
    "brightness": [0.75, 1.25], "p_brightness": 0.15,
    "contrast": [0.75, 1.25], "p_contrast": 0.15,
    "lowres_zoom": [0.5, 1.0], "p_lowres": 0.125,
    "gamma": [0.7, 1.5], "p_gamma_inverted": 0.1, "p_gamma": 0.3,
    "mirror_axes": [0, 1, 2], "p_mirror": 0.5,
    "margin": 0.25,
}


def augmentation_config(cfg: dict | str | None) -> dict | None:
    """The augmentation settings of a training config: ``"nnunet"`` (or a dict overriding some of
    :data:`NNUNET_DEFAULT`) -> full dict; None / ``"none"`` / False -> None (no augmentation)."""
    if cfg in (None, False, "none"):
        return None
    if cfg in ("nnunet", True):
        return dict(NNUNET_DEFAULT)
    if isinstance(cfg, dict):
        unknown = set(cfg) - set(NNUNET_DEFAULT) - {"preset"}
        if unknown:
            raise ValueError(f"unknown augmentation keys: {sorted(unknown)}")
        return {**NNUNET_DEFAULT, **{k: v for k, v in cfg.items() if k != "preset"}}
    raise ValueError(f"augmentation must be 'nnunet', 'none' or a dict, got {cfg!r}")


def spatial_margin(patch_size: Sequence[int], aug: dict | None) -> list[int]:
    """Voxels added on each side of the patch before the spatial transforms (centre-cropped afterwards)."""
    if not aug:
        return [0] * len(patch_size)
    return [int(math.ceil(float(aug["margin"]) * int(p))) for p in patch_size]


def build_augmentation(aug: dict, patch_size: Sequence[int], intensity_std: float = 1.0) -> Compose:
    """MONAI dictionary transform (keys ``image``, ``target``, ``label``; channel-first arrays of the patch plus
    :func:`spatial_margin`) that applies nnU-Net's default augmentation and returns patches of ``patch_size``. Seed
    it per sample with ``set_random_state``."""
    import monai.transforms as mt
    keys = ["image", "target", "label"]
    mapped = ["image", "target"]
    interp = ["bilinear", "bilinear", "nearest"]
    rot = math.radians(float(aug["rotation_deg"]))
    lo, hi = aug["scaling"]
    b0, b1 = aug["brightness"]
    c0, c1 = aug["contrast"]
    sig = tuple(aug["blur_sigma"])
    ts = [
        mt.RandRotated(keys, range_x=rot, range_y=rot, range_z=rot, prob=aug["p_rotation"], keep_size=True,
                       mode=interp, padding_mode="zeros"),
        mt.RandZoomd(keys, prob=aug["p_scaling"], min_zoom=1.0 / hi, max_zoom=1.0 / lo, keep_size=True,
                     mode=["trilinear", "trilinear", "nearest"], padding_mode="constant"),
        mt.CenterSpatialCropd(keys, roi_size=[int(p) for p in patch_size]),
        mt.RandGaussianNoised(["image"], prob=aug["p_noise"], mean=0.0,
                              std=math.sqrt(float(aug["noise_variance"])) * float(intensity_std), sample_std=True),
        mt.RandGaussianSmoothd(["image"], sigma_x=sig, sigma_y=sig, sigma_z=sig, prob=aug["p_blur"]),
        mt.RandScaleIntensityd(mapped, factors=(b0 - 1.0, b1 - 1.0), prob=aug["p_brightness"]),
        mt.RandScaleIntensityFixedMeand(mapped, factors=(c0 - 1.0, c1 - 1.0), fixed_mean=True, preserve_range=True,
                                        prob=aug["p_contrast"]),
        mt.RandSimulateLowResolutiond(["image"], prob=aug["p_lowres"], zoom_range=tuple(aug["lowres_zoom"]),
                                      downsample_mode="nearest", upsample_mode="trilinear"),
        mt.RandAdjustContrastd(mapped, prob=aug["p_gamma_inverted"], gamma=tuple(aug["gamma"]), invert_image=True,
                               retain_stats=True),
        mt.RandAdjustContrastd(mapped, prob=aug["p_gamma"], gamma=tuple(aug["gamma"]), invert_image=False,
                               retain_stats=True),
    ] + [mt.RandFlipd(keys, prob=aug["p_mirror"], spatial_axis=int(a)) for a in aug["mirror_axes"]]
    return mt.Compose(ts)


def augment_batch(transform: Compose, x: np.ndarray, y: np.ndarray, label: np.ndarray, seeds: Sequence[int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``transform`` (:func:`build_augmentation`) to each sample of a batch (x, y: (B, 1, ...) float; label:
    (B, ...) int), sample b seeded with ``seeds[b]`` (so a resumed run draws the same augmentations)."""
    xs, ys, ls = [], [], []
    for b in range(x.shape[0]):
        transform.set_random_state(seed=int(seeds[b]) % (2 ** 32))
        out = transform({"image": x[b], "target": y[b], "label": label[b][None].astype(np.float32)})
        xs.append(np.asarray(out["image"], dtype=np.float32))
        ys.append(np.asarray(out["target"], dtype=np.float32))
        ls.append(np.rint(np.asarray(out["label"])[0]).astype(np.int64))
    return np.stack(xs), np.stack(ys), np.stack(ls)
