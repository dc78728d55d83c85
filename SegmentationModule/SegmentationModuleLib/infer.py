"""Inference: organ label map (and optionally probabilities / the denoised PET) for a PET volume in SUV."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.errors import InputError, ModelError
from PETWorkbenchLib.units import check_pet_image
from PETWorkbenchLib.progress import Reporter

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import SimpleITK as sitk
    import torch

    from .model import LDOSNet


def read_checkpoint(checkpoint: str | Path | dict,
                    progress: Callable[[float, str], None] | None = None) -> dict:
    """The checkpoint dict of a weights file, a registry id (verified, fetched if needed) or a loaded dict."""
    from PETWorkbenchLib.models import load_checkpoint, load_model_checkpoint
    if isinstance(checkpoint, dict):
        return checkpoint
    if isinstance(checkpoint, (str, Path)) and Path(checkpoint).is_file():
        return load_checkpoint(checkpoint)
    return load_model_checkpoint(str(checkpoint), progress=progress)


def load_model(checkpoint: str | Path | dict, device: str | torch.device = "cpu",
               progress: Callable[[float, str], None] | None = None) -> tuple[LDOSNet, dict]:
    """Checkpoint (path, registry id or loaded dict) -> (network in eval mode, config)."""
    from PETWorkbenchLib.device import torch_device
    from .model import build_network
    ckpt = read_checkpoint(checkpoint, progress)
    cfg = ckpt.get("config")
    if not isinstance(cfg, dict) or "network" not in cfg:
        raise ModelError("The checkpoint has no network configuration")
    try:
        net = build_network(cfg)
        missing, unexpected = net.load_state_dict(ckpt["state_dict"], strict=False)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ModelError(f"The weights do not match their configuration: {e}") from e
    seg_missing = [k for k in missing if k.startswith(("encoder", "seg_decoder"))]
    if seg_missing or unexpected:
        raise ModelError(f"The weights do not match their configuration: missing {seg_missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}")
    net.eval()
    return net.to(torch_device(device)), cfg


# Peak memory of segment() per voxel of the input grid (the input itself included) and of the model grid (class
# logits dominate), with a margin over the peak RSS measured by benchmarks/memory.py (about 20 and 82 bytes).
# A 512 x 512 x 600 volume at 2 mm needs about 5.7 GB with these figures at the demo model's 4 mm grid.
BYTES_PER_INPUT_VOXEL = 24
BYTES_PER_MODEL_VOXEL = 100


def input_voxel_limit(spacing: Sequence[float], model_spacing: Sequence[float] = (4.0, 4.0, 4.0)) -> tuple[int, str]:
    """(Largest input voxel count segment() accepts at this spacing within the memory budget, why); checked from
    the header before reading."""
    import math
    from PETWorkbenchLib.imageio import voxel_budget
    ratio = math.prod(float(s) for s in spacing) / math.prod(model_spacing)
    return voxel_budget(BYTES_PER_INPUT_VOXEL + BYTES_PER_MODEL_VOXEL * ratio)


def mirror_axes(cfg: dict, tta: bool | None = None) -> tuple[int, ...]:
    """Spatial axes (0 = z, 1 = y, 2 = x of the patch) of mirror test-time augmentation: the config's
    ``inference.mirror_axes`` (none when it names none: a model trained without mirroring must not be mirrored at
    inference, and organs with a side, liver and spleen, are why the shipped models are not); ``tta=False``: none."""
    if tta is False:
        return ()
    axes = cfg.get("inference", {}).get("mirror_axes", ())
    return tuple(int(a) for a in axes)


def mirrored_predictor(predict: Callable, axes: Sequence[int]) -> Callable:
    """nnU-Net's mirroring: the mean of ``predict`` over the patch and its mirror images along every combination
    of ``axes`` (each output flipped back), i.e. 2^len(axes) passes; ``predict`` returns a tuple of tensors."""
    import itertools
    combos = [c for r in range(len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], r)]

    def run(patch):
        total = None
        for dims in combos:
            out = predict(patch.flip(dims) if dims else patch)
            out = tuple(o.flip(dims) if dims else o for o in out)
            total = out if total is None else tuple(t + o for t, o in zip(total, out))
        return tuple(t / len(combos) for t in total)
    return run


def _predict(net, cfg, image, dev, rep, heads, tta=None):
    import SimpleITK as sitk
    import torch
    from PETWorkbenchLib.inference import sliding_window
    from .data import normalise, resample_to_spacing
    img = resample_to_spacing(sitk.Cast(image, sitk.sitkFloat32), cfg["spacing"])
    x = normalise(sitk.GetArrayFromImage(img).astype(np.float32), cfg.get("norm", {}))
    t = torch.from_numpy(x)[None, None]
    inf = cfg.get("inference", {})

    def predictor(patch):
        with torch.no_grad():
            out = net(patch, heads=heads)
        return tuple(out[h] for h in heads)

    axes = mirror_axes(cfg, tta)
    if axes:
        predictor = mirrored_predictor(predictor, axes)
    out = sliding_window(predictor, t, tuple(cfg["patch_size"]), overlap=inf.get("overlap", 0.5),
                         sw_batch_size=inf.get("sw_batch_size", 2), device=dev, progress=rep.sub(0.05, 0.9))
    if torch.is_tensor(out):
        out = (out,)
    return img, dict(zip(heads, out))


def _to_image(arr, like):
    import SimpleITK as sitk
    im = sitk.GetImageFromArray(arr)
    im.CopyInformation(like)
    return im


def _back_to_input(img_model, image, is_label):
    import SimpleITK as sitk
    if img_model.GetSize() == image.GetSize() and np.allclose(img_model.GetSpacing(), image.GetSpacing()):
        return img_model
    interp = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(img_model, image, sitk.Transform(), interp, 0, img_model.GetPixelID())


def segment(image: sitk.Image, checkpoint: str | Path | dict, organs: str | int | Iterable[str | int] | None = None,
            device: str | torch.device = "auto", progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None, return_probabilities: bool = False,
            allow_empty: bool = False, tta: bool | None = None,
            postprocess: bool = True) -> tuple[sitk.Image, sitk.Image | None]:
    """Organ label map on the input grid (uint8, values of Resources/Terminology/PETWorkbenchOrgans.term.json).

    ``postprocess``: apply the model's nnU-Net-style post-processing (``inference.postprocessing`` of its config:
    only the largest connected component of the organs it names is kept, :mod:`.postprocess`) to the label map
    (not to the probabilities); False = the network's label map as it is.

    ``tta``: mirror test-time augmentation as nnU-Net (mean logits over the mirror images of each patch along the
    model config's ``inference.mirror_axes``; 8 passes for three axes); None = as the model's config says (the
    shipped models: off), False = off.

    Returns ``(label_image, probabilities)``; ``probabilities`` is None unless ``return_probabilities``, then a
    float32 vector image (one component per class, background first) on the input grid.
    """
    import SimpleITK as sitk
    import torch
    from PETWorkbenchLib.device import torch_device
    from .organs import resolve_organs
    rep = Reporter(progress, cancel)
    check_pet_image(image)
    keep = resolve_organs(organs)
    dev = torch_device(device)
    rep(0.0, "loading model")
    net, cfg = load_model(checkpoint, dev)
    if cfg.get("task") == "denoise":
        raise ModelError(f"Model {Path(str(checkpoint)).name} is a denoiser (first stage of the Fake-FDPET baseline), "
                         "not a segmentation model; choose an LDOS or segmentation-only model")
    img, out = _predict(net, cfg, image, dev, rep, ("seg",), tta)
    logits = out["seg"][0]
    rep(0.92, "assembling label map")
    lab = logits.argmax(0).numpy().astype(np.uint8)
    if not return_probabilities:
        del out, logits                                  # the class scores are not needed any more: free them first
    label = _back_to_input(_to_image(lab, img), image, True)
    arr = sitk.GetArrayFromImage(label)
    pp = cfg.get("inference", {}).get("postprocessing") if postprocess else None
    if pp:  # nnU-Net's largest-component rule, as decided for this model (postprocess.py), on every organ
        from .postprocess import apply_postprocessing
        arr = apply_postprocessing(arr, pp)
    arr[~np.isin(arr, keep)] = 0
    if not allow_empty and not arr.any():
        raise InputError("The model found none of the requested organs in this volume: check that it is a "
                         "whole-body PET in SUV (not CT, not Bq/ml) with the patient inside the field of view")
    label = _to_image(arr, label)
    probs = None
    if return_probabilities:
        p = torch.softmax(logits.float(), 0).numpy()
        comps = [_back_to_input(_to_image(np.ascontiguousarray(c), img), image, False) for c in p]
        probs = sitk.Compose(comps)
    rep(1.0, "done")
    return label, probs


def denoise(image: sitk.Image, checkpoint: str | Path | dict, device: str | torch.device = "auto",
            progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> sitk.Image:
    """Full-dose estimate (SUV, input grid) from an LDOS or denoiser checkpoint's denoising decoder."""
    from PETWorkbenchLib.device import torch_device
    from .data import denormalise
    rep = Reporter(progress, cancel)
    check_pet_image(image)
    dev = torch_device(device)
    net, cfg = load_model(checkpoint, dev)
    if not net.has_denoiser:
        raise ModelError("This model has no denoising decoder (segmentation-only)")
    img, out = _predict(net, cfg, image, dev, rep, ("den",))
    arr = denormalise(out["den"][0, 0].numpy(), cfg.get("norm", {})).astype(np.float32)
    rep(1.0, "done")
    return _back_to_input(_to_image(np.maximum(arr, 0), img), image, False)


def segment_fake_fdpet(image: sitk.Image, denoiser: str | Path | dict, segmenter: str | Path | dict,
                       organs: str | int | Iterable[str | int] | None = None, device: str | torch.device = "auto",
                       progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
                       **kwargs: bool | None) -> tuple[sitk.Image, sitk.Image | None]:
    """Fake-FDPET baseline: denoise with ``denoiser`` then segment the result with ``segmenter`` (a model trained
    on full-dose PET). ``kwargs`` go to :func:`segment`."""
    rep = Reporter(progress, cancel)
    fake = denoise(image, denoiser, device, progress=rep.sub(0.0, 0.5))
    return segment(fake, segmenter, organs, device, progress=rep.sub(0.5, 1.0), **kwargs)
