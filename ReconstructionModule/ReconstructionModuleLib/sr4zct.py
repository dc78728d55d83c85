"""SR4ZCT: self-supervised through-plane resolution enhancement for CT with arbitrary slice thickness and overlap
(Shi, Pelt, Batenburg, MLMI 2023).

* Slice model: a slice of thickness r^z has a box profile; slices are d = r^z - o^z apart (o^z = overlap).
* F_down(r^z, o^z) turns an image row axis with pixel r^xy into "virtual slices": box-averages of 9 linear
  interpolation samples around centres r^z/2, r^z/2 + d, ...; F_up interpolates linearly back to the r^xy grid.
  Both are linear, so their product along one axis is a (n, n) matrix applied to every image.
* Training pairs from the volume's own axial slices a_i (Eq. 1): (F_up F_down^ver a_i, a_i) and the same along the
  horizontal axis after a 90 degree rotation, so that the degraded direction is always vertical.
* Inference: upsample the volume along z with F_up, apply the network to every coronal and every sagittal slice
  (z vertical) and average the two passes.
* Network: a mixed-scale dense (MS-D) network (Pelt & Sethian 2018; width 1, dilations 1..10 cycling) as in the
  paper, but shallower and with a global residual connection so that it trains in minutes on a CPU (METHOD.md).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import psnr  # noqa: F401 - the engine's name for it (pass the HU range)
from PETWorkbenchLib.progress import Reporter

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["slice_profile_matrices", "degrade_axis_matrix", "MSDNet", "sr4zct", "sr4zct_array",
           "slice_thickness", "thick_slice_volume", "cubic_upsample", "psnr"]


def _interp_matrix(x_from, x_to):
    """(len(x_to), len(x_from)) matrix of linear interpolation (constant beyond the end points)."""
    x_from = np.asarray(x_from, float)
    x_to = np.asarray(x_to, float)
    n = len(x_from)
    M = np.zeros((len(x_to), n))
    if n == 1:
        M[:, 0] = 1.0
        return M
    xt = np.clip(x_to, x_from[0], x_from[-1])
    k = np.clip(np.searchsorted(x_from, xt, side="right") - 1, 0, n - 2)
    f = (xt - x_from[k]) / (x_from[k + 1] - x_from[k])
    M[np.arange(len(x_to)), k] = 1.0 - f
    M[np.arange(len(x_to)), k + 1] += f
    return M


def slice_profile_matrices(n: int, r_xy: float, r_z: float, o_z: float = 0.0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(D, U, centres): D (m, n) simulates m slices of thickness r_z and overlap o_z from n pixels of size r_xy;
    U (n, m) interpolates them back to the pixel centres."""
    if not (r_xy > 0 and r_z > 0):
        raise InputError(f"pixel size and slice thickness must be > 0, got {r_xy} and {r_z}")
    d = r_z - o_z
    if not d > 0:
        raise InputError(f"overlap {o_z} mm must be smaller than the slice thickness {r_z} mm")
    L = n * r_xy
    x_old = (np.arange(n) + 0.5) * r_xy
    m = max(1, int(math.floor((L - r_z) / d + 1e-9)) + 1)
    centres = r_z / 2 + d * np.arange(m)
    samples = centres[:, None] + np.arange(-4, 5)[None, :] * (r_z / 9.0)
    D = _interp_matrix(x_old, samples.ravel()).reshape(m, 9, n).mean(1)
    U = _interp_matrix(centres, x_old)
    return D, U, centres


def degrade_axis_matrix(n: int, r_xy: float, r_z: float, o_z: float = 0.0) -> np.ndarray:
    """F_up F_down along one axis as an (n, n) matrix."""
    D, U, _ = slice_profile_matrices(n, r_xy, r_z, o_z)
    return U @ D


class MSDNet(nn.Module):
    """Mixed-scale dense network, width 1: layer i sees all previous feature maps (3x3 conv, dilation
    1 + i mod 10, ReLU); a 1x1 conv over all maps gives the output (+ the input: global residual)."""

    def __init__(self, depth: int = 20, max_dilation: int = 10, residual: bool = True):
        super().__init__()
        self.depth, self.residual = int(depth), bool(residual)
        self.layers = nn.ModuleList()
        for i in range(self.depth):
            dil = 1 + i % max_dilation
            self.layers.append(nn.Conv2d(1 + i, 1, 3, padding=dil, dilation=dil, padding_mode="reflect"))
        self.out = nn.Conv2d(1 + self.depth, 1, 1)
        if self.residual:  # start as the identity: the network learns the correction to the interpolated image
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x):
        feats = x
        for conv in self.layers:
            feats = torch.cat([feats, torch.relu(conv(feats))], 1)
        y = self.out(feats)
        return x + y if self.residual else y


