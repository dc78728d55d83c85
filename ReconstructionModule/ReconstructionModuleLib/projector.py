"""2D multi-slice PET system model with an exact adjoint.

Geometry: each axial slice (rebinned 2D data) is a parallel-beam sinogram with ``n_angles`` views over
[0, pi) and ``n_bins`` radial bins of width ``bin_mm``.  The line integrals are computed with Joseph's method
(P. M. Joseph, IEEE TMI 1982): along each line, step one pixel row (or column, whichever the line crosses
more steeply), interpolate linearly between the two nearest pixels, weight by the path length per step.
The weights are stored as a sparse matrix A (rows = angle*n_bins + bin, columns = y*nx + x); the back projector
is the explicit transpose, so the pair (A, A^T) is an exact adjoint pair up to floating-point rounding.

The full system model (:class:`PETSystem`) is

    ybar = eta * att * A( G x ) + r

with G an image-space Gaussian resolution model (PSF, FWHM in mm; separable, symmetric kernel, zero padded,
hence self-adjoint), att = exp(-A mu) the attenuation factors from a mu-map (1/mm), eta the per-bin
normalisation / sensitivity, and r an additive randoms + scatter sinogram (handled by the reconstruction).

Arrays follow SimpleITK order: images (nz, ny, nx), sinograms (nz, n_angles, n_bins).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from PETWorkbenchLib.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["joseph_matrix", "ParallelProjector", "PETSystem", "gaussian_filter_3d", "gaussian_matrix",
           "default_sinogram_shape"]


def default_sinogram_shape(nx: int, ny: int, angle_factor: float = 0.75) -> tuple[int, int]:
    """Radial bins cover the image diagonal; views = angle_factor * bins (rounded up to a multiple of 4)."""
    n_bins = int(math.ceil(math.hypot(nx, ny))) + 2
    n_angles = int(math.ceil(angle_factor * n_bins / 4.0) * 4)
    return n_angles, n_bins


def joseph_matrix(nx: int, ny: int, pixel_mm: float, angles: np.ndarray | Sequence[float], n_bins: int,
                  bin_mm: float | None = None,
                  bin_positions_mm: np.ndarray | Sequence[float] | None = None) -> sp.csr_matrix:
    """Sparse (len(angles)*n_bins, ny*nx) scipy CSR matrix of line-integral weights (mm).

    Pixel (iy, ix) has its centre at ((ix - (nx-1)/2) * pixel_mm, (iy - (ny-1)/2) * pixel_mm); the line of
    view angle theta and radial offset s is {(x, y): x cos(theta) + y sin(theta) = s}.  Radial offsets are
    uniform (``bin_mm``) unless ``bin_positions_mm`` (length n_bins, e.g. non-arc-corrected scanner bins) is given.
    """
    if nx < 1 or ny < 1 or n_bins < 1:
        raise InputError(f"projector size must be positive, got nx={nx}, ny={ny}, n_bins={n_bins}")
    if not pixel_mm > 0:
        raise InputError(f"pixel size must be > 0 mm, got {pixel_mm}")
    bin_mm = float(pixel_mm if bin_mm is None else bin_mm)
    angles = np.asarray(angles, dtype=np.float64).ravel()
    if bin_positions_mm is not None:
        s = np.asarray(bin_positions_mm, dtype=np.float64).ravel()
        if s.size != n_bins:
            raise InputError(f"{s.size} bin positions given for {n_bins} bins")
    else:
        s = (np.arange(n_bins) - (n_bins - 1) / 2.0) * bin_mm
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    rows_all, cols_all, vals_all = [], [], []
    for k, th in enumerate(angles):
        c, sn = math.cos(th), math.sin(th)
        row0 = k * n_bins
        if abs(c) >= abs(sn):
            # the line is closer to the y axis: step over rows iy, x = (s - y sin) / cos
            iy = np.arange(ny)
            y = (iy - cy) * pixel_mm
            x = (s[:, None] - y[None, :] * sn) / c
            fx = x / pixel_mm + cx
            w = pixel_mm / abs(c)
            i0 = np.floor(fx).astype(np.int64)
            f = fx - i0
            for di, wt in ((0, 1.0 - f), (1, f)):
                ii = i0 + di
                ok = (ii >= 0) & (ii < nx) & (wt > 0)
                b, r = np.nonzero(ok)
                rows_all.append(row0 + b)
                cols_all.append(iy[r] * nx + ii[b, r])
                vals_all.append(w * wt[b, r])
        else:
            ix = np.arange(nx)
            x = (ix - cx) * pixel_mm
            y = (s[:, None] - x[None, :] * c) / sn
            fy = y / pixel_mm + cy
            w = pixel_mm / abs(sn)
            j0 = np.floor(fy).astype(np.int64)
            f = fy - j0
            for dj, wt in ((0, 1.0 - f), (1, f)):
                jj = j0 + dj
                ok = (jj >= 0) & (jj < ny) & (wt > 0)
                b, r = np.nonzero(ok)
                rows_all.append(row0 + b)
                cols_all.append(jj[b, r] * nx + ix[r])
                vals_all.append(w * wt[b, r])
    rows = np.concatenate(rows_all) if rows_all else np.zeros(0, np.int64)
    cols = np.concatenate(cols_all) if cols_all else np.zeros(0, np.int64)
    vals = np.concatenate(vals_all) if vals_all else np.zeros(0)
    A = sp.csr_matrix((vals, (rows, cols)), shape=(len(angles) * n_bins, nx * ny))
    A.sum_duplicates()
    A.sort_indices()
    return A


def _to_torch_csr(m, dtype, device):
    m = m.tocsr()
    m.sort_indices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                    torch.from_numpy(m.indices.astype(np.int64)),
                                    torch.from_numpy(m.data).to(dtype), size=m.shape, check_invariants=False)
    return t.to(device)


class ParallelProjector:
    """Slice-by-slice parallel-beam line-integral projector, split into interleaved angular subsets.

    ``forward(img (nz, ny, nx)) -> sino (nz, n_angles, n_bins)``, ``back`` is its exact transpose.
    ``subset=k`` restricts to the views k, k + n_subsets, ... (sinogram shape (nz, n_angles_k, n_bins)).
    """

    def __init__(self, nx: int, ny: int, pixel_mm: float, n_angles: int | None = None, n_bins: int | None = None,
                 n_subsets: int = 1, bin_mm: float | None = None, dtype=torch.float32, device="cpu",
                 bin_positions_mm=None):
        da, db = default_sinogram_shape(nx, ny)
        self.nx, self.ny = int(nx), int(ny)
        self.pixel_mm = float(pixel_mm)
        self.n_angles = int(n_angles or da)
        self.n_bins = int(n_bins or db)
        if n_subsets < 1 or n_subsets > self.n_angles:
            raise InputError(f"number of subsets must be in 1..{self.n_angles} (views), got {n_subsets}")
        self.n_subsets = int(n_subsets)
        self.bin_mm = float(pixel_mm if bin_mm is None else bin_mm)
        self.dtype, self.device = dtype, torch.device(device)
        self.angles = np.arange(self.n_angles) * math.pi / self.n_angles
        self.subset_views = [np.arange(k, self.n_angles, self.n_subsets) for k in range(self.n_subsets)]
        self._A, self._AT = [], []
        for views in self.subset_views:
            A = joseph_matrix(self.nx, self.ny, self.pixel_mm, self.angles[views], self.n_bins, self.bin_mm,
                              bin_positions_mm)
            self._A.append(_to_torch_csr(A, dtype, self.device))
            self._AT.append(_to_torch_csr(A.T.tocsr(), dtype, self.device))

    @property
    def nnz(self):
        return int(sum(a.values().numel() for a in self._A))

    def _check_img(self, img):
        if img.ndim != 3 or tuple(img.shape[1:]) != (self.ny, self.nx):
            raise InputError(f"image shape {tuple(img.shape)} does not match the projector grid "
                             f"(nz, {self.ny}, {self.nx})")

    def forward(self, img: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        self._check_img(img)
        nz = img.shape[0]
        X = img.reshape(nz, -1).T.to(self.dtype).contiguous()
        if subset is not None:
            Y = self._A[subset] @ X
            return Y.T.reshape(nz, len(self.subset_views[subset]), self.n_bins)
        out = torch.empty(nz, self.n_angles, self.n_bins, dtype=self.dtype, device=X.device)
        for views, A in zip(self.subset_views, self._A):
            out[:, torch.as_tensor(views, device=X.device)] = (A @ X).T.reshape(nz, len(views), self.n_bins)
        return out

    def back(self, sino: torch.Tensor, subset: int | None = None) -> torch.Tensor:
        nz = sino.shape[0]
        if subset is not None:
            nv = len(self.subset_views[subset])
            if tuple(sino.shape[1:]) != (nv, self.n_bins):
                raise InputError(f"sinogram shape {tuple(sino.shape)} does not match subset {subset} "
                                 f"(nz, {nv}, {self.n_bins})")
            Y = sino.reshape(nz, -1).T.to(self.dtype).contiguous()
            return (self._AT[subset] @ Y).T.reshape(nz, self.ny, self.nx)
        if tuple(sino.shape[1:]) != (self.n_angles, self.n_bins):
            raise InputError(f"sinogram shape {tuple(sino.shape)} does not match the projector "
                             f"(nz, {self.n_angles}, {self.n_bins})")
        acc = None
        for k, views in enumerate(self.subset_views):
            part = sino[:, torch.as_tensor(views, device=sino.device)]
            Y = part.reshape(nz, -1).T.to(self.dtype).contiguous()
            r = self._AT[k] @ Y
            acc = r if acc is None else acc + r
        return acc.T.reshape(nz, self.ny, self.nx)

    def subset_of(self, sino: torch.Tensor, subset: int) -> torch.Tensor:
        """The views of ``sino`` (nz, n_angles, n_bins) that belong to ``subset``."""
        return sino[:, torch.as_tensor(self.subset_views[subset], device=sino.device)]


def gaussian_matrix(n: int, fwhm_mm: float, spacing_mm: float, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> torch.Tensor | None:
    """Symmetric (n, n) matrix of a sampled, normalised 1D Gaussian with zero padding (None if negligible)."""
    sigma = float(fwhm_mm) / (2.0 * math.sqrt(2.0 * math.log(2.0))) / float(spacing_mm)
    if sigma < 1e-3 or n < 2:
        return None
    r = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).abs()
    m = torch.where(d <= r, k[(d.clamp(max=r) + r)], torch.zeros((), dtype=torch.float64))
    return m.to(dtype=dtype, device=device)


_GM_CACHE = {}


def gaussian_filter_3d(img: torch.Tensor, fwhm_mm: float | Sequence[float | None],
                       spacing_zyx: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian filter of an (nz, ny, nx) tensor with zero padding (a symmetric, self-adjoint operator).

    ``fwhm_mm`` is a scalar (isotropic) or a (z, y, x) triple; axes whose sigma is negligible are skipped.
    Implemented as products with symmetric banded matrices (fast on CPU and GPU).
    """
    if np.isscalar(fwhm_mm):
        fwhm_mm = (fwhm_mm,) * 3
    out = img
    for axis, (fw, sp_) in enumerate(zip(fwhm_mm, spacing_zyx)):
        if fw is None or fw <= 0:
            continue
        n = img.shape[axis]
        key = (n, float(fw), float(sp_), img.dtype, str(img.device))
        if key not in _GM_CACHE:
            if len(_GM_CACHE) > 32:
                _GM_CACHE.clear()
            _GM_CACHE[key] = gaussian_matrix(n, fw, sp_, img.dtype, img.device)
        m = _GM_CACHE[key]
        if m is None:
            continue
        if axis == 2:
            out = out @ m
        elif axis == 1:
            out = m @ out
        else:
            out = (m @ out.reshape(n, -1)).reshape(out.shape)
    return out.contiguous()


