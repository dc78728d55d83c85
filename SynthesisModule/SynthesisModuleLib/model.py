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


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
    """A 3x3x3 convolution with padding 1 for inference. On the CPU (float32, oneDNN built in) oneDNN is called
    directly: for one 3-D patch with few channels PyTorch's dispatch rule, written for 2-D images (batch 1 and
    batch x C x D x H <= 20480), picks its reference convolution instead, about 5x slower for the tail convolution of
    a 32^3 demo patch and 7x for the head (measured). Same arithmetic either way (tested)."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and hasattr(torch, "mkldnn_convolution") and not autocast_enabled("cpu")):
        return torch.mkldnn_convolution(x, weight, bias, (1, 1, 1), (1, 1, 1), (1, 1, 1), groups)
    return F.conv3d(x, weight, bias, padding=1, groups=groups)


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
    """Global channel attention (linear in the number of voxels) followed by a depth-wise 3x3x3 convolution; its
    three convolutions have no biases (mixed_attention relies on it)."""

    token_layout = True   # False: the authors' formulation in the default layout (forward_plain), same result

    def __init__(self, n_feats, num_heads=16, qk_norm=True):
        super().__init__()
        self.num_heads = num_heads
        self.qk_norm = qk_norm
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv3d(n_feats, n_feats * 3, kernel_size=1, bias=False)
        self.dwconv = nn.Conv3d(n_feats, n_feats, kernel_size=3, padding=1, groups=n_feats, bias=False)
        self.project_out = nn.Conv3d(n_feats, n_feats, kernel_size=1, bias=False)

    def forward(self, x):
        if not self.token_layout:
            return self.forward_plain(x)
        # The same operation in channels-last token layout (B, N, C), the form oneDNN computes without layout copies:
        # all heads' q^T k as one C x C product whose diagonal head blocks are the heads' attention matrices, and
        # every head's attn @ v as one product with the block-diagonal matrix of the heads' attn^T (each costs
        # `heads` times the multiply-adds of the per-head products, but runs as one efficient matrix product).
        b, c, d, h, w = x.shape
        t = tokens(x)
        qkv = pointwise(self.qkv, t).view(b, d * h * w, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        # q^T k and the norms over the voxels in at least float32 (no-ops for float32 input; a half-precision sum over a
        # 64^3 patch would overflow); the L2 normalisation applied to the product: q/|q| . k/|k| = q.k / (|q||k|),
        # with F.normalize's eps and its zero gradient at a zero norm (vector_norm, clamp)
        acc = torch.promote_types(q.dtype, torch.float32)
        norms = qk_norms(qkv[..., :2 * c], acc).split(c, dim=1) if self.qk_norm else None
        blocks = self.attention_blocks(q, k, norms).to(v.dtype)
        out = (v @ blocks).view(b, d, h, w, c)
        out = F.conv3d(from_tokens(out), self.dwconv.weight, self.dwconv.bias, padding=1, groups=c)
        return from_tokens(pointwise(self.project_out, tokens(out)))

    def attention_blocks(self, q: torch.Tensor, k: torch.Tensor,
                         norms: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The heads' softmax attention as one block-diagonal (B, C, C) matrix of the attn^T blocks, so that the
        attention output is v @ blocks (tokens (B, N, C)). ``q``, ``k``: token columns (B, N, C); ``norms``: their
        L2 norms over the voxels (B, C) each (qk_norm) or None. q^T k in at least float32."""
        b, c = q.shape[0], q.shape[-1]
        nh, ch = self.num_heads, c // self.num_heads
        acc = torch.promote_types(q.dtype, torch.float32)
        gram = q.transpose(1, 2).to(acc) @ k.to(acc)                                     # (B, C, C)
        attn = gram.view(b, nh, ch, nh, ch).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (B, heads, ch, ch)
        if norms is not None:
            qn, kn = norms
            attn = attn / (qn.view(b, nh, ch, 1) * kn.view(b, nh, 1, ch))
        attn = (attn * self.temperature).softmax(dim=-1)
        eye = torch.eye(nh, dtype=attn.dtype, device=attn.device).view(1, nh, 1, nh, 1)
        return (eye * attn.transpose(-1, -2).unsqueeze(3)).reshape(b, c, c)              # block-diagonal attn^T

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


def mixed_attention(experts: list[Attention_Expert], w: torch.Tensor | None, n1: torch.Tensor, x: torch.Tensor,
                    beta: torch.Tensor) -> torch.Tensor:
    """sum_m w_m E_m(n1) + beta * x for attention experts E_m (which have no biases), tokens in and out (B, D, H, W,
    C), at inference. The same operation as the experts one by one, in fewer and larger matrix products: every
    expert's q and k in one product; the attention is linear in v, so each expert's v projection and attention are
    one (C, C) matrix per sample, and all experts' attention outputs one product; one depth-wise convolution over
    all experts' channels; the projections, weighted by w (B, M) per sample (None: one expert of weight 1), and the
    residual in one product. An expert of weight 0 for some samples is computed for all and multiplied by 0 (the
    same result for finite activations; synthesize() refuses non-finite input)."""
    b, d, h, wd, c = n1.shape
    n, a = d * h * wd, len(experts)
    t = n1.reshape(b, n, c)
    qk = F.linear(t, torch.cat([e.qkv.weight.flatten(1)[:2 * c] for e in experts]))     # (B, N, 2CA): q1 k1 q2 k2
    acc = torch.promote_types(qk.dtype, torch.float32)
    norms = qk_norms(qk, acc).view(b, a, 2, c) if experts[0].qk_norm else None
    qk = qk.view(b, n, a, 2, c)
    mats = []
    for i, e in enumerate(experts):
        q, k = qk[:, :, i, 0], qk[:, :, i, 1]
        nrm = None if norms is None else (norms[:, i, 0], norms[:, i, 1])
        mats.append(e.qkv.weight.flatten(1)[2 * c:].t() @ e.attention_blocks(q, k, nrm).to(t.dtype))  # (B, C, C)
    u = torch.bmm(t, torch.cat(mats, dim=2)).view(b, d, h, wd, a * c)                  # every expert's attn @ v
    dw = conv3x3(from_tokens(u), torch.cat([e.dwconv.weight for e in experts]), None, groups=a * c)
    proj = [e.project_out.weight.flatten(1).t().expand(b, c, c) for e in experts]
    if w is not None:
        proj = [w[:, i].view(b, 1, 1).to(p.dtype) * p for i, p in enumerate(proj)]
    res = (x * beta.view(c)).reshape(b, n, c)
    return torch.baddbmm(res, tokens(dw).view(b, n, a * c), torch.cat(proj, dim=1)).view(b, d, h, wd, c)


