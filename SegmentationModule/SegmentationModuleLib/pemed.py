"""PE-MED: prompt enhancement for interactive medical image segmentation (Chang et al., MLMI 2023), the network.

One 2D interaction step maps (image slice, positive click disk map, negative click disk map, previous mask,
previous output) to new logits:

* **Backbone**: four hierarchical transformer stages (SegFormer / MiT design: overlapping patch embedding, efficient
  self-attention with spatial reduction, Mix-FFN) giving features at 1/4, 1/8, 1/16 and 1/32 of the input;
* **PALM-I** (prompt attention learning, input side): patch embeddings of [I_pos, I_prev] (M_pos), [I_neg, I_prev]
  (M_neg) and [I_pos, I_neg, I_prev] (M_global) at block 1's stride; M^_pos = theta_c(M_neg, M_pos, M_pos),
  M^_neg = theta_c(M_pos, M_neg, M_neg), M^_global = theta_s(M_global); the prompt feature
  E_p = theta_c(M^_pos, M^_global, M^_global) + theta_c(M^_neg, M^_global, M^_global);
* **PALM-O** (prompt-image interaction) after block 1:
  EP_infor = F_I + norm(theta_c(F_I, E_p, E_p)) + E_p + norm(theta_c(E_p, F_I, F_I)), which replaces F_I as the
  input of blocks 2-4 (and as the 1/4-scale feature of the decoder);
* **decoder**: SegFormer's all-MLP head (per-stage linear projection, upsampling to 1/4, fusion = 1x1 conv + norm,
  linear prediction), upsampled to the input size;
* **TSIP** (time-series information propagation): O_t = F(I_input) + Sigmoid(theta(O_{t-1})), theta a per-pixel MLP
  (1x1 convolutions) on the previous interaction's output O_{t-1} (zeros when there is none).

theta_c(Q, K, V) = Softmax(Q K^T / d_k) V is used as printed in the paper (scaled by d_k, no learned projections:
the patch embeddings before it are the learned part). ``palm_pool`` > 1 average-pools K and V of the PALM attentions
(the method notes' suggestion for 256 x 256 inputs; 1 = the paper's full attention, used by the CPU demo).

The self-loop warm start and the click bookkeeping live in :mod:`.lesion` (inference) and :mod:`.pemed_train`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_NETWORK = dict(dims=[16, 32, 64, 96], depths=[1, 1, 1, 1], heads=[1, 1, 2, 2], sr_ratios=[4, 2, 1, 1],
                       mlp_ratio=2, decoder_dim=64, palm_pool=1, tsip_hidden=8)


# --------------------------------------------------------------------------------------------- click maps
def disk_maps(shape: Sequence[int], clicks: Sequence[tuple[float, float, bool]], radius: float = 5.0) -> np.ndarray:
    """(2, H, W) float32: binary disks of ``radius`` pixels at the positive (channel 0) and negative (channel 1)
    clicks, ``clicks`` = [(row, col, is_positive), ...] in pixel coordinates of this grid (RITM's disk encoding)."""
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((2, h, w), np.float32)
    if not clicks:
        return out
    yy, xx = np.mgrid[0:h, 0:w]
    for r, c, positive in clicks:
        out[0 if positive else 1][(yy - r) ** 2 + (xx - c) ** 2 <= radius ** 2] = 1.0
    return out


# --------------------------------------------------------------------------------------------- backbone (MiT)
class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_ch, dim, patch, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        x = self.proj(x)
        b, c, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from a ``sr``-times strided copy of the tokens (SegFormer)."""

    def __init__(self, dim, heads, sr):
        super().__init__()
        self.heads, self.sr = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.reduce = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x, h, w):
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if self.sr > 1:
            x = self.norm(self.reduce(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, h, w):
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim, heads, sr, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = EfficientAttention(dim, heads, sr)
        self.ffn = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x, h, w):
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class Stage(nn.Module):
    def __init__(self, in_ch, dim, depth, heads, sr, mlp_ratio, first):
        super().__init__()
        self.embed = OverlapPatchEmbed(in_ch, dim, 7 if first else 3, 4 if first else 2)
        self.blocks = nn.ModuleList(Block(dim, heads, sr, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def tokens(self, x):
        return self.embed(x)

    def run(self, t, h, w):
        for blk in self.blocks:
            t = blk(t, h, w)
        return self.norm(t)


def to_map(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens (B, h*w, C) -> feature map (B, C, h, w)."""
    return t.transpose(1, 2).reshape(t.shape[0], -1, h, w)


# --------------------------------------------------------------------------------------------- PALM
def theta_c(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The paper's cross-attention Softmax(Q K^T / d_k) V on tokens (B, N, C) (scaled by d_k = C, as printed)."""
    return torch.softmax(q @ k.transpose(1, 2) / q.shape[-1], dim=-1) @ v


def _pool_tokens(t, h, w, pool):
    if pool <= 1:
        return t
    return F.avg_pool2d(to_map(t, h, w), pool, pool, ceil_mode=True).flatten(2).transpose(1, 2)


class PALMI(nn.Module):
    """Prompt attention on the interaction maps: E_p from (I_pos, I_neg, I_prev)."""

    def __init__(self, dim, pool=1):
        super().__init__()
        self.pool = pool
        self.embed_pos = OverlapPatchEmbed(2, dim, 7, 4)
        self.embed_neg = OverlapPatchEmbed(2, dim, 7, 4)
        self.embed_global = OverlapPatchEmbed(3, dim, 7, 4)

    def forward(self, pos, neg, prev):
        m_pos, h, w = self.embed_pos(torch.cat([pos, prev], 1))
        m_neg, _, _ = self.embed_neg(torch.cat([neg, prev], 1))
        m_glob, _, _ = self.embed_global(torch.cat([pos, neg, prev], 1))
        p = self.pool
        hat_pos = theta_c(m_neg, _pool_tokens(m_pos, h, w, p), _pool_tokens(m_pos, h, w, p))
        hat_neg = theta_c(m_pos, _pool_tokens(m_neg, h, w, p), _pool_tokens(m_neg, h, w, p))
        g = _pool_tokens(m_glob, h, w, p)
        hat_glob = theta_c(m_glob, g, g)
        g = _pool_tokens(hat_glob, h, w, p)
        return theta_c(hat_pos, g, g) + theta_c(hat_neg, g, g)


class PALMO(nn.Module):
    """Prompt-image interaction: EP_infor = F_I + norm(theta_c(F_I, E_p, E_p)) + E_p + norm(theta_c(E_p, F_I, F_I))."""

    def __init__(self, dim, pool=1):
        super().__init__()
        self.pool = pool
        self.norm_image, self.norm_prompt = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, f, e, h, w):
        p = self.pool
        ep, fp = _pool_tokens(e, h, w, p), _pool_tokens(f, h, w, p)
        return f + self.norm_image(theta_c(f, ep, ep)) + e + self.norm_prompt(theta_c(e, fp, fp))


# --------------------------------------------------------------------------------------------- network
class PEMED(nn.Module):
    def __init__(self, dims=(16, 32, 64, 96), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2), sr_ratios=(4, 2, 1, 1),
                 mlp_ratio=2, decoder_dim=64, palm_pool=1, tsip_hidden=8, in_ch=1):
        super().__init__()
        self.stages = nn.ModuleList(
            Stage(in_ch if i == 0 else dims[i - 1], dims[i], depths[i], heads[i], sr_ratios[i], mlp_ratio, i == 0)
            for i in range(4))
        self.palm_i = PALMI(dims[0], palm_pool)
        self.palm_o = PALMO(dims[0], palm_pool)
        self.linear = nn.ModuleList(nn.Linear(d, decoder_dim) for d in dims)
        self.fuse = nn.Sequential(nn.Conv2d(4 * decoder_dim, decoder_dim, 1, bias=False), nn.BatchNorm2d(decoder_dim),
                                  nn.ReLU(inplace=True))
        self.pred = nn.Conv2d(decoder_dim, 1, 1)
        # TSIP's theta: a per-pixel MLP on the previous output
        self.tsip = nn.Sequential(nn.Conv2d(1, tsip_hidden, 1), nn.GELU(), nn.Conv2d(tsip_hidden, 1, 1))

    def forward(self, image, pos, neg, prev, prev_out=None):
        """All inputs (B, 1, H, W) (H, W multiples of 32); ``prev_out`` the previous logits O_{t-1} (None: zeros).
        Returns logits O_t (B, 1, H, W)."""
        size = image.shape[-2:]
        feats = []
        x = image
        for i, stage in enumerate(self.stages):
            t, h, w = stage.tokens(x)
            if i == 0:
                t = stage.run(t, h, w)
                t = self.palm_o(t, self.palm_i(pos, neg, prev), h, w)
            else:
                t = stage.run(t, h, w)
            x = to_map(t, h, w)
            feats.append((t, h, w))
        h0, w0 = feats[0][1], feats[0][2]
        ups = [F.interpolate(to_map(lin(t), h, w), size=(h0, w0), mode="bilinear", align_corners=False)
               for lin, (t, h, w) in zip(self.linear, feats)]
        logits = self.pred(self.fuse(torch.cat(ups[::-1], 1)))
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if prev_out is None:
            prev_out = torch.zeros_like(logits)
        return logits + torch.sigmoid(self.tsip(prev_out))


