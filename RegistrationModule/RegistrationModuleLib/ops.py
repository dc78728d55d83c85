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

import functools
import itertools
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

    def points(self, field: torch.Tensor | None) -> torch.Tensor:
        """The normalised moving-grid coordinates ``base + K u`` of the fixed-grid points moved by ``field``."""
        return self.base if field is None else self.base + field.movedim(1, -1) @ self.K.T

    def support(self, field: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
        """The moving grid's support at the sampling points: what sampling an image of ones of ``shape`` with zero
        padding gives (``self(ones, field, padding_mode="zeros")``), in closed form, per axis
        ``clamp(min(i + 1, n - i), 0, 1)`` at the index coordinate ``i`` (bilinear weights of the nodes inside),
        multiplied over the axes: ``(1, 1, *fixed_shape)``, without gradient."""
        with torch.no_grad():
            g = self.points(field)
            out = None
            for a, n in enumerate(tuple(shape)[::-1]):            # grid axis a (x, y, z) is array axis nd - 1 - a
                i = (g[..., a] + 1.0) * 0.5 * (n - 1)               # a size-1 axis: index 0, weight 1
                w = torch.minimum(i + 1.0, n - i).clamp(0.0, 1.0)
                out = w if out is None else out * w
            return out.unsqueeze(1)

    def __call__(self, image: torch.Tensor, field: torch.Tensor | None, mode: str = "bilinear",
                 padding_mode: str = "border") -> torch.Tensor:
        """``mode`` "bilinear" / "nearest" (grid_sample); "bspline": ``image`` holds cubic B-spline coefficients
        (:func:`bspline_coefficients`), interpolated by :func:`sample_cubic`; "corrected": ``image`` is a
        :func:`second_differences` stack, interpolated by :func:`sample_corrected` (both border padding only)."""
        g = self.points(field)
        if mode in PREPARED_MODES:
            if padding_mode != "border":
                raise ValueError(f"{mode} sampling supports border padding only")
            return PREPARED_MODES[mode][1](image, g)
        return F.grid_sample(image, g, mode=mode, padding_mode=padding_mode, align_corners=True)


@functools.lru_cache(maxsize=16)
def dct_matrix(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (``n x n``, ``C @ C.T = I``): row k is ``cos(pi k (2i + 1) / 2n)``, scaled."""
    with torch.inference_mode(False):            # a cached plain tensor, usable later with autograd too
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None]
        C = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
        C[0] /= math.sqrt(2.0)
        return C.to(dtype=dtype, device=device)


def along_axis(x: torch.Tensor, M: torch.Tensor, dim: int) -> torch.Tensor:
    """``M`` applied along axis ``dim`` of the contiguous ``x`` (``y[..., k, ...] = sum_i M[k, i] x[..., i, ...]``),
    as one matrix product on a view (no transposed copies)."""
    shape = x.shape
    n = shape[dim]
    pre = math.prod(shape[:dim])
    post = math.prod(shape[dim + 1:])
    if post == 1:
        return (x.reshape(pre, n) @ M.T).reshape(shape)
    return torch.matmul(M, x.reshape(pre, n, post)).reshape(shape)


def bspline_coefficients(image: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline coefficients of ``image`` ``(1, C, *spatial)``: the ``c`` whose cubic B-spline interpolates the
    samples exactly (``c * [1, 4, 1] / 6 = image`` along every axis, Unser's prefilter), with half-sample symmetric
    boundaries, which the DCT-II diagonalises (eigenvalues ``(4 + 2 cos(pi k / n)) / 6``): exact, one small dense
    matrix per axis.  The edge extension it implies (``c[-1] = c[0]``) is grid_sample's "border" padding."""
    nd = spatial_ndim(image)
    X = image.contiguous()
    for ax in range(nd):
        n = int(image.shape[2 + ax])
        C = dct_matrix(n, image.dtype, str(image.device))
        k = torch.arange(n, device=image.device, dtype=torch.float64)
        gain = (6.0 / (4.0 + 2.0 * torch.cos(math.pi * k / n))).to(image.dtype)
        view = [1] * X.dim()
        view[2 + ax] = n
        X = along_axis(along_axis(X, C, 2 + ax) * gain.view(view), C.T, 2 + ax)
    return X


def _index_coordinates(image: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index coordinates (last axis x, y[, z]) of the normalised points ``grid`` in ``image`` (align_corners=True),
    clamped to the image as grid_sample's border padding clamps them, and the image size per axis minus one."""
    sizes = torch.as_tensor([float(n) for n in image.shape[2:][::-1]], device=grid.device, dtype=grid.dtype)
    span = (sizes - 1).clamp_min(1.0)
    return torch.minimum(((grid + 1.0) * 0.5 * span).clamp_min(0.0), sizes - 1), span


def sample_cubic(coef: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline interpolation of the coefficient image ``coef`` (:func:`bspline_coefficients`) at the
    normalised points ``grid`` (grid_sample's convention, align_corners=True, border padding), as ``2^ndim``
    linear interpolations at shifted points (Sigg & Hadwiger, GPU Gems 2, ch. 20): per axis the four B-spline
    weights ``w0..w3`` of the nodes ``i-1..i+2`` become two linear fetches at ``i - 1 + w1/(w0+w1)`` and
    ``i + 1 + w3/(w2+w3)`` weighted by ``w0+w1`` and ``w2+w3``.  Differentiable in ``grid`` and ``coef``."""
    nd = spatial_ndim(coef)
    # clamped to the image: border padding of the image, not of the coefficients (outside: the edge sample's value)
    x, span = _index_coordinates(coef, grid)
    i = torch.floor(x.detach())
    f = x - i
    w0, w1, w2, w3 = bspline3(f + 1), bspline3(f), bspline3(1 - f), bspline3(2 - f)   # nodes i-1, i, i+1, i+2
    g = ((w0 + w1), (w2 + w3))
    pos = ((i - 1 + w1 / g[0]) / span * 2 - 1, (i + 1 + w3 / g[1]) / span * 2 - 1)
    out = 0.0
    for sel in itertools.product((0, 1), repeat=nd):
        pts = torch.stack([pos[s][..., a] for a, s in enumerate(sel)], dim=-1)
        wt = g[sel[0]][..., 0]
        for a in range(1, nd):
            wt = wt * g[sel[a]][..., a]
        out = out + wt.unsqueeze(1) * F.grid_sample(coef, pts, mode="bilinear", padding_mode="border",
                                                    align_corners=True)
    return out


def second_differences(image: torch.Tensor) -> torch.Tensor:
    """``image`` ``(1, C, *spatial)`` stacked with its second differences ``[1, -2, 1]`` along every array axis
    (edge-replicated): ``(1, C * (1 + ndim), *spatial)``, the input of :func:`sample_corrected`."""
    nd = spatial_ndim(image)
    outs = [image]
    for ax in range(nd):
        d = 2 + ax
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - ax)] = pad[2 * (nd - 1 - ax) + 1] = 1
        p = F.pad(image, pad, mode="replicate")
        n = image.shape[d]
        outs.append(p.narrow(d, 0, n) - 2 * p.narrow(d, 1, n) + p.narrow(d, 2, n))
    return torch.cat(outs, 1)


def sample_corrected(stack: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Linear interpolation without its position-dependent blur, at the normalised points ``grid``
    (align_corners=True, border padding).  Linear interpolation at the sub-voxel position ``f`` of a cell is
    ``I + f(1 - f)/2 I''`` to second order, per axis: a blur whose size depends on where the point falls.  Its
    second-order term is subtracted, with ``I''`` the linearly interpolated second differences from
    :func:`second_differences` (``stack``), so the result is exact for quadratics and equally sharp at every
    sub-voxel position.  One grid_sample of ``1 + ndim`` channels per image channel."""
    nd = grid.shape[-1]
    c = stack.shape[1] // (1 + nd)
    x, _ = _index_coordinates(stack, grid)       # clamped: outside the image the correction vanishes
    f = x - torch.floor(x.detach())
    s = F.grid_sample(stack, grid, mode="bilinear", padding_mode="border", align_corners=True)
    out = s[:, :c]
    for a in range(nd):                                        # grid axis a is array axis nd - 1 - a
        block = 1 + (nd - 1 - a)
        out = out - (0.5 * f[..., a] * (1 - f[..., a])).unsqueeze(1) * s[:, c * block:c * (block + 1)]
    return out


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


# sampling modes whose input is prepared once: mode -> (prepare(image), sample(prepared, grid))
PREPARED_MODES = {"bspline": (bspline_coefficients, sample_cubic), "corrected": (second_differences, sample_corrected)}
