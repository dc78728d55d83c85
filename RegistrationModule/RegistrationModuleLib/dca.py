"""TM-DCA: deformable cross-attention Transformer for registration (Chen et al., MLMI 2023), 3D.

Architecture (paper §2, sizes of the public TransMorph-DCA configuration by default, all configurable):

* two parallel Swin-like encoders, one with the moving image as *base* and the fixed image as *reference*, the
  other with the roles swapped; patch embedding (patch 4) then stages of ``depths[i]`` DCA blocks and patch
  merging (×2 down, channels ×2) between stages;
* a DCA block: deformable window multi-head cross-attention (DW-MCA, Eq. 2) — keys/values from regular
  non-overlapping windows of the base tokens, queries from the *reference* tokens resampled (trilinear) at
  positions shifted by per-head offsets ``Δp = θ(x_b, x_r)`` predicted by an offset network (two convolutions,
  depth-wise then regular, on ``x_b + x_r``, zero-initialised), then an MLP (ratio 4), pre-LN and residuals;
  successive blocks alternate regular / shifted windows (Swin); each attention has a relative position bias;
* at each stage the two paths' features are **added** and passed to a ConvNet decoder by skip connections
  (TransMorph decoder: upsample, concatenate, 2 × (conv 3³ + InstanceNorm + LeakyReLU)), with an extra
  convolutional skip from the full-resolution input pair; registration head conv 3³ → 3 channels, weights
  N(0, 1e-5), bias 0;
* output head of the paper's unsupervised (IXI) configuration: the head's channels are velocities at cubic
  B-spline control points every ``cps`` = 3 voxels (here averaged from the full-resolution head over each control
  cell), upsampled by the cubic B-spline and integrated by scaling and squaring (7 steps): a diffeomorphic
  displacement in voxels of the network grid, applied with a spatial transformer.

Training (unsupervised, :func:`train`): loss ``NCC(window 9) + λ · diffusion (‖∇u‖², λ = 1)``, AdamW
(lr 1e-4, weight decay 0, amsgrad), poly decay ``(1 − step/steps)^0.9``, batch 1, mixed precision on CUDA.
At test time :func:`predict_field` gives the network's displacement (or its velocity field, for a diffeomorphic
refinement), which the engine refines at full resolution by instance optimisation (``iterations[-1]``; 0 = none).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

DEFAULT_CONFIG = {
    "img_size": [160, 192, 224],      # network input size (z, y, x)
    "patch_size": 4,
    "embed_dim": 96,
    "depths": [4, 4, 5],
    "num_heads": [8, 8, 8],
    "window_size": [5, 6, 7],         # in tokens (z, y, x) at every stage (img_size // 32)
    "offset_kernels": [7, 5, 3],
    "mlp_ratio": 4.0,
    "reg_head_chan": 16,
    "cps": 3,                         # B-spline control-point spacing of the output head, in voxels (IXI setting)
    "svf_steps": 7,                   # scaling-and-squaring steps of the B-spline velocity field
}


# ---------------------------------------------------------------------------------------------- attention
def _window_partition(x, ws):
    """(B, D, H, W, C) -> (B * nW, wd*wh*ww, C)."""
    B, D, H, W, C = x.shape
    x = x.view(B, D // ws[0], ws[0], H // ws[1], ws[1], W // ws[2], ws[2], C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws[0] * ws[1] * ws[2], C)


def _window_reverse(w, ws, B, D, H, W):
    C = w.shape[-1]
    x = w.view(B, D // ws[0], H // ws[1], W // ws[2], ws[0], ws[1], ws[2], C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, C)


class OffsetNet(nn.Module):
    """Δp per head: depth-wise conv (kernel k) + regular 1×1 conv on x_b + x_r (paper), zero-initialised."""

    def __init__(self, dim, heads, k):
        super().__init__()
        self.dw = nn.Conv3d(dim, dim, k, padding=k // 2, groups=dim)
        self.act = nn.GELU()
        self.pw = nn.Conv3d(dim, 3 * heads, 1)
        nn.init.normal_(self.pw.weight, 0.0, 1e-5)
        nn.init.zeros_(self.pw.bias)

    def forward(self, xb, xr):           # channels-first (B, C, D, H, W)
        return self.pw(self.act(self.dw(xb + xr)))


class DWMCA(nn.Module):
    """Deformable window multi-head cross-attention."""

    def __init__(self, dim, heads, window, offset_kernel):
        super().__init__()
        self.heads, self.window = heads, tuple(window)
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.offset = OffsetNet(dim, heads, offset_kernel)
        wd, wh, ww = self.window
        self.rel_bias = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[..., 0] += wd - 1
        rel[..., 1] += wh - 1
        rel[..., 2] += ww - 1
        idx = rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]
        self.register_buffer("rel_index", idx, persistent=False)

    def forward(self, xb, xr, shift):
        """xb, xr: (B, D, H, W, C) normalised tokens; returns (B, D, H, W, C)."""
        B, D, H, W, C = xb.shape
        nh, hd = self.heads, C // self.heads
        cb, cr = xb.permute(0, 4, 1, 2, 3), xr.permute(0, 4, 1, 2, 3)
        off = self.offset(cb, cr).view(B * nh, 3, D, H, W)                 # per-head offsets, in tokens
        off = torch.tanh(off) * 0.5 * torch.tensor([W, H, D], device=xb.device, dtype=xb.dtype).view(1, 3, 1, 1, 1)
        # normalised sampling grid: identity + offset (align_corners=True, last axis (x, y, z))
        axes = [torch.linspace(-1, 1, n, device=xb.device, dtype=xb.dtype) for n in (D, H, W)]
        base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1)  # (D, H, W, 3)
        scale = torch.tensor([2.0 / max(W - 1, 1), 2.0 / max(H - 1, 1), 2.0 / max(D - 1, 1)],
                             device=xb.device, dtype=xb.dtype)
        grid = base.unsqueeze(0) + off.permute(0, 2, 3, 4, 1) * scale
        ref = cr.reshape(B, nh, hd, D, H, W).reshape(B * nh, hd, D, H, W)
        ref = F.grid_sample(ref, grid, mode="bilinear", padding_mode="border", align_corners=True)
        ref = ref.view(B, C, D, H, W).permute(0, 2, 3, 4, 1)               # deformed reference tokens
        q = self.q(ref)
        kv = self.kv(xb)
        if shift:
            s = [w // 2 for w in self.window]
            q = torch.roll(q, (-s[0], -s[1], -s[2]), (1, 2, 3))
            kv = torch.roll(kv, (-s[0], -s[1], -s[2]), (1, 2, 3))
        qw = _window_partition(q, self.window)                              # (B*nW, N, C)
        kvw = _window_partition(kv, self.window)
        n = qw.shape[1]
        qw = qw.view(-1, n, nh, hd).transpose(1, 2)
        k, v = kvw.view(-1, n, 2, nh, hd).permute(2, 0, 3, 1, 4)
        attn = (qw * self.scale) @ k.transpose(-2, -1)
        bias = self.rel_bias[self.rel_index.reshape(-1)].view(n, n, nh).permute(2, 0, 1)
        attn = (attn + bias.unsqueeze(0)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, C)
        out = _window_reverse(self.proj(out), self.window, B, D, H, W)
        if shift:
            out = torch.roll(out, tuple(s), (1, 2, 3))
        return out


class DCABlock(nn.Module):
    """One DCA block updating both paths: path a attends with base a / reference b and vice versa."""

    def __init__(self, dim, heads, window, offset_kernel, mlp_ratio, shift):
        super().__init__()
        self.shift = shift
        self.norm_a, self.norm_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn_a = DWMCA(dim, heads, window, offset_kernel)
        self.attn_b = DWMCA(dim, heads, window, offset_kernel)
        hidden = int(dim * mlp_ratio)
        self.mlp_a = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.mlp_b = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, a, b):
        na, nb = self.norm_a(a), self.norm_b(b)
        a2 = a + self.attn_a(na, nb, self.shift)
        b2 = b + self.attn_b(nb, na, self.shift)
        return a2 + self.mlp_a(a2), b2 + self.mlp_b(b2)


class PatchMerging(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.red = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x):                 # (B, D, H, W, C), even sizes
        parts = [x[:, i::2, j::2, k::2] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
        return self.red(self.norm(torch.cat(parts, -1)))


class ConvBlock(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout), nn.LeakyReLU(0.2),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout), nn.LeakyReLU(0.2))


class TMDCA(nn.Module):
    def __init__(self, config=None):
        super().__init__()
        cfg = dict(DEFAULT_CONFIG, **(config or {}))
        self.config = cfg
        C, P = cfg["embed_dim"], cfg["patch_size"]
        n_st = len(cfg["depths"])
        tokens = [s // P for s in cfg["img_size"]]
        for lv in range(n_st):
            t = [s // (2 ** lv) for s in tokens]
            if any(ti % wi for ti, wi in zip(t, cfg["window_size"])):
                raise ValueError(f"TM-DCA: stage {lv + 1} token grid {t} is not a multiple of the window "
                                 f"{cfg['window_size']}; change img_size or window_size")
        self.embed_a = nn.Conv3d(1, C, P, stride=P)
        self.embed_b = nn.Conv3d(1, C, P, stride=P)
        self.stages, self.merges, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        dims = [C * 2 ** i for i in range(n_st)]
        for i in range(n_st):
            self.stages.append(nn.ModuleList([
                DCABlock(dims[i], cfg["num_heads"][i], cfg["window_size"], cfg["offset_kernels"][i],
                         cfg["mlp_ratio"], shift=bool(j % 2)) for j in range(cfg["depths"][i])]))
            self.norms.append(nn.LayerNorm(dims[i]))
            if i < n_st - 1:
                self.merges.append(PatchMerging(dims[i]))
        # decoder (TransMorph style)
        self.ups = nn.ModuleList()
        for i in range(n_st - 1, 0, -1):
            self.ups.append(ConvBlock(dims[i] + dims[i - 1], dims[i - 1]))
        half = max(C // 2, 8)
        self.skip_in = ConvBlock(2, half)                      # from the input pair at 1/2 resolution
        self.up_half = ConvBlock(dims[0] + half, half)
        self.up_full = ConvBlock(half + 2, cfg["reg_head_chan"])
        self.head = nn.Conv3d(cfg["reg_head_chan"], 3, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, 1e-5)
        nn.init.zeros_(self.head.bias)
        self._bspline = {}

    def velocity(self, control: torch.Tensor, shape) -> torch.Tensor:
        """Cubic B-spline upsampling of the control-point velocities to the image grid (voxels)."""
        from .ops import BSplineGrid
        key = (tuple(shape), control.device, control.dtype)
        if key not in self._bspline:
            self._bspline[key] = BSplineGrid(shape, [float(n - 1) for n in shape[::-1]], float(self.config["cps"]),
                                             control.device, control.dtype)
        grid = self._bspline[key]
        control = F.interpolate(control, size=grid.cshape, mode="trilinear", align_corners=True)
        return torch.cat([grid(control[i:i + 1]) for i in range(control.shape[0])], 0)

    def forward(self, moving, fixed, return_velocity=False):
        """moving, fixed: (B, 1, D, H, W) -> displacement (B, 3, D, H, W) in voxels, channels (x, y, z) (and the
        stationary velocity field it integrates, with ``return_velocity``).

        Output head of the paper's unsupervised (IXI) configuration: a B-spline-parameterised stationary velocity
        field (control points every ``cps`` voxels) integrated by scaling and squaring, so the field is
        diffeomorphic."""
        pair = torch.cat([moving, fixed], 1)
        a = self.embed_a(moving).permute(0, 2, 3, 4, 1)
        b = self.embed_b(fixed).permute(0, 2, 3, 4, 1)
        skips = []
        for i, blocks in enumerate(self.stages):
            for blk in blocks:
                a, b = blk(a, b)
            skips.append(self.norms[i](a + b).permute(0, 4, 1, 2, 3))   # paths added (Attention-Reg style)
            if i < len(self.merges):
                a, b = self.merges[i](a), self.merges[i](b)
        x = skips[-1]
        for j, up in enumerate(self.ups):
            s = skips[-2 - j]
            x = up(torch.cat([F.interpolate(x, size=s.shape[2:], mode="trilinear", align_corners=False), s], 1))
        p_half = F.avg_pool3d(pair, 3, stride=2, padding=1)
        x = F.interpolate(x, size=p_half.shape[2:], mode="trilinear", align_corners=False)
        x = self.up_half(torch.cat([x, self.skip_in(p_half)], 1))
        x = F.interpolate(x, size=pair.shape[2:], mode="trilinear", align_corners=False)
        x = self.up_full(torch.cat([x, pair], 1))
        cps = int(self.config["cps"])
        control = F.avg_pool3d(self.head(x), cps, stride=cps, ceil_mode=True)     # velocities at control points
        v = self.velocity(control, pair.shape[2:])
        u = v / (2 ** int(self.config["svf_steps"]))
        for _ in range(int(self.config["svf_steps"])):
            u = u + spatial_transform(u, u)
        return (u, v) if return_velocity else u


# ---------------------------------------------------------------------------------------------- losses / warp
def spatial_transform(img: torch.Tensor, flow_vox: torch.Tensor) -> torch.Tensor:
    """Warp ``img`` (B, C, D, H, W) by a displacement in voxels (channels x, y, z)."""
    D, H, W = img.shape[2:]
    axes = [torch.linspace(-1, 1, n, device=img.device, dtype=img.dtype) for n in (D, H, W)]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij")[::-1], -1).unsqueeze(0)
    scale = torch.tensor([2.0 / (W - 1), 2.0 / (H - 1), 2.0 / (D - 1)], device=img.device, dtype=img.dtype)
    grid = base + flow_vox.permute(0, 2, 3, 4, 1) * scale
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


# the stabiliser of the TM-DCA training loss: VoxelMorph's 1e-5, with which the network was trained (the engine's
# default similarity.LNCC_EPS is lower, METHOD.md §1)
NCC_LOSS_EPS = 1e-5


def ncc_loss(a: torch.Tensor, b: torch.Tensor, win: int = 9) -> torch.Tensor:
    from . import similarity
    return similarity.lncc(a, b, win, eps=NCC_LOSS_EPS)


def diffusion_loss(flow: torch.Tensor) -> torch.Tensor:
    dz = flow[:, :, 1:] - flow[:, :, :-1]
    dy = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    dx = flow[:, :, :, :, 1:] - flow[:, :, :, :, :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


# ---------------------------------------------------------------------------------------------- training
def train(pair_sampler: Callable[[], tuple[torch.Tensor, torch.Tensor]], config: dict | None = None,
          steps: int = 1000, lr: float = 1e-4, reg_weight: float = 1.0, device: str | torch.device = "cuda",
          checkpoint: str | Path | None = None, resume: bool = True, log: Callable[[str], None] = print,
          save_every: int = 200, amp: bool = True) -> TMDCA:
    """Unsupervised training; ``pair_sampler()`` returns (moving, fixed) float tensors (1, 1, *img_size), 0..1."""
    from PETWorkbenchLib.models import load_checkpoint, save_checkpoint
    dev = torch.device(device)
    net = TMDCA(config).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0, amsgrad=True)
    start = 0
    if checkpoint and resume and __import__("os").path.exists(checkpoint):
        ck = load_checkpoint(checkpoint, map_location=dev)
        net.load_state_dict(ck["state_dict"])
        if "optimizer" in ck:
            opt.load_state_dict(ck["optimizer"])
        start = int(ck.get("step", 0))
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    t0 = time.time()
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = lr * (1 - step / steps) ** 0.9
        mov, fix = (t.to(dev) for t in pair_sampler())
        with torch.autocast(device_type=dev.type, enabled=use_amp):
            flow = net(mov, fix)
        flow = flow.float()
        warped = spatial_transform(mov, flow)
        loss_sim = ncc_loss(fix, warped, 9)
        loss_reg = diffusion_loss(flow)
        loss = loss_sim + reg_weight * loss_reg
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step % 20 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} ncc {float(loss_sim.detach()):.4f} diff {float(loss_reg.detach()):.5f} "
                f"{time.time() - t0:.0f}s")
        if checkpoint and ((step + 1) % save_every == 0 or step == steps - 1):
            save_checkpoint(checkpoint, net.config, net.state_dict(), optimizer=opt.state_dict(), step=step + 1)
    return net


# ---------------------------------------------------------------------------------------------- inference
def load(model: str | Path | None, device: str | torch.device = "cpu") -> TMDCA:
    """Model id (Models.json) or checkpoint path -> network in eval mode."""
    from PETWorkbenchLib.errors import ModelError
    if model is None:
        raise ModelError("method 'dca' needs trained TM-DCA weights: pass model=<model id or checkpoint path>; "
                         "no TM-DCA weights ship with this version (use method='instance')")
    from PETWorkbenchLib.models import load_model_checkpoint
    ck = load_model_checkpoint(model, map_location="cpu")
    net = TMDCA(ck["config"])
    try:
        net.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        raise ModelError(f"TM-DCA weights do not match their configuration: {err}") from err
    return net.to(device).eval()


@torch.no_grad()
def predict_field(model: nn.Module | str | Path | None, F_np: np.ndarray, M_np: np.ndarray,
                  spacing: Sequence[float], device: str | torch.device = "cpu", velocity: bool = False) -> np.ndarray:
    """Network prediction on the fixed grid: (3, *spatial) displacement in mm along index axes (engine convention),
    or, with ``velocity``, the stationary velocity field whose exponential it is (for a diffeomorphic refinement)."""
    from PETWorkbenchLib.errors import InputError
    if F_np.ndim != 3:
        raise InputError("method 'dca' (TM-DCA) works on 3D images only; use method='instance' for 2D")
    net = model if isinstance(model, nn.Module) else load(model, device)
    size = net.config["img_size"]
    f = torch.from_numpy(np.ascontiguousarray(F_np, np.float32))[None, None].to(device)
    m = torch.from_numpy(np.ascontiguousarray(M_np, np.float32))[None, None].to(device)
    fi = F.interpolate(f, size=size, mode="trilinear", align_corners=True)
    mi = F.interpolate(m, size=size, mode="trilinear", align_corners=True)
    disp, vel = net(mi, fi, return_velocity=True)                 # voxels of the network grid, (x, y, z)
    flow = vel if velocity else disp
    full = F_np.shape
    flow = F.interpolate(flow, size=full, mode="trilinear", align_corners=True)
    # network voxel -> fixed voxel -> mm, per index axis c (x, y, z); array axis of c is 2 - c
    for c in range(3):
        n_full, n_net = full[2 - c], size[2 - c]
        flow[:, c] *= (n_full - 1) / max(n_net - 1, 1) * float(spacing[c])
    return flow[0].cpu().numpy()
