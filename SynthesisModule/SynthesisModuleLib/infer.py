"""Inference: load a model, resample to 2 mm, sliding-window synthesis, the predicted change back to the input grid
(added to the native input, so the 2 mm round trip costs the input none of its detail)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch

from PETWorkbenchLib.device import autocast, inference_precision, torch_device
from PETWorkbenchLib.errors import Cancelled, InputError, ModelError
from PETWorkbenchLib.imageio import resample_like, resample_to_spacing
from PETWorkbenchLib.progress import Reporter
from PETWorkbenchLib.units import check_pet_image

from . import BLEND_SIGMA, DEFAULT_OVERLAP, DEFAULT_PRECISION
from .data import TARGET_SPACING, normalise
from .model import build_model
from .train import load_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .model import Generator

    Prediction = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]

# A 2 mm grid of more voxels than this (102 x 102 x 140 cm, beyond any PET field of view) is refused as implausible;
# memory is bounded separately by the budget (input_voxel_limit).
MAX_VOXELS_2MM = 512 * 512 * 700
# Peak memory of synthesize() per voxel of the input grid (the input itself included) and of the 2 mm grid, with
# a margin over the peak RSS measured by benchmarks/memory.py (about 13 + 7 bytes at 2 mm input spacing).
# A 512 x 512 x 600 volume at 2 mm needs about 3.8 GB with these figures, beside the model and torch.
BYTES_PER_INPUT_VOXEL = 16
BYTES_PER_2MM_VOXEL = 8
# A patch whose every input voxel is at most this (SUV, after normalisation) is air outside the body: it is not sent
# through the network and the input is returned for it (a whole-body field of view is largely air).
EMPTY_PATCH_SUV = 0.02


def input_voxel_limit(spacing: Sequence[float]) -> tuple[int, str]:
    """(Largest input voxel count synthesize() accepts at this spacing, why): the 2 mm grid limit and the memory
    budget (:func:`PETWorkbenchLib.imageio.memory_budget_bytes`), checked from the header before reading."""
    from PETWorkbenchLib.imageio import voxel_budget
    ratio = math.prod(float(s) for s in spacing) / 8.0          # 2 mm voxels per input voxel
    by_memory = voxel_budget(BYTES_PER_INPUT_VOXEL + BYTES_PER_2MM_VOXEL * ratio)
    by_grid = int(MAX_VOXELS_2MM / max(ratio, 1e-9))
    return by_memory if by_memory[0] < by_grid else (by_grid, f"a 2 mm grid of at most {MAX_VOXELS_2MM:,} voxels")


def load_model(model: str | Path | dict | Generator, device: str | torch.device = "cpu") -> tuple[Generator, dict]:
    """(Generator in eval mode, full config) from a path, a model id, a checkpoint dict or a Generator."""
    if isinstance(model, torch.nn.Module):
        cfg = getattr(model, "full_config", None) or {"model": model.config, "train": {}}
        return model.to(device).eval(), load_config(cfg)
    if isinstance(model, (str, Path)):
        from PETWorkbenchLib.models import load_model_checkpoint
        try:
            model = load_model_checkpoint(model)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - unknown id, unreadable file
            raise ModelError(f"model {str(model)!r} is neither a readable weights file nor a usable registered "
                             f"model: {exc}") from exc
    if not isinstance(model, dict) or "config" not in model or "state_dict" not in model:
        raise ModelError("a checkpoint must be a dict with 'config' and 'state_dict'")
    try:
        cfg = load_config(model["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"incompatible model config: {exc}") from exc
    net = build_model(cfg["model"])
    try:
        net.load_state_dict(model["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"weights do not match the model config: {str(exc).splitlines()[0]}") from exc
    net.full_config = cfg
    return net.to(device).eval(), cfg


def sliding_window(predictor: Callable[[torch.Tensor], Prediction], image_tensor: torch.Tensor,
                   roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 4, mode: str = "gaussian",
                   device: str | torch.device | None = None, progress: Callable[[float, str], None] | None = None,
                   cancel: Callable[[], bool] | None = None, sigma_scale: float = 0.125) -> Prediction:
    """Thin indirection to PETWorkbenchLib.inference.sliding_window (MONAI sliding_window_inference)."""
    from PETWorkbenchLib.inference import sliding_window as shared
    return shared(predictor, image_tensor, roi_size, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                  device=device, progress=progress, cancel=cancel, sigma_scale=sigma_scale)


def skip_empty(model: Callable[[torch.Tensor], torch.Tensor], level: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Predictor that returns the input for patches whose maximum is at most ``level`` (air) and runs ``model``
    on the others only."""
    def run(patches: torch.Tensor) -> torch.Tensor:
        keep = patches.flatten(1).amax(1) > level
        if bool(keep.all()):
            return model(patches)
        out = patches.clone()
        if bool(keep.any()):
            out[keep] = model(patches[keep])
        return out
    return run