class ResCNN(nn.Module):
    """Small residual CNN (3x3 convolutions, ReLU), a CPU-friendly alternative image-to-image network."""

    def __init__(self, width: int = 24, layers: int = 5):
        super().__init__()
        mods = [nn.Conv2d(1, width, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.1)]
        for _ in range(layers - 2):
            mods += [nn.Conv2d(width, width, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.1)]
        last = nn.Conv2d(width, 1, 3, padding=1, padding_mode="reflect")
        nn.init.zeros_(last.weight)  # identity at the start; the body's random features stay alive early on
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*mods, last)

    def forward(self, x):
        return x + self.body(x)


def slice_thickness(img: sitk.Image, thickness_mm: float | None = None) -> tuple[float, str]:
    """(thickness_mm, source): explicit argument, DICOM SliceThickness (0018|0050) metadata, or z spacing."""
    if thickness_mm is not None:
        t = float(thickness_mm)
        if not t > 0:
            raise InputError(f"slice thickness must be > 0 mm, got {thickness_mm}")
        return t, "argument"
    for key in ("0018|0050", "SliceThickness", "slice_thickness_mm"):
        if img.HasMetaDataKey(key):
            try:
                t = float(img.GetMetaData(key).strip())
                if t > 0:
                    return t, f"metadata ({key})"
            except ValueError:
                pass
    return float(img.GetSpacing()[2]), "spacing (no slice thickness in the metadata)"


