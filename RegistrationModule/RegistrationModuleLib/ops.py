"""Tensor operations shared by the registration engine (2D and 3D).

Conventions used throughout the engine:

* images are tensors ``(1, C, *spatial)`` with the spatial axes in SimpleITK array order ((z,) y, x);
* displacement fields are tensors ``(1, ndim, *spatial)`` whose channel ``c`` is the displacement **in mm along
  image index axis c** (c = 0 is x / i, 1 is y / j, 2 is z / k), i.e. ``D^T u_LPS`` for the image direction
  matrix ``D``.  Expressed in mm the field does not depend on the pyramid level;
* sampling uses ``grid_sample(..., align_corners=True)``, so a level with ``N_l`` samples along an axis spans the
  same physical extent ``extent = spacing * (N - 1)`` as the full-resolution image.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence


def spatial_ndim(t: torch.Tensor) -> int:
    return t.dim() - 2


def identity_grid(shape: Sequence[int], device: str | torch.device | None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised identity grid ``(1, *shape, ndim)`` with last axis ordered (x, y[, z])."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1
            else torch.zeros(1, device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")          # order (z, y, x)
    return torch.stack(mesh[::-1], dim=-1).unsqueeze(0)   # last axis (x, y, z)


def mm_to_norm(field: torch.Tensor, extent: Sequence[float]) -> torch.Tensor:
    """Field in mm (channel = index axis) -> normalised grid offsets ``(1, *spatial, ndim)``."""
    scale = torch.as_tensor([2.0 / max(e, 1e-6) for e in extent], device=field.device, dtype=field.dtype)
    nd = field.shape[1]
    return (field * scale.view(1, nd, *([1] * nd))).movedim(1, -1)


def warp(image: torch.Tensor, field: torch.Tensor, extent: Sequence[float], mode: str = "bilinear",
         padding_mode: str = "border", grid: torch.Tensor | None = None) -> torch.Tensor:
    """Sample ``image`` at ``x + u(x)`` (pull-back).  ``field`` in mm on the grid of the output."""
    if grid is None:
        grid = identity_grid(field.shape[2:], field.device, field.dtype)
    g = grid + mm_to_norm(field, extent)
    return F.grid_sample(image, g, mode=mode, padding_mode=padding_mode, align_corners=True)


class Sampler:
    """Samples moving-side tensors (on the moving image's own grid) at ``A(x + u(x))`` for fixed-grid points x.

    ``base`` ``(1, *fixed_shape, ndim)`` holds the normalised moving-grid coordinates of ``A(x)`` (last axis x, y,
    z), ``K`` ``(ndim, ndim)`` maps a displacement in mm along the fixed index axes to normalised moving
    coordinates, so the sampling point is ``base + K u`` (exact: A is affine).  The moving image is interpolated
    once per evaluation, however the pre-alignment and the grids differ."""

    def __init__(self, base: torch.Tensor, K: torch.Tensor):
        self.base, self.K = base, K

    @classmethod
    def identity(cls, shape: Sequence[int], extent: Sequence[float], device, dtype=torch.float32) -> Sampler:
        nd = len(shape)
        K = torch.diag(torch.as_tensor([2.0 / max(e, 1e-6) for e in extent][:nd], device=device, dtype=dtype))
        return cls(identity_grid(shape, device, dtype), K)

    def at(self, shape: Sequence[int]) -> Sampler:
        """The same map on a coarser fixed grid of the same extent (the base is linear: resizing is exact)."""
        if tuple(shape) == tuple(self.base.shape[1:-1]):
            return self
        b = resize(self.base.movedim(-1, 1), shape).movedim(1, -1)
        return Sampler(b, self.K)

    def covers(self, tol: float = 1e-4) -> bool:
        """True when every fixed-grid point maps inside the moving grid (no padding needed)."""
        return bool(self.base.abs().max() <= 1 + tol)

    def __call__(self, image: torch.Tensor, field: torch.Tensor | None, mode: str = "bilinear",
                 padding_mode: str = "border") -> torch.Tensor:
        g = self.base if field is None else self.base + field.movedim(1, -1) @ self.K.T
        return F.grid_sample(image, g, mode=mode, padding_mode=padding_mode, align_corners=True)


def bspline3(t: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline kernel (support [-2, 2])."""
    a = t.abs()
    return torch.where(a < 1, 2.0 / 3.0 - a * a + 0.5 * a ** 3,
                       torch.where(a < 2, (2.0 - a) ** 3 / 6.0, torch.zeros_like(a)))


class BSplineGrid:
    """Cubic B-spline free-form deformation on a control grid of ``spacing_mm`` (as elastix's B-spline transform):
    the dense field on a grid ``shape`` spanning ``extent`` is ``B_z ⊗ B_y ⊗ B_x`` applied to the coefficients, with
    one dense 1D matrix per axis (exact, differentiable, a few tensor contractions)."""

    def __init__(self, shape: Sequence[int], extent: Sequence[float], spacing_mm: float, device,
                 dtype=torch.float32):
        nd = len(shape)
        self.mats, self.cshape = [], []
        for ax, n in enumerate(shape):
            length = float(extent[nd - 1 - ax])                     # extent is ordered by index axis (x, y, z)
            k = int(math.ceil(length / spacing_mm)) + 3
            first = -(spacing_mm * (k - 1) - length) / 2.0           # control points centred on the image
            x = torch.linspace(0.0, length, n, device=device, dtype=torch.float64) if n > 1 else \
                torch.zeros(1, device=device, dtype=torch.float64)
            p = first + spacing_mm * torch.arange(k, device=device, dtype=torch.float64)
            self.mats.append(bspline3((x[:, None] - p[None, :]) / spacing_mm).to(dtype))
            self.cshape.append(k)
        self.cshape = tuple(self.cshape)

    def __call__(self, coef: torch.Tensor) -> torch.Tensor:
        """Coefficients ``(1, C, *cshape)`` -> dense field ``(1, C, *shape)``."""
        out = coef
        nd = len(self.mats)
        for ax, B in enumerate(self.mats):
            out = torch.movedim(torch.tensordot(out, B, dims=([2 + ax], [1])), -1, 2 + ax)
        return out if nd else coef


def compose_exp(velocity: torch.Tensor, extent: Sequence[float], steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of ``exp(v)`` for a stationary velocity field in mm."""
    grid = identity_grid(velocity.shape[2:], velocity.device, velocity.dtype)
    u = velocity / (2 ** steps)
    for _ in range(steps):
        u = u + warp(u, u, extent, grid=grid)
    return u


def resize(t: torch.Tensor, shape: Sequence[int], mode: str = "linear") -> torch.Tensor:
    nd = spatial_ndim(t)
    if tuple(t.shape[2:]) == tuple(shape):
        return t
    m = {"linear": "bilinear" if nd == 2 else "trilinear", "nearest": "nearest"}[mode]
    if m == "nearest":
        return F.interpolate(t, size=tuple(shape), mode=m)
    return F.interpolate(t, size=tuple(shape), mode=m, align_corners=True)


def gaussian_blur(t: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur; ``sigmas`` in voxels per spatial axis (array order)."""
    nd = spatial_ndim(t)
    C = t.shape[1]
    out = t
    for ax, s in enumerate(sigmas):
        if s <= 0.1:
            continue
        r = max(1, int(math.ceil(3 * s)))
        x = torch.arange(-r, r + 1, device=t.device, dtype=t.dtype)
        k = torch.exp(-0.5 * (x / s) ** 2)
        k = k / k.sum()
        shape = [1] * nd
        shape[ax] = k.numel()
        w = k.view(1, 1, *shape).repeat(C, 1, *([1] * nd))
        pad = [0] * (2 * nd)
        # F.pad takes pads from the last axis backwards
        pad[2 * (nd - 1 - ax)] = r
        pad[2 * (nd - 1 - ax) + 1] = r
        n_ax = out.shape[2 + ax]
        mode = "replicate" if r >= n_ax else "reflect"
        out = F.pad(out, pad, mode=mode)
        conv = F.conv2d if nd == 2 else F.conv3d
        out = conv(out, w, groups=C)
    return out


def box_filter(t: torch.Tensor, size: int) -> torch.Tensor:
    """Separable mean filter of odd ``size`` by running sums (mean over the valid part of the window)."""
    r = size // 2
    out = t
    nd = spatial_ndim(t)
    for ax in range(2, 2 + nd):
        n = out.shape[ax]
        pad = [0] * (2 * nd)
        i = 2 * (t.dim() - 1 - ax)
        pad[i], pad[i + 1] = r + 1, r
        c = F.pad(out, pad).cumsum(ax)
        s = c.narrow(ax, size, n) - c.narrow(ax, 0, n)
        idx = torch.arange(n, device=t.device)
        cnt = (torch.clamp(idx + r, max=n - 1) - torch.clamp(idx - r, min=0) + 1).to(t.dtype)
        shape = [1] * t.dim()
        shape[ax] = n
        out = s / cnt.view(shape)
    return out


def downsample(t: torch.Tensor, shape: Sequence[int], factor: float) -> torch.Tensor:
    """Anti-aliased resampling to ``shape`` (Gaussian pre-filter of sigma 0.5*factor voxels)."""
    if tuple(t.shape[2:]) == tuple(shape):
        return t
    sig = [0.5 * factor * 0.85] * spatial_ndim(t)
    return resize(gaussian_blur(t, sig), shape)


def spatial_gradient_mm(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    """Central-difference Jacobian of a mm field: ``J[c, d] = d u_c / d x_d`` (d = index axis, in mm).

    Returns a tensor ``(ndim, ndim, *spatial)``; ``spacing`` ordered by index axis (x, y, z).
    """
    nd = field.shape[1]
    u = field[0]
    rows = []
    for c in range(nd):
        cols = []
        for d in range(nd):
            dim = nd - 1 - d  # tensor axis of index axis d inside u[c]
            g = torch.gradient(u[c], spacing=float(spacing[d]), dim=dim)[0]
            cols.append(g)
        rows.append(torch.stack(cols))
    return torch.stack(rows)


def jacobian_determinant(field: torch.Tensor, spacing: Sequence[float]) -> torch.Tensor:
    J = spatial_gradient_mm(field, spacing)
    nd = J.shape[0]
    eye = torch.eye(nd, dtype=J.dtype, device=J.device).view(nd, nd, *([1] * nd))
    A = (J + eye).movedim(0, -1).movedim(0, -1)  # (..., nd, nd) with [..., c, d]
    return torch.linalg.det(A)
