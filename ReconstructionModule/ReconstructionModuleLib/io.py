"""Sinogram files: a simple ``.npz`` container for 2D multi-slice data, and reconstruction from it.

Keys: ``prompts`` (nz, n_views, n_bins) counts; ``spacing`` (z, y, x) mm of the image grid; ``shape`` (nz, ny, nx);
optional ``additive`` (randoms + scatter, same shape as prompts), ``norm`` (per-bin multiplicative factors),
``mu`` (attenuation map (nz, ny, nx) in 1/mm), ``psf_fwhm_mm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError

from .osem import osem
from .projector import PETSystem

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    import torch

__all__ = ["save_sinogram", "load_sinogram", "reconstruct_sinogram_file"]


def save_sinogram(path: str | Path, prompts: np.ndarray, spacing: Sequence[float], shape: Sequence[int],
                  **extra: np.ndarray | float | None) -> Path:
    from PETWorkbenchLib.imageio import save_npz
    return save_npz(path, prompts=np.asarray(prompts, np.float32), spacing=np.asarray(spacing, float),
                    shape=np.asarray(shape, int), **{k: np.asarray(v) for k, v in extra.items() if v is not None})


def load_sinogram(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise InputError(f"sinogram file not found: {p}")
    if p.suffix.lower() != ".npz":
        raise InputError(f"unknown sinogram file format '{p.suffix}' for {p.name}: expected a .npz sinogram "
                         "(see ReconstructionModuleLib.io) or use 'listmode' for PETLINK list-mode files")
    try:
        z = np.load(p)
        d = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any reader failure is an unreadable file
        raise InputError(f"cannot read sinogram file {p.name}: {e}") from None
    for k in ("prompts", "spacing", "shape"):
        if k not in d:
            raise InputError(f"sinogram file {p.name} lacks the '{k}' array")
    if d["prompts"].ndim != 3:
        raise InputError(f"prompts must be (slices, views, bins), got shape {d['prompts'].shape}")
    if int(d["shape"][0]) != d["prompts"].shape[0]:
        raise InputError(f"image has {int(d['shape'][0])} slices but the sinogram has {d['prompts'].shape[0]}")
    return d


def reconstruct_sinogram_file(path: str | Path, out: str | Path, n_iter: int = 3, n_subsets: int = 8,
                              psf_fwhm_mm: float = 0.0, post_filter_mm: float = 0.0, device: str | torch.device = "cpu",
                              progress: Callable[[float, str], None] | None = None,
                              cancel: Callable[[], bool] | None = None, inputs: Iterable[str | Path] = (),
                              overwrite: bool = True) -> dict:
    d = load_sinogram(path)
    y = d["prompts"]
    shape = tuple(int(v) for v in d["shape"])
    sp = tuple(float(v) for v in d["spacing"])
    psf = float(d["psf_fwhm_mm"]) if "psf_fwhm_mm" in d and not psf_fwhm_mm else psf_fwhm_mm
    system = PETSystem(shape, sp, psf_fwhm_mm=psf, mu=d.get("mu"), norm=d.get("norm"), n_angles=y.shape[1],
                       n_bins=y.shape[2], n_subsets=n_subsets, device=device)
    x = osem(system, y, d.get("additive"), n_iter=n_iter, post_filter_fwhm_mm=post_filter_mm, progress=progress,
             cancel=cancel)
    im = sitk.GetImageFromArray(x.cpu().numpy().astype(np.float32))
    im.SetSpacing((sp[2], sp[1], sp[0]))
    from PETWorkbenchLib.imageio import write_image
    write_image(im, out, inputs=tuple(inputs) + (path,), overwrite=overwrite)
    return {"output": str(out), "prompts": float(y.sum()), "shape": list(shape), "iterations": n_iter,
            "subsets": n_subsets}
