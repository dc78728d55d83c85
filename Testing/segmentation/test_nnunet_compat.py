"""The LDOS network is nnU-Net's ResidualEncoderUNet (dynamic-network-architectures) operation for operation: the
weights map one to one between the two layouts and both compute the same outputs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from SegmentationModuleLib.infer import load_model
from SegmentationModuleLib.model import (LDOSNet, _nnunet_key_map, load_nnunet_state_dict, nnunet_kwargs,
                                         nnunet_state_dict)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"n_classes": 3, "features": [4, 8, 16], "strides": [1, 2, 2], "n_blocks": [1, 2, 2]}
# a strided stage that keeps the channel count: nnU-Net's skip is then an average pool only (no projection)
SAME_WIDTH = {"n_classes": 3, "features": [4, 8, 8], "strides": [1, 2, 2], "n_blocks": [2, 1, 2],
              "n_conv_decoder": [2, 1]}


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter (norm affines and biases included, not their usual 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _pair(cfg: dict, decoder: str, seed: int = 0, dtype=torch.float64):
    net = LDOSNet(**cfg).to(dtype)
    theirs = ResidualEncoderUNet(**nnunet_kwargs(net, decoder)).to(dtype)
    _randomise(net, seed)
    _randomise(theirs, seed + 1)
    return net, theirs


def _ours(net: LDOSNet, x: torch.Tensor, decoder: str):
    """Our outputs of ``decoder`` for ``x`` in the module's mode, the denoiser's residual on the input removed."""
    with torch.no_grad():
        out = net(x, heads=(decoder,))[decoder]
    outs = out if isinstance(out, list) else [out]
    if decoder == "den" and net.denoise_residual:  # LDOSNet adds the (pooled) low-dose input at every scale
        outs = [o - (x[:, :1] if o.shape[2:] == x.shape[2:] else F.adaptive_avg_pool3d(x[:, :1], o.shape[2:]))
                for o in outs]
    return outs


def _theirs(theirs: ResidualEncoderUNet, x: torch.Tensor, deep_supervision: bool):
    theirs.decoder.deep_supervision = deep_supervision
    with torch.no_grad():
        out = theirs(x)
    return out if isinstance(out, list) else [out]


def _assert_same(net: LDOSNet, theirs: ResidualEncoderUNet, decoder: str, x: torch.Tensor, **tol) -> None:
    tol = tol or {"rtol": 0.0, "atol": 1e-10}
    for training in (False, True):  # eval: full resolution only; train: every deep-supervision scale
        net.train(training)
        theirs.train(training)
        ours, ref = _ours(net, x, decoder), _theirs(theirs, x, training)
        assert len(ours) == len(ref) == (len(net.features) - 1 if training else 1)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("cfg", [SMALL, SAME_WIDTH], ids=["small", "same-width-stage"])
@pytest.mark.parametrize("decoder", ["seg", "den"])
def test_our_weights_in_residual_encoder_unet_give_our_outputs(cfg, decoder):
    net, theirs = _pair(cfg, decoder)
    assert theirs.decoder.num_classes == (cfg["n_classes"] if decoder == "seg" else 1)
    theirs.load_state_dict(nnunet_state_dict(net, decoder), strict=True)
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _assert_same(net, theirs, decoder, x)


@pytest.mark.parametrize("cfg", [SMALL, SAME_WIDTH], ids=["small", "same-width-stage"])
@pytest.mark.parametrize("decoder", ["seg", "den"])
def test_residual_encoder_unet_weights_in_ours_give_their_outputs(cfg, decoder):
    net, theirs = _pair(cfg, decoder, seed=10)
    other = "den" if decoder == "seg" else "seg"
    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(f"{other}_decoder.")}
    load_nnunet_state_dict(net, theirs.state_dict(), decoder)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the other decoder is untouched
    x = torch.randn(1, 1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    _assert_same(net, theirs, decoder, x)


@pytest.mark.parametrize("cfg", [SMALL, SAME_WIDTH], ids=["small", "same-width-stage"])
@pytest.mark.parametrize("decoder", ["seg", "den"])
def test_key_mapping_is_a_bijection(cfg, decoder):
    net, theirs = _pair(cfg, decoder)
    kmap = _nnunet_key_map(net, decoder)
    prefix = {"seg": "seg_decoder.", "den": "den_decoder."}[decoder]
    ours = {k for k in net.state_dict() if k.startswith(("encoder.", prefix))}
    assert set(kmap) == ours  # every tensor of our encoder and this decoder, nothing else
    # their state dict lists a tensor under several names (modules registered twice); group the names by tensor
    groups = {}
    for k, v in theirs.state_dict().items():
        groups.setdefault(v.data_ptr(), set()).add(k)
    assert sorted(map(sorted, groups.values())) == sorted(sorted(v) for v in kmap.values())
    assert len(groups) == len(kmap)
    # a round trip through their layout restores exactly our tensors
    twin, _ = _pair(cfg, decoder, seed=20)
    load_nnunet_state_dict(twin, nnunet_state_dict(net, decoder), decoder)
    assert all(torch.equal(net.state_dict()[k], twin.state_dict()[k]) for k in ours)


def test_strict_loading_names_what_does_not_fit():
    net, theirs = _pair(SMALL, "seg")
    state = dict(theirs.state_dict())
    before = {k: v.clone() for k, v in net.state_dict().items()}

    missing = dict(state)
    del missing["decoder.seg_layers.1.bias"]
    with pytest.raises(ValueError, match=r"missing keys: decoder\.seg_layers\.1\.bias"):
        load_nnunet_state_dict(net, missing)

    extra = dict(state, **{"decoder.seg_layers.9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.seg_layers\.9\.weight"):
        load_nnunet_state_dict(net, extra)

    wrong = dict(state)
    key = "encoder.stages.1.blocks.0.conv1.conv.weight"
    for alias in (key, key.replace(".conv.", ".all_modules.0."), "decoder." + key,
                  "decoder." + key.replace(".conv.", ".all_modules.0.")):
        wrong[alias] = torch.zeros(8, 4, 1, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shape mismatches: encoder\.stages\.1\.blocks\.0\.conv1\.conv\.weight"):
        load_nnunet_state_dict(net, wrong)

    classes = ResidualEncoderUNet(**dict(nnunet_kwargs(net), num_classes=5)).double()
    with pytest.raises(ValueError, match=r"shape mismatches: decoder\.seg_layers\.0\.weight"):
        load_nnunet_state_dict(net, classes.state_dict())

    disagree = dict(state)
    disagree["decoder.encoder.stem.convs.0.conv.bias"] = state["encoder.stem.convs.0.conv.bias"] + 1
    with pytest.raises(ValueError, match="different values"):
        load_nnunet_state_dict(net, disagree)

    with pytest.raises(ValueError, match="no denoising decoder"):
        load_nnunet_state_dict(LDOSNet(**SMALL, denoise=False), state, "den")
    with pytest.raises(ValueError, match="'seg' or 'den'"):
        nnunet_state_dict(net, "both")
    # nothing was copied by the refused loads
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("decoder", ["seg", "den"])
def test_bundled_ldos_model_runs_the_same_in_residual_encoder_unet(decoder):
    net, cfg = load_model(ROOT / "Resources" / "Models" / "segmentation-ldos-cpu.pt")
    assert cfg["network"]["features"] == [8, 16, 32, 64]
    theirs = ResidualEncoderUNet(**nnunet_kwargs(net, decoder))
    theirs.load_state_dict(nnunet_state_dict(net, decoder), strict=True)
    net.eval()
    theirs.eval()
    theirs.decoder.deep_supervision = False
    x = torch.rand(1, 1, 48, 48, 48, generator=torch.Generator().manual_seed(3)) * 2.0
    ours = _ours(net, x, decoder)[0]
    with torch.no_grad():
        ref = theirs(x)
    assert ours.shape == ref.shape == (1, 19 if decoder == "seg" else 1, 48, 48, 48)
    torch.testing.assert_close(ref, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
    if decoder == "seg":
        assert (ref.argmax(1) == ours.argmax(1)).float().mean() > 0.999
