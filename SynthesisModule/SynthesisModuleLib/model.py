"""DRMC network (Yang et al., MICCAI 2023) and the base-block Transformer baseline.

Module and parameter names follow the authors' public 3D model (``Generator``, ``Transformer_Block``,
``Attention_Bank``/``MLP_Bank``, ``Routing_Module``) so that a state dict of theirs maps onto ours key by key
(``head_conv``, ``body.<i>.norm1.norm``, ``body.<i>.attention.att_experts.<m>.{temperature,qkv,dwconv,project_out}``,
``body.<i>.attention.routing.{conv1,conv3}``, ``body.<i>.mlp.mpl_experts.<m>.{fc1,fc2}``, ``body.<i>.{beta,gamma}``,
``tail_conv``, ``hidden``).

Configuration keys (all optional, defaults = paper):
    arch        "drmc" (dynamic routing blocks) or "baseline" (base blocks, one expert each, no routing)
    n_feats     C, intermediate channels (64)
    res_num     N, number of blocks (5 for DRMC; the paper's baseline uses 15)
    num_experts M, experts per bank (3)
    mlp_ratio   FFN hidden width = mlp_ratio * C (2)
    num_heads   heads of the channel attention (16)
    hidden_dim  width of the routing hidden representation H (16)
    gating      "relu" (DRMC), "softmax" or "top2" (ablations)
    use_hidden  True: DRM sees [GAP(X), H] (cross-layer connection); False: GAP(X) only (ablation "w/o H")
    qk_norm     L2-normalise q and k along the voxel axis before the channel attention (True)
    tail_init   "default" (PyTorch init, as the authors) or "zero": the last conv starts at zero so the network
                starts as the identity (global residual); used by the short CPU demo training
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from PETWorkbenchLib.device import autocast_enabled

DEFAULT_CONFIG = {
    "arch": "drmc",
    "n_feats": 64,
    "res_num": 5,
    "num_experts": 3,
    "mlp_ratio": 2,
    "num_heads": 16,
    "hidden_dim": 16,
    "gating": "relu",
    "use_hidden": True,
    "qk_norm": True,
    "tail_init": "default",
}

GATINGS = ("relu", "softmax", "top2")


def model_config(config: dict | None = None) -> dict:
    """Full network configuration: defaults overlaid with the network keys of ``config``."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k in DEFAULT_CONFIG:
        if config and k in config:
            cfg[k] = config[k]
    if cfg["arch"] not in ("drmc", "baseline"):
        raise ValueError(f"unknown arch {cfg['arch']!r}; expected 'drmc' or 'baseline'")
    if cfg["gating"] not in GATINGS:
        raise ValueError(f"unknown gating {cfg['gating']!r}; expected one of {GATINGS}")
    if cfg["n_feats"] % cfg["num_heads"]:
        raise ValueError(f"n_feats={cfg['n_feats']} is not divisible by num_heads={cfg['num_heads']}")
    if cfg["tail_init"] not in ("default", "zero"):
        raise ValueError(f"unknown tail_init {cfg['tail_init']!r}; expected 'default' or 'zero'")
    if cfg["gating"] == "top2" and cfg["num_experts"] < 2:
        raise ValueError("top2 gating needs num_experts >= 2")
    return cfg


class LayerNorm3d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor."""

    def __init__(self, n_feats):
        super().__init__()
        self.norm = nn.LayerNorm(n_feats)

    def forward(self, x):
        # on a channels-last tensor the permuted view is contiguous: no copy either way
        return self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, D, H, W, C) with C innermost (a view of a channels-last tensor, else a copy)."""
    return x.permute(0, 2, 3, 4, 1).contiguous()


def from_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) contiguous -> (B, C, D, H, W) view in channels-last memory layout."""
    return t.permute(0, 4, 1, 2, 3)


def qk_norms(qk: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """L2 norms over the voxels of the token columns (B, N, K) -> (B, K), clamped at F.normalize's eps.

    A sum of squares over the token rows (one pass over contiguous memory); ``vector_norm`` along the voxel axis of
    a strided column slice is about 4x slower on CPU. Its gradient at a zero norm is zero, as F.normalize's."""
    return qk.to(acc).square().sum(dim=1).clamp_min(1e-24).sqrt()


