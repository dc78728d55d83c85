"""Sliding-window patch inference (MONAI underneath) with progress, cancel and bounded memory.

Only ``sw_batch_size`` patches are on the compute device at a time; the blended output volume is kept on the CPU
(``sw_device`` = compute device, ``device`` = CPU for the accumulation), so a whole-body volume runs on a small GPU
or in a few GB of RAM. On CPU, ``sw_batch_size >= 2`` matters: batch-1 3D convolutions take a slow path in torch.
"""

from .errors import InputError
from .progress import Reporter


def sliding_window(predictor, image, roi_size, overlap=0.5, sw_batch_size=4, mode="gaussian", device=None,
                   progress=None, cancel=None, padding_mode="constant", cval=0.0, sigma_scale=0.125):
    """Run ``predictor`` (tensor (B,C,*roi) -> tensor or tuple/dict of tensors) over ``image`` (N,C,*spatial).

    Returns the blended prediction on the CPU with the spatial size of ``image``. ``device`` is where patches are
    computed (a torch.device or name; default: the image's device). ``sigma_scale``: the Gaussian blending
    weight's standard deviation as a fraction of the patch size (MONAI's and nnU-Net's 0.125 by default).
    """
    import torch
    from monai.inferers import sliding_window_inference

    if not torch.is_tensor(image):
        raise InputError("sliding_window expects a torch tensor (N, C, *spatial)")
    nd = len(roi_size)
    if image.ndim != nd + 2:
        raise InputError(f"Image has shape {tuple(image.shape)}; expected (N, C) + {nd} spatial dimensions "
                         f"to match the patch size {tuple(roi_size)}")
    if not torch.isfinite(image).all():
        raise InputError("Image contains NaN or infinite values")
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if not sigma_scale > 0:
        raise InputError(f"sigma_scale must be > 0, got {sigma_scale}")
    rep = Reporter(progress, cancel)
    compute = torch.device(device) if device is not None else image.device
    state = {"done": 0, "total": None}

    # total number of windows, for progress: same computation as MONAI's scan-interval
    import math
    spatial = image.shape[2:]
    roi = [min(int(r), int(s)) if r > 0 else int(s) for r, s in zip(roi_size, spatial)]
    n = 1
    for s, r in zip(spatial, roi):
        step = max(int(r * (1 - overlap)), 1) if r < s else 1
        n *= (math.ceil((max(s, r) - r) / step) + 1) if r < s else 1
    state["total"] = n * image.shape[0]

    def wrapped(patches, *a, **k):
        rep(state["done"] / max(state["total"], 1), f"patch {state['done']} of {state['total']}")
        with torch.no_grad():
            out = predictor(patches.to(compute))
        state["done"] += patches.shape[0]
        return out

    from .allocator import reuse_freed_memory
    with torch.no_grad(), reuse_freed_memory():   # the patches' intermediates reuse freed pages (allocator.py)
        out = sliding_window_inference(image.cpu(), roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                                       predictor=wrapped, overlap=overlap, mode=mode, padding_mode=padding_mode,
                                       cval=cval, sw_device=compute, device=torch.device("cpu"),
                                       sigma_scale=sigma_scale)
    rep(1.0, f"{state['done']} patches done")
    return out
