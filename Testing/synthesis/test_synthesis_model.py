"""DRMC network: dynamic routing, cross-layer H, gating variants, sparse == dense, baseline, loss."""

import pytest
import torch

from SynthesisModuleLib.model import (Attention_Bank, Generator, MLP_Bank, charbonnier_loss, count_parameters,
                                      model_config)
from SynthesisModuleLib.train import load_config

torch.set_num_threads(1)
SMALL = {"n_feats": 8, "res_num": 2, "num_experts": 3, "num_heads": 2, "hidden_dim": 4}


def _x(b=2, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, n, n, n, generator=g)


def test_paper_config_shape_and_names():
    cfg = load_config("drmc_paper")["model"]
    assert (cfg["n_feats"], cfg["num_experts"], cfg["res_num"], cfg["gating"]) == (64, 3, 5, "relu")
    net = Generator(cfg)
    keys = set(net.state_dict())
    # names of the authors' model (state dicts can be mapped key by key)
    for k in ("head_conv.weight", "tail_conv.bias", "hidden", "body.4.beta", "body.4.gamma",
              "body.0.norm1.norm.weight", "body.0.attention.att_experts.2.temperature",
              "body.0.attention.att_experts.0.qkv.weight", "body.0.attention.att_experts.0.dwconv.weight",
              "body.0.attention.att_experts.0.project_out.weight", "body.0.attention.routing.conv1.weight",
              "body.0.attention.routing.conv3.bias", "body.3.mlp.mpl_experts.1.fc2.weight"):
        assert k in keys, k
    assert len(net.body) == 5 and net.num_banks == 10
    assert net.hidden.shape == (1, 16, 1, 1, 1) and torch.all(net.hidden == 1)
    assert net.body[0].attention.routing.conv1.in_channels == 64 + 16  # [GAP(X), H]
    assert net.body[0].mlp.mpl_experts[0].fc1.out_channels == 128
    assert net.body[0].attention.att_experts[0].dwconv.groups == 64  # depth-wise


def test_baseline_is_routing_free_and_same_size_as_drmc():
    base = Generator(load_config("baseline_paper")["model"])
    drmc = Generator(load_config("drmc_paper")["model"])
    assert len(base.body) == 15 and base.num_banks == 0
    assert not any("routing" in k for k in base.state_dict())
    # 15 base blocks vs 5 blocks x 3 experts: comparable parameter budgets
    assert abs(count_parameters(base) - count_parameters(drmc)) / count_parameters(drmc) < 0.05


def test_bank_output_is_weighted_sum_of_experts():
    torch.manual_seed(0)
    bank = MLP_Bank(8, num_experts=3, hidden_dim=4)
    x = torch.randn(2, 8, 4, 4, 4)
    h = torch.randn(2, 4, 1, 1, 1)
    with torch.no_grad():
        bank.routing.conv3.bias.copy_(torch.tensor([0.5, -10.0, 0.3]))  # expert 2 is switched off by ReLU
        out, h_new = bank(x, h, sparse=False)
        gap = x.mean(dim=(2, 3, 4), keepdim=True)
        logits = bank.routing.conv3(bank.routing.gelu(bank.routing.conv1(torch.cat([gap, h], 1)))).flatten(1)
        w = torch.relu(logits)
        ref = sum(w[:, m].view(-1, 1, 1, 1, 1) * bank.mpl_experts[m](x) for m in range(3))
    assert torch.all(w[:, 1] == 0) and torch.all(w[:, 0] > 0)
    assert torch.allclose(out, ref, atol=1e-6)
    assert h_new.shape == (2, 4, 1, 1, 1)


def test_sparse_execution_skips_zero_weight_experts_and_matches_dense():
    torch.manual_seed(1)
    net = Generator(SMALL).eval()
    with torch.no_grad():  # switch off expert 0 of every bank for every input, and expert 2 of the first bank
        for blk in net.body:
            for bank in (blk.attention, blk.mlp):
                bank.routing.conv3.bias[0] = -100.0
        net.body[0].attention.routing.conv3.bias[2] = -100.0
    calls = {}
    for name, mod in net.named_modules():
        if name.endswith(("att_experts.0", "att_experts.1", "att_experts.2", "mpl_experts.0")):
            mod.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    x = _x()
    with torch.no_grad():
        net.sparse = False
        dense = net(x)
        dense_calls = dict(calls)
        calls.clear()
        net.sparse = True
        net.routing_log = []
        sparse = net(x)
    assert torch.max(torch.abs(dense - sparse)) < 1e-5
    assert dense_calls["body.0.attention.att_experts.0"] == 1
    assert "body.0.attention.att_experts.0" not in calls and "body.0.attention.att_experts.2" not in calls
    assert "body.1.mlp.mpl_experts.0" not in calls
    assert calls["body.0.attention.att_experts.1"] == 1
    assert len(net.routing_log) == net.num_banks and all(torch.all(w >= 0) for w in net.routing_log)


def test_sparse_per_sample_routing_matches_dense():
    """Experts active for only some samples of a batch are computed on those samples only."""
    torch.manual_seed(2)
    bank = Attention_Bank(8, num_experts=3, num_heads=2, hidden_dim=4)
    x = torch.randn(3, 8, 4, 4, 4)
    h = torch.zeros(3, 4, 1, 1, 1)
    h[1] = 5.0
    with torch.no_grad():
        bank.routing.conv1.weight.zero_()
        bank.routing.conv1.weight[:, 8:] = torch.eye(4).view(4, 4, 1, 1, 1)
        bank.routing.conv1.bias.zero_()
        bank.routing.conv3.weight.zero_()
        bank.routing.conv3.weight[1, 0] = 1.0  # expert 2 only for sample 1 (h = 5 -> GELU > 0)
        bank.routing.conv3.bias.copy_(torch.tensor([1.0, 0.0, 0.5]))
        w, _ = bank.routing(bank.avg_pool(x), h)
        assert w[1, 1] > 0 and w[0, 1] == 0 and w[2, 1] == 0
        dense, _ = bank(x, h, sparse=False)
        sparse, _ = bank(x, h, sparse=True)
    assert torch.max(torch.abs(dense - sparse)) < 1e-5