def body_box(arr: np.ndarray, level: float) -> tuple[slice, ...] | None:
    """Bounding box (one slice per axis) of the voxels brighter than ``level``; None when no voxel is."""
    box = []
    above = arr > level
    for ax in range(arr.ndim):
        hit = np.flatnonzero(above.any(axis=tuple(a for a in range(arr.ndim) if a != ax)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def predict_array(model: Generator, arr: np.ndarray, patch: int | Sequence[int] = 64,
                  overlap: float = DEFAULT_OVERLAP, sw_batch_size: int = 2, device: str | torch.device = "cpu",
                  progress: Callable[[float, str], None] | None = None,
                  cancel: Callable[[], bool] | None = None,
                  empty_level: float | None = None,
                  precision: str = DEFAULT_PRECISION,
                  sigma_scale: float = BLEND_SIGMA,
                  crop: bool = False) -> tuple[np.ndarray, list[torch.Tensor] | None]:
    """Run the network on a normalised (z, y, x) array on the 2 mm grid; returns (array, routing_log).
    ``empty_level``: patches at most this bright are returned unchanged (see :func:`skip_empty`); None: all run.
    ``crop`` (with ``empty_level``): the windows cover only the bounding box of the voxels brighter than
    ``empty_level`` (:func:`body_box`, as nnU-Net crops to the non-zero region); outside it the input is returned.
    ``precision``: "float32" or "bfloat16" (``PETWorkbenchLib.device.inference_precision``); the
    blending and the returned array are float32 either way. ``sigma_scale``: Gaussian blending width / patch."""
    if crop and empty_level is not None:
        box = body_box(arr, float(empty_level))
        if box is None:                       # nothing but air: every patch would be returned as it is
            return np.array(arr, dtype=np.float32, copy=True), ([] if model.num_banks else None)
        if any(b.stop - b.start < s for b, s in zip(box, arr.shape)):
            y, log = predict_array(model, arr[box], patch, overlap, sw_batch_size, device, progress, cancel,
                                   empty_level, precision, sigma_scale, crop=False)
            out = np.array(arr, dtype=np.float32, copy=True)
            out[box] = y
            return out, log
    dev = torch_device(device)
    amp = autocast(dev, inference_precision(dev, precision))
    model = model.to(dev).eval()
    # a view where torch can take one (the body box of a larger array is not copied), else a float32 copy
    view_ok = arr.dtype == np.float32 and arr.flags.writeable and all(s > 0 for s in arr.strides)
    x = torch.from_numpy(arr if view_ok else np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    roi = (int(patch),) * 3 if np.isscalar(patch) else tuple(int(p) for p in patch)
    model.routing_log = [] if model.num_banks else None
    try:
        with torch.inference_mode(), amp:
            predictor = model if empty_level is None else skip_empty(model, float(empty_level))
            y = sliding_window(predictor, x, roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="gaussian",
                               device=dev, progress=progress, cancel=cancel, sigma_scale=sigma_scale)
        log = model.routing_log
    finally:
        model.routing_log = None
    return y[0, 0].numpy(), log


def routing_summary(log: list[torch.Tensor] | None, num_banks: int) -> dict:
    """Per bank (block b attention / FFN): mean weight per expert, top-1 expert fractions, sparsity."""
    if not log:
        return {"routed": False}
    w = torch.cat([torch.stack(log[i:i + num_banks], 1) for i in range(0, len(log), num_banks)], 0)  # (P, banks, M)
    w = w.float().cpu()
    top1 = w.argmax(-1)
    m = w.shape[-1]
    names = [f"block{b // 2 + 1}.{'attention' if b % 2 == 0 else 'ffn'}" for b in range(num_banks)]
    return {
        "routed": True,
        "n_patches": int(w.shape[0]),
        "banks": names,
        "mean_weight": [[round(float(v), 5) for v in row] for row in w.mean(0)],
        "top1_fraction": [[round(float((top1[:, b] == e).float().mean()), 4) for e in range(m)]
                          for b in range(num_banks)],
        "active_fraction": round(float((w != 0).float().mean()), 4),
        "all_zero_fraction": round(float((w == 0).all(-1).float().mean()), 4),
    }


def synthesize(image: sitk.Image, model: str | Path | dict | Generator, device: str | torch.device = "auto",
               patch: int | Sequence[int] | None = None, overlap: float = DEFAULT_OVERLAP, sw_batch_size: int = 2,
               units: str = "SUV", progress: Callable[[float, str], None] | None = None,
               cancel: Callable[[], bool] | None = None, skip_air: bool = True,
               precision: str = DEFAULT_PRECISION, blend_sigma: float = BLEND_SIGMA) -> tuple[sitk.Image, dict]:
    """Full-dose estimate of a low-dose PET ``image`` (SUV). Returns (SimpleITK.Image SUV on the input grid,
    routing summary dict). ``skip_air``: the sliding window covers only the bounding box of the voxels above
    EMPTY_PATCH_SUV (the body), and patches of air inside it (every voxel <= EMPTY_PATCH_SUV) are returned as they
    are instead of going through the network; air outside the box is returned as it is. ``precision``: the
    network's arithmetic, "float32" or "bfloat16"
    (autocast; the input, the blending and the change added to the input stay float32). ``blend_sigma``: the
    Gaussian blending weight's sigma as a fraction of the patch. See the package docstring."""
    rep = Reporter(progress, cancel)
    check_pet_image(image, "input PET", units=units)
    if not 0.0 <= float(overlap) < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if int(sw_batch_size) < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    dev = torch_device(device)
    precision = inference_precision(dev, precision)
    rep(0.0, "loading model")
    net, cfg = load_model(model, dev)
    if patch is None:
        patch = cfg["train"]["patch_size"]
    if int(np.min(patch)) < 8:
        raise InputError(f"patch size must be at least 8 voxels, got {patch}")
    # memory: each step keeps at most one extra full-size copy (see input_voxel_limit)
    img = image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
    on_grid = np.allclose(img.GetSpacing(), TARGET_SPACING, rtol=0, atol=1e-6)
    rep(0.05, "resampling to 2 mm")
    img2 = img if on_grid else resample_to_spacing(img, TARGET_SPACING)
    nvox = math.prod(img2.GetSize())
    if nvox > MAX_VOXELS_2MM:
        raise InputError(f"input covers {img2.GetSize()} voxels at 2 mm ({nvox}), more than the limit "
                         f"{MAX_VOXELS_2MM}; crop the volume first")
    scale = float(cfg["train"]["suv_scale"])
    arr = normalise(sitk.GetArrayViewFromImage(img2), scale)
    out, log = predict_array(net, arr, patch, overlap, sw_batch_size, dev, progress=rep.sub(0.1, 0.9), cancel=None,
                             empty_level=EMPTY_PATCH_SUV / scale if skip_air else None, precision=precision,
                             sigma_scale=blend_sigma, crop=skip_air)
    rep(0.9, "resampling back to the input grid")
    if on_grid:
        out *= scale
        res = sitk.GetImageFromArray(out)
        res.CopyInformation(img)
    else:
        # Only the network's predicted change is resampled back: output = native input + (network output - its
        # input) on the 2 mm grid, so the round trip through 2 mm does not smooth the input's own detail (a
        # small lesion loses nothing to interpolation; a network that changes nothing returns the input exactly).
        out -= arr
        out *= scale
        change2 = sitk.GetImageFromArray(out)
        change2.CopyInformation(img2)
        del out
        res = sitk.Add(img, resample_like(change2, img))
        del change2
    del arr
    res = sitk.Maximum(res, 0.0)
    for key in image.GetMetaDataKeys():
        res.SetMetaData(key, image.GetMetaData(key))
    summary = routing_summary(log, net.num_banks)
    summary.update({"model": cfg.get("name"), "device": str(dev), "patch": int(np.min(patch)),
                    "overlap": float(overlap), "grid_2mm": list(img2.GetSize()), "precision": precision,
                    "blend_sigma": float(blend_sigma)})
    rep(1.0, "done")
    return res, summary


__all__ = ["synthesize", "load_model", "predict_array", "routing_summary", "sliding_window", "Cancelled"]