def thick_slice_volume(vol: np.ndarray, r_xy: float, r_z: float, o_z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Simulate thick slices along axis 0 of a (z, y, x) volume sampled at r_xy (box profile).  Returns
    (thick (m, y, x), centres_mm)."""
    D, _, c = slice_profile_matrices(vol.shape[0], r_xy, r_z, o_z)
    t = np.tensordot(D, np.asarray(vol, np.float64), axes=(1, 0))
    return t.astype(np.float32), c


def cubic_upsample(thick: np.ndarray, centres: np.ndarray, n: int, r_xy: float) -> np.ndarray:
    """Cubic-spline interpolation along axis 0 from slice centres to n pixels of r_xy (the baseline)."""
    from scipy.interpolate import CubicSpline
    x_new = (np.arange(n) + 0.5) * r_xy
    cs = CubicSpline(centres, np.asarray(thick, np.float64), axis=0, extrapolate=True)
    return cs(x_new).astype(np.float32)


def sr4zct_array(vol: np.ndarray, r_xy: float, r_z: float, o_z: float = 0.0, epochs: int | None = None,
                 depth: int = 20, batch: int = 8, lr: float = 1e-3, seed: int = 0, max_seconds: float | None = None,
                 patch: int | None = None, target_thickness_mm: float | None = None, target_overlap_mm: float = 0.0,
                 network: str = "msd", width: int = 24, augment: bool = False, lr_schedule: str = "cosine",
                 device: str | torch.device = "cpu", progress: Callable[[float, str], None] | None = None,
                 cancel: Callable[[], bool] | None = None) -> tuple[np.ndarray, dict]:
    """SR4ZCT on a (z, y, x) array with in-plane pixel r_xy and slices of thickness r_z, overlap o_z.

    Returns (volume on an r_xy grid along z (n_z_out, y, x), info).  ``epochs`` defaults to 200 (the paper's
    number); ``max_seconds`` stops training early (CPU budget).
    """
    rep = Reporter(progress, cancel)
    vol = np.asarray(vol, np.float32)
    if vol.ndim != 3 or min(vol.shape) < 2:
        raise InputError(f"SR4ZCT needs a 3D volume with at least 2 voxels per axis, got shape {vol.shape}")
    if not np.all(np.isfinite(vol)):
        raise InputError("the volume contains NaN or infinite values")
    if r_z <= r_xy + 1e-6 and o_z <= 0:
        raise InputError(f"slice thickness {r_z} mm is not larger than the in-plane pixel {r_xy} mm: "
                         "nothing to enhance")
    epochs = 200 if epochs is None else int(epochs)
    if epochs < 1:
        raise InputError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lo, hi = float(vol.min()), float(vol.max())
    scale = max(hi - lo, 1e-6)
    v = (vol - lo) / scale
    nz, ny, nx = v.shape
    # training pairs from the axial slices (Eq. 1): vertical (y) and, rotated by 90 degrees, horizontal (x)
    # target resolution (r_tar, o_tar) along the vertical axis: identity unless r_tar > r_xy
    def target_matrix(n):
        if target_thickness_mm and target_thickness_mm > r_xy + 1e-6:
            return degrade_axis_matrix(n, r_xy, target_thickness_mm, target_overlap_mm)
        return np.eye(n)
    Ty, Tx = target_matrix(ny), target_matrix(nx)
    # the thick slices were taken from a volume at the target resolution: input = F_up F_down T a
    My = torch.from_numpy(degrade_axis_matrix(ny, r_xy, r_z, o_z) @ Ty).float()
    Mx = torch.from_numpy(degrade_axis_matrix(nx, r_xy, r_z, o_z) @ Tx).float()
    A = torch.from_numpy(v)
    ver_in = torch.einsum("ij,zjx->zix", My, A)
    ver_tg = torch.einsum("ij,zjx->zix", torch.from_numpy(Ty).float(), A)
    rot = torch.rot90(A, 1, (1, 2))  # (z, nx, ny): former x axis is now vertical
    hor_in = torch.einsum("ij,zjx->zix", Mx, rot)
    hor_tg = torch.einsum("ij,zjx->zix", torch.from_numpy(Tx).float(), rot)
    clamp = lambda t: t.clamp(0.0, 1.0)  # noqa: E731 - the code clips to the original range
    pairs = [(clamp(ver_in), clamp(ver_tg)), (clamp(hor_in), clamp(hor_tg))]
    if network == "msd":
        net = MSDNet(depth=depth).to(device)
    elif network == "cnn":
        net = ResCNN(width=width, layers=depth).to(device)
    else:
        raise InputError(f"unknown network {network!r}: use 'msd' or 'cnn'")
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    t0 = time.time()
    losses = []
    n_items = sum(p[0].shape[0] for p in pairs)
    ep_done = 0
    for ep in range(epochs):
        rep(0.85 * ep / epochs, f"SR4ZCT epoch {ep + 1}/{epochs}")
        frac = ep / epochs
        if max_seconds:
            frac = max(frac, (time.time() - t0) / max_seconds)
        if lr_schedule == "cosine":  # cosine learning-rate decay over the (epoch or time) budget
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        tot = 0.0
        for inp, tgt in pairs:
            order = rng.permutation(inp.shape[0])
            for s in range(0, len(order), batch):
                idx = torch.as_tensor(order[s:s + batch])
                x = inp[idx][:, None]
                y = tgt[idx][:, None]
                if patch and min(x.shape[-2:]) > patch:  # one random crop per batch (CPU budget)
                    i0 = int(rng.integers(0, x.shape[-2] - patch + 1))
                    j0 = int(rng.integers(0, x.shape[-1] - patch + 1))
                    x = x[..., i0:i0 + patch, j0:j0 + patch]
                    y = y[..., i0:i0 + patch, j0:j0 + patch]
                if augment:  # flips keep the vertical slice profile (it is symmetric)
                    if rng.random() < 0.5:
                        x, y = x.flip(-1), y.flip(-1)
                    if rng.random() < 0.5:
                        x, y = x.flip(-2), y.flip(-2)
                x, y = x.to(device), y.to(device)
                loss = torch.mean((net(x) - y) ** 2)
                opt.zero_grad()
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(idx)
        losses.append(tot / n_items)
        ep_done = ep + 1
        if max_seconds and time.time() - t0 > max_seconds:
            break
    train_s = time.time() - t0
    # inference: F_up along z (thick-slice centres -> r_xy grid), then coronal and sagittal passes
    L = nz * (r_z - o_z) + o_z
    n_out = max(1, int(round(L / r_xy)))
    centres = r_z / 2 + (r_z - o_z) * np.arange(nz)
    U = torch.from_numpy(_interp_matrix(centres, (np.arange(n_out) + 0.5) * r_xy)).float()
    up = torch.einsum("ij,jyx->iyx", U, torch.from_numpy(v))
    net.eval()
    outs = []
    with torch.no_grad():
        cor = torch.empty_like(up)
        for y0 in range(0, ny, batch):  # coronal images: (z, x) at fixed y
            x = up[:, y0:y0 + batch, :].permute(1, 0, 2)[:, None].to(device)
            cor[:, y0:y0 + batch, :] = net(x)[:, 0].permute(1, 0, 2).cpu()
        rep(0.93, "SR4ZCT sagittal pass")
        sag = torch.empty_like(up)
        for x0 in range(0, nx, batch):  # sagittal images: (z, y) at fixed x
            x = up[:, :, x0:x0 + batch].permute(2, 0, 1)[:, None].to(device)
            sag[:, :, x0:x0 + batch] = net(x)[:, 0].permute(1, 2, 0).cpu()
        outs = ((cor + sag) / 2).clamp(0.0, 1.0)  # clipped to the input's range, as in the reference code
    out = outs.numpy() * scale + lo
    rep(1.0, "SR4ZCT done")
    info = dict(epochs=ep_done, train_seconds=round(train_s, 1), final_loss=losses[-1] if losses else None,
                thickness_mm=r_z, overlap_mm=o_z, pixel_mm=r_xy, depth=depth, n_pairs=n_items,
                network=network, parameters=int(sum(p.numel() for p in net.parameters())))
    return out.astype(np.float32), info


def sr4zct(img: sitk.Image, out_spacing_z: float | None = None, thickness_mm: float | None = None,
           epochs: int | None = None, depth: int = 5, seed: int = 0, max_seconds: float | None = None,
           network: str = "cnn", lr: float = 2e-3, patch: int | None = 48, device: str | torch.device = "cpu",
           progress: Callable[[float, str], None] | None = None,
           cancel: Callable[[], bool] | None = None) -> tuple[sitk.Image, dict]:
    """SR4ZCT on a SimpleITK CT volume.  Thickness: ``thickness_mm``, else DICOM metadata, else the z spacing
    (the source is reported in ``info['thickness_source']``); overlap = thickness - spacing when positive.
    Defaults: the configuration of benchmarks/reconstruction.py (residual CNN, 60 epochs, 48-pixel crops).
    Returns (image with z spacing = in-plane pixel (or ``out_spacing_z``), info)."""
    if not isinstance(img, sitk.Image) or img.GetDimension() != 3:
        raise InputError("SR4ZCT needs a 3D SimpleITK image")
    sx, sy, sz = img.GetSpacing()
    if abs(sx - sy) > 1e-3 * sx:
        raise InputError(f"SR4ZCT needs square in-plane pixels, got {sx} x {sy} mm")
    d = np.array(img.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(d), np.eye(3), atol=1e-3):
        raise InputError("SR4ZCT needs an axis-aligned (axial) volume; resample oblique volumes first")
    t, src = slice_thickness(img, thickness_mm)
    o = max(0.0, t - sz)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    out, info = sr4zct_array(arr, sx, t, o, epochs=60 if epochs is None else epochs, depth=depth, seed=seed,
                             max_seconds=max_seconds, network=network, lr=lr, patch=patch, device=device,
                             progress=progress, cancel=cancel)
    res = sitk.GetImageFromArray(out)
    res.SetSpacing((sx, sy, sx))
    res.SetDirection(img.GetDirection())
    # first output pixel centre: half a pixel above the start of the first thick slice
    start = img.TransformContinuousIndexToPhysicalPoint((0.0, 0.0, -t / (2 * sz)))
    res.SetOrigin(tuple(np.array(start) + d[:, 2] * sx / 2))
    if out_spacing_z:
        ref = sitk.Image(res.GetSize()[0], res.GetSize()[1],
                         max(1, int(round(res.GetSize()[2] * sx / out_spacing_z))), sitk.sitkFloat32)
        ref.SetSpacing((sx, sy, float(out_spacing_z)))
        ref.SetDirection(res.GetDirection())
        ref.SetOrigin(res.GetOrigin())
        res = sitk.Resample(res, ref, sitk.Transform(), sitk.sitkLinear, float(out.min()))
    info.update(thickness_source=src, spacing_mm=sz)
    return res, info
