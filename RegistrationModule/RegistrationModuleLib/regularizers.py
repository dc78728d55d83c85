"""Implicitly solved regularisation (Ehrhardt & Handels, MLMI 2023), FFT solvers.

Given the current field ``u`` the auxiliary field ``ū = argmin_v ½‖u − v‖² + γ R(v)`` solves
``(I + γ L) ū = u`` with a positive semi-definite operator ``L``:

* ``diffusion``: ``L = −Δ`` (symbol ``|ξ|² = Σ_d 4 sin²(π k_d / N_d) / h_d²``);
* ``elastic``:   ``L = −μΔ − (μ + λ)∇div`` (Navier–Lamé, μ = 1, λ = 0 as in the paper), solved per frequency with
  the Sherman–Morrison closed form ``(1/a)(I − b ξξᵀ / (a + b|ξ|²))``, ``a = 1 + γμ|ξ|²``, ``b = γ(μ + λ)``;
* ``curvature``: ``L = Δ²`` (symbol ``|ξ|⁴``).

The DFT implies periodic boundaries; the field is mirror-padded by a margin of a few filter lengths first so
that opposite image borders do not interact.  The solve is pointwise per frequency, O(n log n), and is done
without gradient (``torch.no_grad``) as in the paper.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence

KINDS = ("diffusion", "elastic", "curvature")


def _symbols(shape, spacing_arr, device, dtype):
    """Per-axis ξ_d (array order) on an rfft grid; returns list of broadcastable tensors."""
    nd = len(shape)
    xis = []
    for ax, (n, h) in enumerate(zip(shape, spacing_arr)):
        if ax == nd - 1:
            k = torch.arange(n // 2 + 1, device=device, dtype=dtype)
        else:
            k = torch.fft.fftfreq(n, d=1.0 / n).to(device=device, dtype=dtype)
        xi = 2.0 * torch.sin(math.pi * k / n) / h
        view = [1] * nd
        view[ax] = xi.numel()
        xis.append(xi.view(*view))
    return xis


@torch.no_grad()
def implicit_solve(field: torch.Tensor, gamma_mm2: float, spacing: Sequence[float], kind: str = "diffusion",
                   mu: float = 1.0, lam: float = 0.0) -> torch.Tensor:
    """Return ``ū = (I + γL)^{-1} u`` for a field ``(1, nd, *spatial)`` in mm.

    ``gamma_mm2`` is γ in mm² (physical, hence resolution independent); ``spacing`` is the grid spacing of this
    field per index axis (x, y, z) in mm.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown regulariser '{kind}', choose one of {KINDS}")
    if gamma_mm2 <= 0:
        return field.clone()
    nd = field.shape[1]
    shape = field.shape[2:]
    spacing_arr = list(spacing)[::-1]  # array order
    # mirror padding, about 3 filter lengths, less than the size (reflect needs pad < n)
    L = math.sqrt(gamma_mm2)
    if kind == "curvature":
        L = gamma_mm2 ** 0.25
    pads = []
    for n, h in zip(shape[::-1], spacing_arr[::-1]):
        p = int(min(n - 1, math.ceil(3.0 * L / h) + 2))
        pads += [p, p]
    x = F.pad(field, pads, mode="reflect") if any(pads) else field
    pshape = x.shape[2:]
    dims = tuple(range(2, 2 + nd))
    X = torch.fft.rfftn(x, dim=dims)
    xis = _symbols(pshape, spacing_arr, field.device, field.dtype)
    xi2 = sum(xi ** 2 for xi in xis)
    if kind == "diffusion":
        Y = X / (1.0 + gamma_mm2 * xi2)
    elif kind == "curvature":
        Y = X / (1.0 + gamma_mm2 * xi2 ** 2)
    else:
        a = 1.0 + gamma_mm2 * mu * xi2
        b = gamma_mm2 * (mu + lam)
        # channel c is index axis c -> its symbol is xis[nd-1-c] (array order reversed)
        xi_c = [xis[nd - 1 - c] for c in range(nd)]
        dot = sum(xi_c[c] * X[:, c] for c in range(nd))
        coef = b / (a + b * xi2)
        Y = torch.stack([(X[:, c] - coef * xi_c[c] * dot) / a for c in range(nd)], dim=1)
    y = torch.fft.irfftn(Y, s=pshape, dim=dims)
    sl = [slice(None), slice(None)]
    for ax in range(nd):
        p = pads[2 * (nd - 1 - ax)]
        sl.append(slice(p, p + shape[ax]))
    return y[tuple(sl)].contiguous()