def pointwise(conv: nn.Conv3d, t: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution applied to tokens (B, ..., C_in) as the matrix product it is."""
    return F.linear(t, conv.weight.flatten(1), conv.bias)


class Routing_Module(nn.Module):  # noqa: N801 (name kept for state-dict compatibility)
    """DRM: W = gate(MLP([GAP(X), H])); returns (W (B, M), new hidden H (B, hidden_dim, 1, 1, 1))."""

    def __init__(self, global_dim, hidden_dim, num_experts, gating="relu", use_hidden=True):
        super().__init__()
        self.use_hidden = use_hidden
        self.gating = gating
        in_dim = global_dim + (hidden_dim if use_hidden else 0)
        self.conv1 = nn.Conv3d(in_dim, hidden_dim, kernel_size=1, bias=True)
        self.gelu = nn.GELU()
        self.conv3 = nn.Conv3d(hidden_dim, num_experts, kernel_size=1, bias=True)

    def forward(self, x_global, h):
        inp = torch.cat([x_global, h], dim=1) if self.use_hidden else x_global
        hidden = self.gelu(self.conv1(inp))
        logit = self.conv3(hidden).flatten(1)  # (B, M)
        if self.gating == "relu":
            w = F.relu(logit)
        elif self.gating == "softmax":
            w = logit.softmax(dim=1)
        else:  # top-2 gating (Shazeer et al.): softmax over the two largest logits, zero elsewhere
            top, idx = logit.topk(2, dim=1)
            w = torch.zeros_like(logit).scatter(1, idx, top.softmax(dim=1))
        return w, hidden


class Attention_Expert(nn.Module):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    """Global channel attention (linear in the number of voxels) followed by a depth-wise 3x3x3 convolution."""

    token_layout = True   # False: the authors' formulation in the default layout (forward_plain), same result

    def __init__(self, n_feats, num_heads=16, bias=False, qk_norm=True):
        super().__init__()
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv3d(n_feats, n_feats * 3, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv3d(n_feats, n_feats, kernel_size=3, padding=1, groups=n_feats, bias=bias)
        self.project_out = nn.Conv3d(n_feats, n_feats, kernel_size=1, bias=bias)

    def forward(self, x):
        if not self.token_layout:
            return self.forward_plain(x)
        # The same operation in channels-last token layout (B, N, C), the form oneDNN computes without layout copies:
        # all heads' q^T k as one C x C product whose diagonal head blocks are the heads' attention matrices, and
        # every head's attn @ v as one product with the block-diagonal matrix of the heads' attn^T (each costs
        # `heads` times the multiply-adds of the per-head products, but runs as one efficient matrix product).
        b, c, d, h, w = x.shape
        nh, ch = self.num_heads, c // self.num_heads
        t = tokens(x)
        qkv = pointwise(self.qkv, t).view(b, d * h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        # q^T k and the norms over the voxels in at least float32 (no-ops for float32 input; a half-precision sum over a
        # 64^3 patch would overflow); the L2 normalisation applied to the product: q/|q| . k/|k| = q.k / (|q||k|),
        # with F.normalize's eps and its zero gradient at a zero norm (vector_norm, clamp)
        acc = torch.promote_types(q.dtype, torch.float32)
        gram = q.transpose(1, 2).to(acc) @ k.to(acc)                                     # (B, C, C)
        attn = gram.view(b, nh, ch, nh, ch).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, heads, ch, ch)
        if self.qk_norm:
            qn, kn = qk_norms(qkv[..., :2 * c], acc).split(c, dim=1)
            attn = attn / (qn.view(b, nh, ch, 1) * kn.view(b, nh, 1, ch))
        attn = (attn * self.temperature).softmax(dim=-1).to(v.dtype)
        eye = torch.eye(nh, dtype=attn.dtype, device=attn.device).view(1, nh, 1, nh, 1)
        blocks = (eye * attn.transpose(-1, -2).unsqueeze(3)).reshape(b, c, c)          # block-diagonal attn^T
        out = (v @ blocks).view(b, d, h, w, c)
        out = F.conv3d(from_tokens(out), self.dwconv.weight, self.dwconv.bias, padding=1, groups=c)
        return from_tokens(pointwise(self.project_out, tokens(out)))

    def forward_plain(self, x):
        """The expert as the authors write it (default memory layout; the depth-wise convolution in channels-last
        layout on CPU, as this code ran before the token layout): the reference of :meth:`forward`."""
        b, c, d, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q = q.reshape(b, self.num_heads, c // self.num_heads, d * h * w)
        k = k.reshape(b, self.num_heads, c // self.num_heads, d * h * w)
        v = v.reshape(b, self.num_heads, c // self.num_heads, d * h * w)
        if self.qk_norm:
            q = F.normalize(q, dim=-1)
            k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, heads, c/h, c/h): channel attention
        out = attn.softmax(dim=-1) @ v
        out = out.reshape(b, c, d, h, w)
        if out.device.type == "cpu":
            # Same operation and weights; on CPU the depth-wise 3-D convolution's backward pass is ~3x faster
            # in channels-last layout (oneDNN) than in the default layout (about 30 % of a training step).
            out = self.dwconv(out.contiguous(memory_format=torch.channels_last_3d)).contiguous()
        else:
            out = self.dwconv(out)
        return self.project_out(out)


class MLP_Expert(nn.Module):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    """FFN expert: 1x1x1 conv -> GELU -> 1x1x1 conv."""

    token_layout = True

    def __init__(self, in_feat, h_feat, out_feat):
        super().__init__()
        self.fc1 = nn.Conv3d(in_feat, h_feat, kernel_size=1, bias=True)
        self.act = nn.GELU()
        self.fc2 = nn.Conv3d(h_feat, out_feat, kernel_size=1, bias=True)

    def forward(self, x):
        if not self.token_layout:
            return self.fc2(self.act(self.fc1(x)))
        return from_tokens(pointwise(self.fc2, self.act(pointwise(self.fc1, tokens(x)))))


class _ExpertBank(nn.Module):
    """sum_m W^m E^m(X) with W from a DRM; experts whose weight is exactly zero are skipped when sparse."""

    experts_attr = "experts"

    def _experts(self):
        return getattr(self, self.experts_attr)

    def forward(self, x, hidden, sparse=True, log=None):
        w, hidden_new = self.routing(self.avg_pool(x), hidden)
        if log is not None:
            log.append(w.detach())
        experts = self._experts()
        if not sparse:
            out = torch.stack([e(x) for e in experts], dim=1)  # (B, M, C, D, H, W)
            return (out * w.view(*w.shape, 1, 1, 1, 1)).sum(dim=1), hidden_new
        out = None
        active = w != 0
        for m, expert in enumerate(experts):
            sel = active[:, m]
            if not bool(sel.any()):
                continue  # zero weight for every sample: the expert is not computed
            wm = w[:, m].view(-1, 1, 1, 1, 1)
            if bool(sel.all()):
                contrib = wm * expert(x)
            else:
                idx = sel.nonzero().flatten()
                contrib = torch.zeros_like(x).index_copy(0, idx, wm[idx] * expert(x[idx]))
            out = contrib if out is None else out + contrib
        if out is None:
            out = x * 0.0  # every weight is zero; keeps the graph connected
        return out, hidden_new


class Attention_Bank(_ExpertBank):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    experts_attr = "att_experts"

    def __init__(self, n_feats, num_experts=3, num_heads=16, hidden_dim=16, gating="relu", use_hidden=True,
                 qk_norm=True):
        super().__init__()
        self.num_experts = num_experts
        self.att_experts = nn.ModuleList(
            [Attention_Expert(n_feats, num_heads=num_heads, qk_norm=qk_norm) for _ in range(num_experts)])
        self.avg_pool = nn.AdaptiveAvgPool3d(1)
        self.routing = Routing_Module(n_feats, hidden_dim, num_experts, gating=gating, use_hidden=use_hidden)


class MLP_Bank(_ExpertBank):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    experts_attr = "mpl_experts"  # (sic) upstream spelling, kept for state-dict compatibility

    def __init__(self, n_feats, num_experts=3, mlp_ratio=2, hidden_dim=16, gating="relu", use_hidden=True):
        super().__init__()
        self.num_experts = num_experts
        self.mpl_experts = nn.ModuleList(
            [MLP_Expert(n_feats, int(mlp_ratio * n_feats), n_feats) for _ in range(num_experts)])
        self.avg_pool = nn.AdaptiveAvgPool3d(1)
        self.routing = Routing_Module(n_feats, hidden_dim, num_experts, gating=gating, use_hidden=use_hidden)


class Transformer_Block(nn.Module):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    """Dynamic routing block (pre-norm, learnable per-channel residual scales beta/gamma initialised to 1)."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_feats"]
        common = dict(num_experts=cfg["num_experts"], hidden_dim=cfg["hidden_dim"], gating=cfg["gating"],
                      use_hidden=cfg["use_hidden"])
        self.norm1 = LayerNorm3d(c)
        self.attention = Attention_Bank(c, num_heads=cfg["num_heads"], qk_norm=cfg["qk_norm"], **common)
        self.norm2 = LayerNorm3d(c)
        self.mlp = MLP_Bank(c, mlp_ratio=cfg["mlp_ratio"], **common)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1, 1))

    def forward(self, x, hidden, sparse=True, log=None):
        out, hidden = self.attention(self.norm1(x), hidden, sparse, log)
        out = out + self.beta * x
        y, hidden = self.mlp(self.norm2(out), hidden, sparse, log)
        return y + self.gamma * out, hidden


