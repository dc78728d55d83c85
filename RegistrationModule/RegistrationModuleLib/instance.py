"""Multi-resolution instance optimisation of a dense field with the implicitly solved regulariser.

This is instance optimisation of the displacement itself (the plain "IO" baseline of the NIO paper, Mok et al.,
MLMI 2023), not NIO, which optimises the weights of a pretrained network per pair.  Per level ``l`` (coarse to fine,
the NIO paper's schedule ``iterations = (η1, η2, η3)``) the field parameters ``u`` (mm,
on the level grid, initialised from the upsampled previous level) are updated by Adam on the decoupled loss of
Ehrhardt & Handels

    L(u; ū) = D(F, M ∘ (Id + u)) + (σ/2) ‖(u − ū) / h‖²,     ū = (I + γL)^{-1} u   (no gradient),

where ``h`` is the full-resolution voxel size (so σ is dimensionless) and ``γ = smoothness · h²``.  In the
diffeomorphic mode ``u`` is a stationary velocity field and the deformation is its scaling-and-squaring exponential.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import ops, similarity as sim
from .regularizers import implicit_solve
from .similarities import INTERPOLATIONS

if TYPE_CHECKING:
    from collections.abc import Sequence

    from PETWorkbenchLib.progress import Reporter


# interpolation of the moving image at the full-resolution level -> sampler mode
SAMPLER_MODE = {"corrected": "corrected", "cubic": "bspline", "linear": "bilinear"}


def _t(a, device):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)[None, None]


def _onehot(lab_f, lab_m, device):
    values = sorted(set(np.unique(lab_f).tolist()) & set(np.unique(lab_m).tolist()) - {0})
    if not values:
        from PETWorkbenchLib.errors import InputError
        raise InputError("fixed and moving label maps share no label value (other than 0)")
    f = np.stack([(lab_f == v) for v in values]).astype(np.float32)
    m = np.stack([(lab_m == v) for v in values]).astype(np.float32)
    return torch.from_numpy(f)[None].to(device), torch.from_numpy(m)[None].to(device), values


class Adam:
    """Plain Adam (Kingma & Ba) on one tensor.  ``torch.optim`` is avoided on purpose: importing it pulls in
    torch._dynamo, which costs ~10 s on a small CPU machine for every command-line run."""

    def __init__(self, param, lr, betas=(0.9, 0.999), eps=1e-8, eps_rel=1.0):
        self.p, self.lr, self.b1, self.b2, self.eps = param, lr, betas[0], betas[1], eps
        self.eps_rel = eps_rel
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def zero_grad(self, set_to_none=True):
        self.p.grad = None

    @torch.no_grad()
    def step(self):
        g = self.p.grad
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        mhat = self.m / (1 - self.b1 ** self.t)
        vhat = self.v / (1 - self.b2 ** self.t)
        # ε relative to the RMS gradient (``eps_rel``; plain Adam: 0): where the similarity gives (almost) no
        # gradient -- outside masks, flat regions -- the step stays small instead of being normalised to ``lr``,
        # so modes the regulariser does not penalise (constants, and affine fields for curvature) cannot drift
        eps = self.eps + self.eps_rel * float(vhat.mean().sqrt())
        self.p.sub_(self.lr * mhat / (vhat.sqrt() + eps))


def _shapes(full, n_levels, final_scale):
    return [tuple(max(4, int(math.ceil((n - 1) / (2 ** (n_levels - 1 - lv) * final_scale))) + 1) for n in full)
            for lv in range(n_levels)]


def _pyramid(t0, shapes, n_levels, final_scale):
    """Images of every level, built fine to coarse (each blurred and resampled from the previous one)."""
    out, prev, prev_f = {}, t0, 1
    for lv in reversed(range(n_levels)):
        f = 2 ** (n_levels - 1 - lv) * final_scale
        rel = f // prev_f
        prev = ops.downsample(prev, shapes[lv], rel) if rel > 1 else prev
        out[lv], prev_f = prev, f
    return out


def optimise(F_np: np.ndarray, M_np: np.ndarray, spacing: Sequence[float], extent: Sequence[float],
             iterations: Sequence[int] = (100, 60, 25), similarity: str = "lncc", smoothness: float = 1.0,
             regularizer: str = "diffusion", diffeomorphic: bool = False, fixed_mask: np.ndarray | None = None,
             moving_mask: np.ndarray | None = None, sampler: ops.Sampler | None = None,
             fixed_labels: np.ndarray | None = None, moving_labels: np.ndarray | None = None,
             label_weight: float = 1.0, learning_rate: float = 0.5, penalty: float = 1.0, lncc_window: int = 7,
             device: str | torch.device = "cpu", rep: Reporter | None = None, init_field: np.ndarray | None = None,
             output_field: str = "smooth", final_scale: int = 1,
             interpolation: str = "corrected", lncc_eps: float | None = None) -> tuple[np.ndarray, dict]:
    """Return ``(field, info)``: field ``(ndim, *spatial)`` float64 numpy in mm along the fixed index axes.

    ``M_np`` (and ``moving_mask`` / ``moving_labels``) lie on the moving image's own grid and ``sampler`` maps the
    fixed grid into it (pre-alignment included), so the moving image is interpolated once; without a sampler the
    moving arrays are on the fixed grid.
    ``interpolation``: how the similarity samples the moving image at the full-resolution level: "corrected"
    (default: linear with its position-dependent blur removed, :func:`ops.sample_corrected`), "cubic" (B-spline,
    :func:`ops.sample_cubic`, about twice the time) or "linear"; coarser levels are always linear.  Linear
    interpolation blurs by a variance ``f(1 - f)`` voxel² that depends on the sub-voxel position ``f``, so the
    similarity prefers grid-aligned displacements (a bias towards whole-voxel shifts, towards zero for small ones).
    ``lncc_eps``: LNCC's stabiliser on the [0, 1]-normalised images (None: :data:`similarity.LNCC_EPS`).
    """
    if interpolation not in SAMPLER_MODE:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    nd = F_np.ndim
    full = F_np.shape
    h = float(np.mean(spacing))
    gamma = float(smoothness) * h * h
    F0, M0 = _t(F_np, device), _t(M_np, device)
    if sampler is None:
        if M_np.shape != full:
            raise ValueError("moving arrays on another grid need a sampler")
        sampler = ops.Sampler.identity(full, extent, device)
    fm0 = _t(fixed_mask > 0, device) if fixed_mask is not None else None
    mm0 = _t(moving_mask > 0, device) if moving_mask is not None else None
    # without a moving mask, points that fall outside the moving image get no weight (its support, computed in
    # closed form: Sampler.support)
    support = mm0 is None and not sampler.covers()
    labels = None
    if fixed_labels is not None:
        labels = _onehot(fixed_labels, moving_labels, device)
    from .similarities import similarity_term
    label_only = not similarity_term(similarity).uses_images
    n_levels = len(iterations)
    shapes = _shapes(full, n_levels, final_scale)
    mshapes = _shapes(M_np.shape, n_levels, final_scale)
    pyr_F = _pyramid(F0, shapes, n_levels, final_scale)
    pyr_M = _pyramid(M0, mshapes, n_levels, final_scale)
    total_it = max(1, sum(iterations))
    done = 0
    u = None
    if init_field is not None:
        u = torch.as_tensor(init_field, dtype=torch.float32, device=device)[None]
    history = []
    loss_before = None
    for lv, (shape, n_it) in enumerate(zip(shapes, iterations)):
        factor = 2 ** (n_levels - 1 - lv) * final_scale
        lspacing = [extent[c] / max(shape[nd - 1 - c] - 1, 1) for c in range(nd)]
        F, M = pyr_F[lv], pyr_M[lv]
        samp = sampler.at(shape)
        fm = (ops.resize(fm0, shape) > 0.5).float() if fm0 is not None else None
        mm = ops.resize(mm0, mshapes[lv]) if mm0 is not None else None
        win = lncc_window if factor == 1 else max(3, lncc_window - 2)
        mode = SAMPLER_MODE[interpolation] if factor == 1 else "bilinear"
        if labels is not None:
            Lf = ops.downsample(labels[0], shape, factor)
            Lm = ops.downsample(labels[1], mshapes[lv], factor)
        image_loss = None
        if not label_only:
            # the similarity's fixed side on the fixed grid; its moving side (image or descriptor) is computed on
            # the moving grid and sampled
            image_loss = sim.image_term(similarity, F, M, win, mode=mode, lncc_eps=lncc_eps)
        if u is None:
            u0 = torch.zeros((1, nd) + shape, device=device)
        else:
            u0 = ops.resize(u, shape)
        param = u0.clone().requires_grad_(True)
        opt = Adam(param, lr=learning_rate * float(np.mean(lspacing)))

        def deformation(p):
            return ops.compose_exp(p, extent) if diffeomorphic else p

        def similarity_loss(disp):
            weight = fm
            if mm is not None or support:
                # a weight, not a term to optimise: without the detach the field is pulled to move points in or
                # out of the moving support (measured on MNI with an affine pre-alignment: error 0.32 -> 0.20 voxel)
                with torch.no_grad():
                    wm = samp(mm, disp, padding_mode="zeros") if mm is not None else samp.support(disp, mshapes[lv])
                weight = wm if weight is None else weight * wm
            loss = 0.0
            if image_loss is not None:
                loss = image_loss(lambda t: samp(t, disp, mode=mode), weight)
            if labels is not None:
                wl = 1.0 if label_only else label_weight
                loss = loss + wl * sim.soft_dice(Lf, samp(Lm, disp), weight)
            return loss

        if lv == 0:
            with torch.no_grad():
                loss_before = float(similarity_loss(torch.zeros_like(u0)))
        t_level = time.perf_counter()
        sub = rep.sub(done / total_it, (done + n_it) / total_it) if rep is not None else None
        for it in range(n_it):
            if sub is not None and it % 5 == 0:
                sub(it / max(n_it, 1), f"level {lv + 1}/{n_levels} ({'x'.join(map(str, shape[::-1]))}), "
                                       f"iteration {it + 1}/{n_it}")
            ubar = implicit_solve(param.detach(), gamma, lspacing, regularizer)
            opt.zero_grad(set_to_none=True)
            d_loss = similarity_loss(deformation(param))
            reg = 0.5 * penalty * (((param - ubar) / h) ** 2).sum(1).mean()
            loss = d_loss + reg
            loss.backward()
            opt.step()
            if it == n_it - 1:
                history.append({"level": lv + 1, "shape": list(shape[::-1]), "iterations": n_it,
                                "similarity": round(float(d_loss.detach()), 5),
                                "penalty": round(float(reg.detach()), 6),
                                "time_s": round(time.perf_counter() - t_level, 2)})
        done += n_it
        with torch.no_grad():
            u = param.detach()
            if output_field == "smooth" or lv < n_levels - 1:
                u = implicit_solve(u, gamma, lspacing, regularizer)
    with torch.no_grad():
        if u is None:
            u = torch.zeros((1, nd) + tuple(full), device=device)
        u = ops.resize(u, full)
        final = ops.compose_exp(u, extent) if diffeomorphic else u
    info = {"similarity_before": None if loss_before is None else round(loss_before, 5), "levels": history}
    return final[0].double().cpu().numpy(), info
