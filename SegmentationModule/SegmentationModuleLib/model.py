"""LDOS network: an nnU-Net ResEnc-style residual encoder shared by two decoders of the same architecture.

* encoder: stem conv -> ``n_stages`` stages of pre-activation-free residual blocks (nnU-Net ``BasicBlockD``:
  conv-norm-act, conv-norm, skip = [avg-pool when strided] + [1x1 conv + norm when the channel count changes],
  add, act);
* decoders: per stage a transposed conv (kernel = stride), concatenation with the encoder skip and
  ``n_conv_per_stage_decoder`` conv-norm-act blocks, with a 1x1 output head at every resolution
  (deep supervision outputs, highest resolution first);
* segmentation decoder: ``n_classes`` logits (softmax over classes in the loss / at inference);
* denoising decoder (optional, LDOS): 1 channel, the predicted full-dose PET (optionally as a residual on the
  low-dose input at each scale).

``LDOSNet(denoise=False)`` is the segmentation-only baseline (same encoder and segmentation decoder).

The encoder and either decoder are operation-for-operation nnU-Net's ``ResidualEncoderUNet`` (package
``dynamic-network-architectures``) with :func:`nnunet_kwargs`; :func:`nnunet_state_dict` and
:func:`load_nnunet_state_dict` translate the weights between the two layouts.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(c):
    return nn.InstanceNorm3d(c, eps=1e-5, affine=True)


def _act():
    return nn.LeakyReLU(0.01, inplace=True)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__(nn.Conv3d(cin, cout, k, stride=stride, padding=k // 2, bias=True), _norm(cout), _act())


class BasicBlockD(nn.Module):
    """Residual block of nnU-Net's ResEnc encoders."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, padding=1, bias=True), _norm(cout))
        skip = []
        if stride != 1:
            skip.append(nn.AvgPool3d(stride, stride))
        if cin != cout:  # as nnU-Net: a strided block that keeps the channel count only pools its skip
            skip += [nn.Conv3d(cin, cout, 1, bias=False), _norm(cout)]
        self.skip = nn.Sequential(*skip)
        self.act = _act()

    def forward(self, x):
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualEncoder(nn.Module):
    def __init__(self, in_channels, features, strides, n_blocks):
        super().__init__()
        self.stem = ConvNormAct(in_channels, features[0], 3, 1)
        stages = []
        cin = features[0]
        for f, s, n in zip(features, strides, n_blocks):
            blocks = [BasicBlockD(cin, f, s)] + [BasicBlockD(f, f, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = f
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for st in self.stages:
            x = st(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """nnU-Net style decoder; returns the outputs at every decoder resolution, highest resolution first."""

    def __init__(self, features, strides, n_conv, out_channels):
        super().__init__()
        n = len(features)
        self.up, self.convs, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(1, n):  # decoder stage s goes from encoder level n-s to level n-s-1
            below, skip = features[n - s], features[n - s - 1]
            st = strides[n - s]
            self.up.append(nn.ConvTranspose3d(below, skip, st, st, bias=True))
            layers = [ConvNormAct(2 * skip, skip)] + [ConvNormAct(skip, skip) for _ in range(n_conv[s - 1] - 1)]
            self.convs.append(nn.Sequential(*layers))
            self.heads.append(nn.Conv3d(skip, out_channels, 1, bias=True))

    def forward(self, skips):
        x = skips[-1]
        outs = []
        for i in range(len(self.up)):
            x = self.up[i](x)
            x = self.convs[i](torch.cat([x, skips[-(i + 2)]], 1))
            outs.append(self.heads[i](x))
        return outs[::-1]


def _per_stage(v, n, name):
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    if len(v) != n:
        raise ValueError(f"config '{name}' needs {n} entries (one per stage), got {len(v)}")
    return v


class LDOSNet(nn.Module):
    """Shared residual encoder + segmentation decoder (+ denoising decoder when ``denoise``)."""

    def __init__(self, in_channels=1, n_classes=19, features=(32, 64, 128, 256, 320, 320),
                 strides=(1, 2, 2, 2, 2, 2), n_blocks=(1, 3, 4, 6, 6, 6), n_conv_decoder=1,
                 denoise=True, denoise_residual=True, deep_supervision=True):
        super().__init__()
        n = len(features)
        strides = _per_stage(strides, n, "strides")
        n_blocks = _per_stage(n_blocks, n, "n_blocks")
        n_conv = _per_stage(n_conv_decoder, n - 1, "n_conv_decoder")
        self.features, self.strides = list(features), strides
        self.n_classes = n_classes
        self.deep_supervision = deep_supervision
        self.denoise_residual = denoise_residual
        self.encoder = ResidualEncoder(in_channels, self.features, strides, n_blocks)
        self.seg_decoder = UNetDecoder(self.features, strides, n_conv, n_classes)
        self.den_decoder = UNetDecoder(self.features, strides, n_conv, 1) if denoise else None

    @property
    def has_denoiser(self):
        return self.den_decoder is not None

    @property
    def divisor(self):
        d = 1
        for s in self.strides:
            d *= s
        return d

    def forward(self, x, heads=("seg", "den")):
        """Returns ``{"seg": [logits per scale], "den": [full-dose prediction per scale]}`` (lists when deep
        supervision is on and the module is training, otherwise single tensors at full resolution)."""
        skips = self.encoder(x)
        out = {}
        ds = self.deep_supervision and self.training
        if "seg" in heads:
            seg = self.seg_decoder(skips)
            out["seg"] = seg if ds else seg[0]
        if "den" in heads and self.den_decoder is not None:
            den = self.den_decoder(skips)
            if self.denoise_residual:
                den = [d + (x[:, :1] if d.shape[2:] == x.shape[2:] else
                            F.adaptive_avg_pool3d(x[:, :1], d.shape[2:])) for d in den]
            out["den"] = den if ds else den[0]
        return out


NET_KEYS = ("in_channels", "n_classes", "features", "strides", "n_blocks", "n_conv_decoder", "denoise",
            "denoise_residual", "deep_supervision")


def build_network(cfg: dict) -> LDOSNet:
    """Build an LDOSNet from a config dict's ``network`` section."""
    net = dict(cfg.get("network", cfg))
    unknown = set(net) - set(NET_KEYS)
    if unknown:
        raise ValueError(f"unknown network config keys: {sorted(unknown)}")
    return LDOSNet(**net)


# ---------------------------------------------------------------- nnU-Net (dynamic-network-architectures) layout
_DECODERS = {"seg": "seg_decoder", "den": "den_decoder"}


def _decoder(net: LDOSNet, decoder: str) -> UNetDecoder:
    if decoder not in _DECODERS:
        raise ValueError(f"decoder must be 'seg' or 'den', got {decoder!r}")
    dec = getattr(net, _DECODERS[decoder])
    if dec is None:
        raise ValueError("this network has no denoising decoder")
    return dec


def nnunet_kwargs(net: LDOSNet, decoder: str = "seg") -> dict:
    """Keyword arguments of ``ResidualEncoderUNet`` for the network made of ``net``'s encoder and its ``decoder``
    (``"seg"``: ``n_classes`` outputs, ``"den"``: 1 output)."""
    dec = _decoder(net, decoder)
    return {
        "input_channels": net.encoder.stem[0].in_channels,
        "n_stages": len(net.features),
        "features_per_stage": list(net.features),
        "conv_op": nn.Conv3d,
        "kernel_sizes": 3,
        "strides": list(net.strides),
        "n_blocks_per_stage": [len(stage) for stage in net.encoder.stages],
        "num_classes": dec.heads[0].out_channels,
        "n_conv_per_stage_decoder": [len(convs) for convs in dec.convs],
        "conv_bias": True,
        "norm_op": nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": nn.LeakyReLU,
        "nonlin_kwargs": {"negative_slope": 0.01, "inplace": True},
        "deep_supervision": net.deep_supervision,
    }


def _conv_norm_keys(conv_key: str, conv: nn.Module, norm_key: str, norm: nn.Module,
                    theirs: str) -> dict[str, tuple[str, ...]]:
    """Keys of a conv + norm pair; nnU-Net's ``ConvDropoutNormReLU`` registers each module twice (as ``conv`` /
    ``norm`` and inside ``all_modules``), so every tensor has two names there."""
    keys = {}
    for i, (ours, module, name) in enumerate(((conv_key, conv, "conv"), (norm_key, norm, "norm"))):
        for p, _ in module.named_parameters():
            keys[f"{ours}.{p}"] = (f"{theirs}.{name}.{p}", f"{theirs}.all_modules.{i}.{p}")
    return keys


def _nnunet_key_map(net: LDOSNet, decoder: str) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> every ``ResidualEncoderUNet`` state-dict key holding the same tensor (main name first)."""
    dec = _decoder(net, decoder)
    enc = net.encoder
    keys = _conv_norm_keys("encoder.stem.0", enc.stem[0], "encoder.stem.1", enc.stem[1], "encoder.stem.convs.0")
    for s, stage in enumerate(enc.stages):
        for b, block in enumerate(stage):
            ours, theirs = f"encoder.stages.{s}.{b}", f"encoder.stages.{s}.blocks.{b}"
            for c in ("conv1", "conv2"):
                conv, norm = getattr(block, c)[0], getattr(block, c)[1]
                keys.update(_conv_norm_keys(f"{ours}.{c}.0", conv, f"{ours}.{c}.1", norm, f"{theirs}.{c}"))
            if len(block.skip) and isinstance(block.skip[-1], nn.InstanceNorm3d):  # projection: [pool,] conv, norm
                j = len(block.skip) - 2
                keys.update(_conv_norm_keys(f"{ours}.skip.{j}", block.skip[j], f"{ours}.skip.{j + 1}",
                                            block.skip[j + 1], f"{theirs}.skip.{j}"))
    # their decoder keeps a reference to the encoder: every encoder tensor is also under "decoder.encoder."
    keys = {k: v + tuple(f"decoder.{a}" for a in v) for k, v in keys.items()}
    prefix = _DECODERS[decoder]
    for i, (up, convs, head) in enumerate(zip(dec.up, dec.convs, dec.heads)):
        for p, _ in up.named_parameters():
            keys[f"{prefix}.up.{i}.{p}"] = (f"decoder.transpconvs.{i}.{p}",)
        for j, cna in enumerate(convs):
            keys.update(_conv_norm_keys(f"{prefix}.convs.{i}.{j}.0", cna[0], f"{prefix}.convs.{i}.{j}.1", cna[1],
                                        f"decoder.stages.{i}.convs.{j}"))
        for p, _ in head.named_parameters():
            keys[f"{prefix}.heads.{i}.{p}"] = (f"decoder.seg_layers.{i}.{p}",)
    return keys


def nnunet_state_dict(net: LDOSNet, decoder: str = "seg") -> dict:
    """The encoder and the ``decoder`` (``"seg"`` or ``"den"``) of ``net`` as a ``ResidualEncoderUNet`` state dict
    (built with :func:`nnunet_kwargs`; loads with ``strict=True``). The tensors share memory with ``net``."""
    ours = net.state_dict()
    return {alias: ours[k] for k, aliases in _nnunet_key_map(net, decoder).items() for alias in aliases}


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def load_nnunet_state_dict(net: LDOSNet, state: dict, decoder: str = "seg") -> None:
    """Copy a ``ResidualEncoderUNet`` state dict into ``net``'s encoder and its ``decoder`` (``"seg"`` or
    ``"den"``); the inverse of :func:`nnunet_state_dict`. Strict: ValueError naming the missing and unexpected keys,
    the shape mismatches and the duplicate names of one tensor that disagree; ``net`` is unchanged then."""
    kmap = _nnunet_key_map(net, decoder)
    expected = {a for aliases in kmap.values() for a in aliases}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    errors = []
    if missing:
        errors.append(f"missing keys: {_listed(missing)}")
    if unexpected:
        errors.append(f"unexpected keys: {_listed(unexpected)}")
    ours = net.state_dict()
    mismatched, differing = [], []
    for k, aliases in kmap.items():
        present = [a for a in aliases if a in state]
        if not present:
            continue
        src = state[present[0]]
        if not torch.is_tensor(src) or tuple(src.shape) != tuple(ours[k].shape):
            shape = tuple(src.shape) if torch.is_tensor(src) else type(src).__name__
            mismatched.append(f"{present[0]} {shape} (network: {tuple(ours[k].shape)})")
            continue
        for a in present[1:]:
            other = state[a]
            if other is not src and not (torch.is_tensor(other) and other.shape == src.shape
                                         and other.dtype == src.dtype and torch.equal(other.to(src.device), src)):
                differing.append(f"{a} != {present[0]}")
    if mismatched:
        errors.append(f"shape mismatches: {_listed(mismatched)}")
    if differing:
        errors.append(f"names of one tensor with different values: {_listed(differing)}")
    if errors:
        raise ValueError("the nnU-Net state dict does not fit this network: " + "; ".join(errors))
    with torch.no_grad():
        for k, aliases in kmap.items():
            ours[k].copy_(state[aliases[0]])
