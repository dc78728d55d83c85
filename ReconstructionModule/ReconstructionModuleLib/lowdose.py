"""Count-domain and image-domain low-dose simulation (the way DRMC made its low-dose data).

DRMC (Sec. 3.1): "randomly selecting a certain portion of the raw scans according to the dose reduction factor
(DRF)" and reconstructing with standard OSEM.  Selecting each recorded count independently with probability
1/DRF is binomial thinning; a thinned Poisson process is again Poisson with mean / DRF.
"""

from __future__ import annotations

import numpy as np
import torch

from PETWorkbenchLib.errors import InputError

__all__ = ["check_drf", "thin_counts", "poisson_sample"]


def check_drf(drf: float) -> float:
    try:
        d = float(drf)
    except (TypeError, ValueError):
        raise InputError(f"dose reduction factor must be a number >= 1, got {drf!r}") from None
    if not np.isfinite(d) or d < 1.0:
        raise InputError(f"dose reduction factor (DRF) must be >= 1, got {drf}")
    return d


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def thin_counts(counts: np.ndarray | torch.Tensor, drf: float, seed: int | np.random.Generator | None = 0
                ) -> np.ndarray | torch.Tensor:
    """Keep each count with probability 1/DRF (binomial thinning).  ``counts``: integer-valued array/tensor."""
    d = check_drf(drf)
    is_t = torch.is_tensor(counts)
    c = counts.detach().cpu().numpy() if is_t else np.asarray(counts)
    if c.size == 0:
        raise InputError("the count array is empty")
    if np.any(c < 0) or not np.all(np.isfinite(c)):
        raise InputError("counts must be finite and >= 0")
    ci = np.rint(c).astype(np.int64)
    if np.any(np.abs(ci - c) > 1e-6):
        raise InputError("binomial thinning needs integer counts (measured data), got non-integer values")
    if ci.sum() == 0:
        raise InputError("the data have zero counts; nothing to thin")
    out = _rng(seed).binomial(ci, 1.0 / d).astype(np.float32)
    return torch.from_numpy(out).to(counts.device) if is_t else out


def poisson_sample(mean: np.ndarray | torch.Tensor, seed: int | np.random.Generator | None = 0
                   ) -> np.ndarray | torch.Tensor:
    """Poisson realisation of an expected-count array (deterministic for a given seed)."""
    is_t = torch.is_tensor(mean)
    m = mean.detach().cpu().double().numpy() if is_t else np.asarray(mean, dtype=np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise InputError("expected counts must be finite and >= 0")
    out = _rng(seed).poisson(m).astype(np.float32)
    return torch.from_numpy(out).to(mean.device) if is_t else out
