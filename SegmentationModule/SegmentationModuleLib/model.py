"""LDOS network: an nnU-Net ResEnc-style residual encoder shared by two decoders of the same architecture.

* encoder: stem conv -> ``n_stages`` stages of pre-activation-free residual blocks (nnU-Net ``BasicBlockD``:
  conv-norm-act, conv-norm, skip = [avg-pool] + 1x1 conv + norm when the shape changes, add, act);
* decoders: per stage a transposed conv (kernel = stride), concatenation with the encoder skip and
  ``n_conv_per_stage_decoder`` conv-norm-act blocks, with a 1x1 output head at every resolution
  (deep supervision outputs, highest resolution first);
* segmentation decoder: ``n_classes`` logits (softmax over classes in the loss / at inference);
* denoising decoder (optional, LDOS): 1 channel, the predicted full-dose PET (optionally as a residual on the
  low-dose input at each scale).

``LDOSNet(denoise=False)`` is the segmentation-only baseline (same encoder and segmentation decoder).
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
        if cin != cout or stride != 1:
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