def build_pemed(cfg: dict) -> PEMED:
    net = dict(DEFAULT_NETWORK, **(cfg.get("network") or {}))
    return PEMED(dims=net["dims"], depths=net["depths"], heads=net["heads"], sr_ratios=net["sr_ratios"],
                 mlp_ratio=net["mlp_ratio"], decoder_dim=net["decoder_dim"], palm_pool=net["palm_pool"],
                 tsip_hidden=net["tsip_hidden"])


# --------------------------------------------------------------------------------------------- loss
def normalized_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = 0.5,
                          eps: float = 1e-8) -> torch.Tensor:
    """RITM's normalised focal loss (Sofiuk et al. 2022), the loss PE-MED trains with: per image,
    -sum_i alpha_i (1 - p_t,i)^gamma log p_t,i / sum_i (1 - p_t,i)^gamma (the normaliser is not differentiated,
    as in RITM), averaged over the batch."""
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0.5, p, 1 - p)
    a = torch.where(target > 0.5, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha))
    beta = (1 - pt) ** gamma
    norm = beta.flatten(1).sum(1).detach().clamp_min(eps)
    logpt = torch.where(target > 0.5, F.logsigmoid(logits), F.logsigmoid(-logits))
    per = -(a * beta * logpt).flatten(1).sum(1) / norm
    return per.mean()


