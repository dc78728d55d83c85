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


def test_sparse_execution_skips_zero_weight_experts_and_matches_dense(monkeypatch):
    import SynthesisModuleLib.model as model
    torch.manual_seed(1)
    net = Generator(SMALL).eval()
    net.fused = False             # the experts one by one (as in training); the fused path below
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
    # fused inference: only the experts of non-zero weight go into the mixed products
    names = {id(m): n for n, m in net.named_modules()}
    mixed = []
    for fn in ("mixed_attention", "mixed_mlp"):
        orig = getattr(model, fn)
        monkeypatch.setattr(model, fn, lambda experts, *a, orig=orig: (
            mixed.append([names[id(e)] for e in experts]), orig(experts, *a))[1])
    net.fused = True
    with torch.no_grad():
        fused = net(x)
    assert torch.max(torch.abs(dense - fused)) < 1e-5
    assert mixed[0] == ["body.0.attention.att_experts.1"]
    assert all(not n.endswith("experts.0") for ex in mixed for n in ex) and len(mixed) == net.num_banks


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


def _partly_routed_net(cfg, x):
    """A float64 network with random weights whose relu routing gives some expert a zero weight for some samples
    of ``x`` and not for others (the case the fused path computes for all and multiplies by 0)."""
    for seed in range(50):
        torch.manual_seed(seed)
        net = Generator(cfg).double().eval()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.4)
        net.routing_log = []
        with torch.no_grad():
            net(x)
        log, net.routing_log = net.routing_log, None
        partly = any(((w != 0).any(0) & (w == 0).any(0)).any() for w in log)
        if cfg.get("arch") == "baseline" or cfg.get("gating") == "softmax" or partly:
            return net
    raise AssertionError("no seed gives a partly routed network")


@pytest.mark.parametrize("cfg", [dict(SMALL), dict(SMALL, gating="softmax"), dict(SMALL, gating="top2"),
                                 dict(SMALL, use_hidden=False), dict(SMALL, arch="baseline"),
                                 dict(SMALL, qk_norm=False)])
def test_fused_inference_is_the_same_network(cfg):
    """Inference mixes each bank's active experts in a few large products (mixed_attention, mixed_mlp) and calls
    oneDNN's convolution directly: the same outputs and routing as the experts one by one."""
    x = torch.rand(3, 1, 6, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * \
        torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64).view(3, 1, 1, 1, 1)
    x[0] = torch.linspace(0, 1, x[0].numel(), dtype=torch.float64).view(x[0].shape)   # a ramp routes otherwise
    net = _partly_routed_net(cfg, x)
    outs, logs = [], []
    for fused in (True, False):
        net.fused = fused
        net.routing_log = [] if net.num_banks else None
        with torch.no_grad():
            assert net.uses_fused(x) == fused
            outs.append(net(x))
        logs.append(net.routing_log)
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12)
    if net.num_banks:
        assert len(logs[0]) == len(logs[1]) == net.num_banks
        assert all(torch.allclose(a, b, rtol=0, atol=1e-12) and torch.equal(a == 0, b == 0) for a, b in zip(*logs))
    # float32 on the CPU (oneDNN's convolution called directly), one patch and several
    net = net.float()
    for xb in (x[:1].float(), x.float()):
        with torch.no_grad():
            net.fused = False
            ref = net(xb)
            net.fused = True
            assert torch.allclose(net(xb), ref, rtol=1e-5, atol=1e-5)


def test_fused_path_only_at_inference():
    net = Generator(SMALL)
    x = _x(b=1, n=6)
    assert not net.uses_fused(x)                      # gradients on: training takes the experts one by one
    with torch.no_grad():
        assert net.uses_fused(x)
        net.sparse = False
        assert not net.uses_fused(x)                  # dense execution (the authors') is never fused
        net.sparse, net.token_layout = True, False
        assert not net.uses_fused(x)
        net.token_layout = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not net.uses_fused(x)


def test_conv3x3_equals_conv3d():
    from SynthesisModuleLib.model import conv3x3
    g = torch.Generator().manual_seed(0)
    for b, cin, cout, groups in ((1, 16, 1, 1), (2, 1, 16, 1), (1, 12, 12, 12)):
        x = torch.rand(b, cin, 9, 10, 11, generator=g).contiguous(memory_format=torch.channels_last_3d)
        w = torch.rand(cout, cin // groups, 3, 3, 3, generator=g)
        bias = torch.rand(cout, generator=g)
        with torch.no_grad():
            assert torch.allclose(conv3x3(x, w, bias, groups), torch.nn.functional.conv3d(x, w, bias, padding=1,
                                                                                          groups=groups), atol=1e-5)


@pytest.mark.parametrize("bank", ["attention", "mlp"])
def test_fused_inference_with_a_bank_whose_experts_are_all_off(bank):
    torch.manual_seed(3)
    net = Generator(SMALL).double().eval()
    with torch.no_grad():
        getattr(net.body[0], bank).routing.conv3.bias.fill_(-100.0)   # every weight of that bank is 0
    x = _x(b=2, n=6).double()
    outs = []
    for fused in (True, False):
        net.fused, net.routing_log = fused, []
        with torch.no_grad():
            outs.append(net(x))
        assert bool((net.routing_log[0 if bank == "attention" else 1] == 0).all())
    assert torch.allclose(outs[0], outs[1], rtol=0, atol=1e-12)


def test_fused_path_is_cpu_float32_or_float64_only(monkeypatch):
    from SynthesisModuleLib.model import conv3x3
    net = Generator(SMALL).bfloat16()
    with torch.no_grad():
        assert not net.uses_fused(_x(b=1, n=6).bfloat16())
        assert net.double().uses_fused(_x(b=1, n=6).double())
        assert net.float().uses_fused(_x(b=1, n=6))
    x, w = torch.rand(1, 4, 5, 5, 5), torch.rand(4, 1, 3, 3, 3)
    ref = torch.nn.functional.conv3d(x, w, None, padding=1, groups=4)
    direct = []
    real = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: (direct.append(1), real(*a))[1])
    with torch.no_grad():
        assert torch.allclose(conv3x3(x, w, None, 4), ref, atol=1e-6) and direct == [1]
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False            # the user's oneDNN switch is respected
        try:
            assert torch.allclose(conv3x3(x, w, None, 4), ref, atol=1e-6) and direct == [1]
        finally:
            torch.backends.mkldnn.enabled = enabled