def test_cross_layer_hidden_representation_conditions_routing():
    torch.manual_seed(3)
    with_h = Generator(SMALL).eval()
    x = _x(1)
    with torch.no_grad():
        with_h.routing_log = []
        with_h(x)
        w1 = torch.cat(with_h.routing_log, 1)
        with_h.hidden.mul_(-3.0)  # a different initial H must change the routing
        with_h.routing_log = []
        with_h(x)
        w2 = torch.cat(with_h.routing_log, 1)
    assert not torch.allclose(w1, w2)
    no_h = Generator({**SMALL, "use_hidden": False})
    assert not hasattr(no_h, "hidden")
    assert no_h.body[0].attention.routing.conv1.in_channels == SMALL["n_feats"]
    assert with_h.body[0].attention.routing.conv1.in_channels == SMALL["n_feats"] + SMALL["hidden_dim"]


@pytest.mark.parametrize("gating", ["softmax", "top2"])
def test_gating_ablations(gating):
    torch.manual_seed(4)
    net = Generator({**SMALL, "gating": gating}).eval()
    net.routing_log = []
    with torch.no_grad():
        net(_x())
    for w in net.routing_log:
        assert torch.allclose(w.sum(1), torch.ones(w.shape[0]), atol=1e-5)
        nz = (w > 0).sum(1)
        assert torch.all(nz == (3 if gating == "softmax" else 2))


def test_global_residual_learning():
    net = Generator(SMALL).eval()
    with torch.no_grad():
        net.tail_conv.weight.zero_()
        net.tail_conv.bias.zero_()
        x = _x()
        assert torch.equal(net(x), x)


def test_charbonnier_loss():
    a = torch.zeros(10)
    assert abs(float(charbonnier_loss(a, a)) - 1e-3) < 1e-9
    b = torch.full((10,), 2.0)
    assert abs(float(charbonnier_loss(b, a)) - (4 + 1e-6) ** 0.5) < 1e-6


def test_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="gating"):
        model_config({"gating": "argmax"})
    with pytest.raises(ValueError, match="divisible"):
        model_config({"n_feats": 10, "num_heads": 4})
    with pytest.raises(ValueError, match="shape"):
        Generator(SMALL)(torch.rand(1, 8, 8, 8))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_expert_token_layout_is_the_papers_channel_attention(qk_norm):
    """The channels-last token path (one C x C product, normalisation applied to it, block-diagonal attn) is the
    channel attention as written: outputs and gradients, with 1 and 2 samples."""
    import torch.nn.functional as F

    from SynthesisModuleLib.model import Attention_Expert

    torch.manual_seed(0)
    ex = Attention_Expert(8, num_heads=2, qk_norm=qk_norm)
    with torch.no_grad():
        ex.temperature.copy_(torch.tensor([0.7, 1.9]).view(2, 1, 1))

    def plain(x):  # the expert written out from the equations, default memory layout
        b, c, d, h, w = x.shape
        q, k, v = (t.reshape(b, 2, c // 2, -1) for t in ex.qkv(x).chunk(3, dim=1))
        if qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * ex.temperature
        y = F.conv3d((attn.softmax(-1) @ v).reshape(b, c, d, h, w), ex.dwconv.weight, padding=1, groups=c)
        return ex.project_out(y)

    for b in (1, 2):
        x = torch.randn(b, 8, 6, 5, 7, requires_grad=True)
        out = ex(x)
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
        grads = torch.autograd.grad(out.pow(2).sum(), [x, *ex.parameters()])
        ref = plain(x)
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), [x, *ex.parameters()])
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)
        assert grads[0].abs().sum() > 0
        ex.token_layout = False
        assert torch.allclose(ex(x), ref, atol=1e-6)   # the reference path is the plain formula
        ex.token_layout = True


def test_attention_expert_token_layout_is_finite_for_an_all_zero_query_channel():
    """F.normalize's zero-norm convention in the forward and the backward pass (no 0/0 gradients)."""
    from SynthesisModuleLib.model import Attention_Expert
    torch.manual_seed(1)
    ex = Attention_Expert(8, num_heads=2)
    with torch.no_grad():
        ex.qkv.weight[0].zero_()                      # query channel 0 is zero at every voxel
    x = torch.randn(1, 8, 4, 4, 4)
    ex(x).pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ex.parameters())


@pytest.mark.parametrize("cfg", [dict(SMALL), dict(SMALL, gating="top2"), dict(SMALL, use_hidden=False),
                                 dict(SMALL, arch="baseline")])
def test_token_layout_and_plain_layout_give_the_same_network(cfg):
    torch.manual_seed(4)
    net = Generator(cfg)
    x = _x(b=2, n=6)
    outs, grads = [], []
    for layout in (True, False):
        net.token_layout = layout
        assert all(m.token_layout == layout for m in net.modules() if hasattr(m, "token_layout"))
        y = net(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.pow(2).sum(), list(net.parameters()), allow_unused=True))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