class PETSystem:
    """ybar = eta * att * A(G x) (+ additive term, given to the reconstruction separately).

    Parameters
    ----------
    shape : (nz, ny, nx) image grid; spacing : (sz, sy, sx) mm (in-plane pixels must be square).
    psf_fwhm_mm : resolution model FWHM (scalar or (z, y, x)); 0 = none.
    mu : optional attenuation map (nz, ny, nx) in 1/mm on the same grid (see ``simulate.hu_to_mu``).
    norm : optional per-bin normalisation/sensitivity, broadcastable to (nz, n_angles, n_bins).
    """

    def __init__(self, shape, spacing, psf_fwhm_mm=0.0, mu=None, norm=None, n_angles=None, n_bins=None,
                 n_subsets=1, dtype=torch.float32, device="cpu", projector: ParallelProjector | None = None):
        if len(shape) != 3 or len(spacing) != 3:
            raise InputError(f"shape and spacing must be (z, y, x) triples, got {shape} and {spacing}")
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        if min(self.spacing) <= 0:
            raise InputError(f"voxel spacing must be positive, got {self.spacing}")
        if abs(self.spacing[1] - self.spacing[2]) > 1e-3 * self.spacing[2]:
            raise InputError(f"in-plane pixels must be square for the 2D projector, got spacing {self.spacing}")
        self.proj = projector or ParallelProjector(self.shape[2], self.shape[1], self.spacing[2], n_angles, n_bins,
                                                   n_subsets=n_subsets, dtype=dtype, device=device)
        if (self.proj.nx, self.proj.ny) != (self.shape[2], self.shape[1]):
            raise InputError("the given projector does not match the image grid")
        self.n_subsets = self.proj.n_subsets
        self.dtype, self.device = self.proj.dtype, self.proj.device
        self.psf_fwhm_mm = psf_fwhm_mm
        self.sino_shape = (self.shape[0], self.proj.n_angles, self.proj.n_bins)
        mult = torch.ones(self.sino_shape, dtype=self.dtype, device=self.device)
        if mu is not None:
            mu_t = torch.as_tensor(np.asarray(mu) if not torch.is_tensor(mu) else mu).to(self.dtype).to(self.device)
            if tuple(mu_t.shape) != self.shape:
                raise InputError(f"mu-map shape {tuple(mu_t.shape)} does not match the image grid {self.shape}")
            if torch.any(mu_t < 0):
                raise InputError("mu-map has negative attenuation coefficients")
            mult = mult * torch.exp(-self.proj.forward(mu_t))
        if norm is not None:
            n_t = torch.as_tensor(norm).to(self.dtype).to(self.device)
            try:
                n_t = torch.broadcast_to(n_t, self.sino_shape)
            except RuntimeError:
                raise InputError(f"normalisation shape {tuple(n_t.shape)} does not broadcast to the sinogram "
                                 f"{self.sino_shape}") from None
            if torch.any(n_t < 0):
                raise InputError("normalisation factors must be >= 0")
            mult = mult * n_t
        self.mult = mult.contiguous()

    def psf(self, x):
        if not self.psf_fwhm_mm:
            return x
        return gaussian_filter_3d(x, self.psf_fwhm_mm, self.spacing)

    def _img(self, x):
        x = torch.as_tensor(x).to(self.dtype).to(self.device)
        if tuple(x.shape) != self.shape:
            raise InputError(f"image shape {tuple(x.shape)} does not match the system grid {self.shape}")
        return x

    def forward(self, x, subset=None):
        x = self._img(x)
        y = self.proj.forward(self.psf(x), subset)
        m = self.mult if subset is None else self.proj.subset_of(self.mult, subset)
        return y * m

    def back(self, y, subset=None):
        y = torch.as_tensor(y).to(self.dtype).to(self.device)
        m = self.mult if subset is None else self.proj.subset_of(self.mult, subset)
        if tuple(y.shape) != tuple(m.shape):
            raise InputError(f"sinogram shape {tuple(y.shape)} does not match the system {tuple(m.shape)}")
        return self.psf(self.proj.back(y * m, subset))

    def subset_of(self, sino, subset):
        return self.proj.subset_of(sino, subset)