# --------------------------------------------------------------------------------------------- input transform
def crop_geometry(cfg: dict) -> tuple[int, float, float]:
    """(crop size in pixels, crop pixel size in mm, click disk radius in crop pixels) of a PE-MED config."""
    size, pixel_mm = int(cfg["input"]["crop"]), float(cfg["input"]["pixel_mm"])
    return size, pixel_mm, float(cfg["input"]["disk_radius_mm"]) / pixel_mm


def zoom_pixel_mm(cfg: dict, extent: float | None, reach: float | None = None) -> float:
    """Crop pixel size (mm) for an object of this extent (equivalent diameter, mm): RITM's Zoom-In for small objects.

    ``input.min_pixel_mm`` < ``input.pixel_mm`` turns it on: the crop samples the slice finer (down to
    ``min_pixel_mm``) so that the object spans about ``input.object_pixels`` crop pixels (16 by default: four tokens
    of the network's 1/4-scale output). ``reach``: the largest distance (mm) from the crop centre of what is known
    of the object (segment, hot region, clicks); the pixel is never so small that this falls outside the crop (20 %
    margin), so an elongated object or spread-out clicks are not cut at the crop's edge. Objects that already span
    that many pixels, and configs without ``min_pixel_mm`` (the stage-1/2 models), keep ``pixel_mm``. The click
    disk keeps its radius in crop pixels."""
    inp = cfg["input"]
    base = float(inp["pixel_mm"])
    lo = float(inp.get("min_pixel_mm", base))
    if lo >= base or extent is None or not np.isfinite(extent) or extent <= 0:
        return base
    pixel = float(extent) / float(inp.get("object_pixels", 16))
    if reach is not None and np.isfinite(reach):
        pixel = max(pixel, 2.0 * 1.2 * float(reach) / float(inp["crop"]))
    return float(np.clip(pixel, lo, base))


def normalise_suv(suv: np.ndarray) -> np.ndarray:
    """Network input from SUV: log(1 + SUV) (negative values, e.g. reconstruction noise, count as 0)."""
    return np.log1p(np.maximum(np.asarray(suv, np.float32), 0.0))