class Base_Block(nn.Module):  # noqa: N801 - the authors' class name, so their state-dict keys map one to one
    """Base Transformer block (Fig. 2(b)): one attention expert and one FFN expert, no routing."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["n_feats"]
        self.norm1 = LayerNorm3d(c)
        self.attention = Attention_Expert(c, num_heads=cfg["num_heads"], qk_norm=cfg["qk_norm"])
        self.norm2 = LayerNorm3d(c)
        self.mlp = MLP_Expert(c, int(cfg["mlp_ratio"] * c), c)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1, 1))
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1, 1))

    def forward(self, x, hidden, sparse=True, log=None):
        out = self.attention(self.norm1(x)) + self.beta * x
        return self.mlp(self.norm2(out)) + self.gamma * out, hidden


class Generator(nn.Module):
    """DRMC (arch="drmc") or the baseline Transformer (arch="baseline").

    ``forward(x)`` maps a (B, 1, D, H, W) normalised low-dose patch to the full-dose estimate (global residual).
    ``self.sparse`` (default True) skips experts whose routing weight is exactly zero; ``self.routing_log`` (a list
    or None) receives one (B, M) weight tensor per expert bank and forward call, in bank order.
    """

    def __init__(self, config: dict | None = None):
        super().__init__()
        cfg = model_config(config)
        self.config = cfg
        c = cfg["n_feats"]
        self.head_conv = nn.Conv3d(1, c, 3, padding=1)
        block = Transformer_Block if cfg["arch"] == "drmc" else Base_Block
        self.body = nn.Sequential(*[block(cfg) for _ in range(cfg["res_num"])])
        self.tail_conv = nn.Conv3d(c, 1, 3, padding=1)
        if cfg["tail_init"] == "zero":
            nn.init.zeros_(self.tail_conv.weight)
            nn.init.zeros_(self.tail_conv.bias)
        if cfg["arch"] == "drmc" and cfg["use_hidden"]:
            self.hidden = nn.Parameter(torch.ones(1, cfg["hidden_dim"], 1, 1, 1))
        self.sparse = True
        self.routing_log = None
        self.token_layout = True

    @property
    def token_layout(self) -> bool:
        """True (default): experts compute in channels-last token layout; False: the authors' formulation in the
        default layout. Same operation and weights (tests: equal to 1e-5); the token layout is faster on CPU
        (``benchmarks/synthesis_speed.py``). A Generator pickled whole before the attribute existed reads True."""
        return getattr(self, "_token_layout", True)

    @token_layout.setter
    def token_layout(self, value: bool) -> None:
        self._token_layout = bool(value)
        for m in self.modules():
            if isinstance(m, (Attention_Expert, MLP_Expert)):
                m.token_layout = self._token_layout

    @property
    def num_banks(self) -> int:
        return 2 * len(self.body) if self.config["arch"] == "drmc" else 0

    def forward(self, x):
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (B, 1, D, H, W), got {tuple(x.shape)}")
        hidden = self.hidden.expand(x.shape[0], -1, -1, -1, -1) if hasattr(self, "hidden") else None
        out = self.head_conv(x)
        if self.token_layout:
            out = out.contiguous(memory_format=torch.channels_last_3d)
        for blk in self.body:
            out, hidden = blk(out, hidden, self.sparse, self.routing_log)
        if autocast_enabled(x.device.type):
            # under reduced-precision autocast the body runs in bfloat16; the predicted change added to the input
            # is computed in the input's precision, so the output keeps the input's resolution of values
            with torch.autocast(x.device.type, enabled=False):
                return self.tail_conv(out.to(x.dtype)) + x
        return self.tail_conv(out) + x


def build_model(config: dict | None = None) -> Generator:
    return Generator(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def charbonnier_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Charbonnier loss mean(sqrt((Y - Y_hat)^2 + eps^2)) (Sec. 2.4, eps = 1e-3)."""
    return torch.sqrt((pred - target) ** 2 + eps * eps).mean()
