"""OSEM / MLEM (Hudson & Larkin, IEEE TMI 1994; Shepp & Vardi 1982) for the :class:`PETSystem` model.

    x <- x / (B_k 1) * B_k( y_k / (F_k x + r_k) )

for the interleaved angular subsets k = 0..n_subsets-1 (one sub-iteration each); MLEM is OSEM with one subset.
An optional Gaussian post-filter (FWHM in mm) is applied to the final image only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.progress import Reporter

from .projector import PETSystem, gaussian_filter_3d

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["osem", "mlem", "sensitivity"]


def sensitivity(system: PETSystem) -> list[torch.Tensor]:
    """Per-subset sensitivity images B_k(1) (list of (nz, ny, nx) tensors)."""
    out = []
    for k in range(system.n_subsets):
        ones = torch.ones_like(system.subset_of(system.mult, k))
        out.append(system.back(ones, k))
    return out


def _check_sino(system, y, name):
    y = torch.as_tensor(np.asarray(y) if not torch.is_tensor(y) else y)
    if tuple(y.shape) != system.sino_shape:
        raise InputError(f"{name} shape {tuple(y.shape)} does not match the system sinogram {system.sino_shape}")
    y = y.to(system.dtype).to(system.device)
    if not torch.isfinite(y).all():
        raise InputError(f"{name} contains NaN or infinite values")
    if torch.any(y < 0):
        raise InputError(f"{name} has negative values (expected counts >= 0)")
    return y


def osem(system: PETSystem, prompts: np.ndarray | torch.Tensor, additive: np.ndarray | torch.Tensor | None = None,
         n_iter: int = 3, x0: np.ndarray | torch.Tensor | None = None, post_filter_fwhm_mm: float = 0.0,
         sens: list[torch.Tensor] | None = None, eps: float = 1e-8,
         progress: Callable[[float, str], None] | None = None,
         cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Reconstruct ``prompts`` (nz, n_angles, n_bins) with OSEM using ``system.n_subsets`` subsets.

    ``additive``: expected randoms + scatter sinogram (same shape) or None.  ``sens``: precomputed
    :func:`sensitivity` (reuse it for several data sets with the same system).  Returns an (nz, ny, nx) tensor in
    the activity units of the system model (counts per unit of ``system.mult``).
    """
    rep = Reporter(progress, cancel)
    if int(n_iter) < 1:
        raise InputError(f"number of iterations must be >= 1, got {n_iter}")
    y = _check_sino(system, prompts, "prompts sinogram")
    if float(y.sum()) <= 0:
        raise InputError("the sinogram has zero counts; nothing to reconstruct")
    r = None if additive is None else _check_sino(system, additive, "randoms+scatter sinogram")
    if sens is None:
        sens = sensitivity(system)
    x = torch.ones(system.shape, dtype=system.dtype, device=system.device) if x0 is None else \
        torch.as_tensor(x0).to(system.dtype).to(system.device).clone()
    mask = [s > eps * float(s.max()) for s in sens]
    total = int(n_iter) * system.n_subsets
    step = 0
    for it in range(int(n_iter)):
        for k in range(system.n_subsets):
            rep(step / total, f"OSEM iteration {it + 1}/{n_iter}, subset {k + 1}/{system.n_subsets}")
            yk = system.subset_of(y, k)
            fk = system.forward(x, k)
            if r is not None:
                fk = fk + system.subset_of(r, k)
            ratio = torch.where(fk > eps, yk / fk.clamp_min(eps), torch.zeros_like(fk))
            upd = system.back(ratio, k)
            x = torch.where(mask[k], x * upd / sens[k].clamp_min(eps), torch.zeros_like(x))
            step += 1
    if post_filter_fwhm_mm and post_filter_fwhm_mm > 0:
        x = gaussian_filter_3d(x, post_filter_fwhm_mm, system.spacing)
    rep(1.0, "OSEM done")
    return x


def mlem(system: PETSystem, prompts: np.ndarray | torch.Tensor, additive: np.ndarray | torch.Tensor | None = None,
         n_iter: int = 20, **kw: Any) -> torch.Tensor:
    """MLEM: OSEM with a single subset (``system`` must have been built with n_subsets=1)."""
    if system.n_subsets != 1:
        raise InputError(f"MLEM needs a system with one subset, this one has {system.n_subsets}")
    return osem(system, prompts, additive, n_iter=n_iter, **kw)