def mixed_mlp(experts: list[MLP_Expert], w: torch.Tensor | None, n2: torch.Tensor, x: torch.Tensor,
              gamma: torch.Tensor) -> torch.Tensor:
    """sum_m w_m E_m(n2) + gamma * x for FFN experts E_m, tokens in and out (B, D, H, W, C), at inference: every
    expert's first layer in one product, the second layers weighted by w (B, M) per sample (None: one expert of
    weight 1), their biases and the residual in another."""
    b, d, h, wd, c = n2.shape
    n = d * h * wd
    hid = F.gelu(F.linear(n2.reshape(b, n, c), torch.cat([e.fc1.weight.flatten(1) for e in experts]),
                          torch.cat([e.fc1.bias for e in experts])))
    fc2 = [e.fc2.weight.flatten(1).t().expand(b, -1, c) for e in experts]
    bias = [e.fc2.bias.view(1, 1, c).expand(b, 1, c) for e in experts]
    if w is not None:
        fc2 = [w[:, i].view(b, 1, 1).to(p.dtype) * p for i, p in enumerate(fc2)]
        bias = [w[:, i].view(b, 1, 1).to(p.dtype) * p for i, p in enumerate(bias)]
    res = torch.addcmul(sum(bias), x.reshape(b, n, c), gamma.view(1, 1, c))
    return torch.baddbmm(res, hid, torch.cat(fc2, dim=1)).view(b, d, h, wd, c)


def active_experts(bank: _ExpertBank, x: torch.Tensor, hidden: torch.Tensor | None,
                   log: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Routing of a bank on normalised tokens ``x`` (B, D, H, W, C): (weights (B, M), indices of the experts with a
    non-zero weight for some sample, new hidden)."""
    b, c = x.shape[0], x.shape[-1]
    w, hidden = bank.routing(x.mean(dim=(1, 2, 3)).view(b, c, 1, 1, 1), hidden)
    if log is not None:
        log.append(w.detach())
    return w, [m for m in range(w.shape[1]) if bool((w[:, m] != 0).any())], hidden


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

    def forward_tokens(self, t, hidden, log=None):
        """Inference on tokens (B, D, H, W, C), sparse: the experts of non-zero weight mixed by mixed_attention
        and mixed_mlp (the same operation as forward)."""
        n1 = self.norm1.norm(t)
        w, act, hidden = active_experts(self.attention, n1, hidden, log)
        out = (mixed_attention([self.attention.att_experts[m] for m in act], w[:, act], n1, t, self.beta) if act
               else t * self.beta.view(-1))
        n2 = self.norm2.norm(out)
        w, act, hidden = active_experts(self.mlp, n2, hidden, log)
        y = (mixed_mlp([self.mlp.mpl_experts[m] for m in act], w[:, act], n2, out, self.gamma) if act
             else out * self.gamma.view(-1))
        return y, hidden


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

    def forward_tokens(self, t, hidden, log=None):
        """Inference on tokens (B, D, H, W, C) (the same operation as forward)."""
        out = mixed_attention([self.attention], None, self.norm1.norm(t), t, self.beta)
        return mixed_mlp([self.mlp], None, self.norm2.norm(out), out, self.gamma), hidden


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
        self.fused = True

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

    def uses_fused(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs the fused inference path: ``fused`` (default True) with the token layout, sparse
        execution, no gradient, float32 (or float64) on the CPU (where it was measured; it holds every active expert's
        intermediates at once, more memory than a small GPU may have) and no autocast."""
        return (getattr(self, "fused", True) and self.token_layout and self.sparse and not torch.is_grad_enabled()
                and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and not autocast_enabled(x.device.type))

    def forward(self, x):
        if x.dim() != 5 or x.shape[1] != 1:
            raise ValueError(f"expected input of shape (B, 1, D, H, W), got {tuple(x.shape)}")
        hidden = self.hidden.expand(x.shape[0], -1, -1, -1, -1) if hasattr(self, "hidden") else None
        if self.uses_fused(x):
            # Inference: whole blocks on tokens, the active experts of each bank mixed in a few large products
            # (mixed_attention, mixed_mlp; same operation, tested), the 3x3x3 convolutions on oneDNN (conv3x3)
            t = tokens(conv3x3(x, self.head_conv.weight, self.head_conv.bias))
            for blk in self.body:
                t, hidden = blk.forward_tokens(t, hidden, self.routing_log)
            return conv3x3(from_tokens(t), self.tail_conv.weight, self.tail_conv.bias) + x
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
