"""Training: centre schedule, checkpoint/resume, DDP gradient averaging with 2 local CPU processes (torchrun)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synthesis_data import TINY_MODEL, TINY_TRAIN
from SynthesisModuleLib.data import CenterPatchSampler, read_manifest, select
from SynthesisModuleLib.model import build_model, charbonnier_loss
from SynthesisModuleLib.train import export_weights, load_config, train
from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.models import read_torch_file

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


def _cfg(**train):
    return {"name": "tiny", "model": dict(TINY_MODEL), "train": {**TINY_TRAIN, **train}}


def test_sampler_resamples_to_2mm_and_samples_uniform_patches(tiny_manifest):
    rows = select(read_manifest(tiny_manifest), split="train", known=True)
    s = CenterPatchSampler.from_manifest(rows, 12)
    assert s.centers == ["A", "B"]
    low, full = s.volumes["B"][0]
    assert low.shape == (14, 20, 20)  # centre B: 2.5 mm in-plane x 16 voxels -> 40 mm -> 20 voxels at 2 mm
    lo, fu = s.sample("A", 3, np.random.default_rng(0))
    assert lo.shape == fu.shape == (3, 1, 12, 12, 12)
    # uniform sampling: on a volume of unique values the first voxel of a patch gives its origin
    vol = np.arange(20 ** 3, dtype=np.float32).reshape(20, 20, 20)
    u = CenterPatchSampler({"X": [(vol, vol)]}, 12)
    starts = np.array([np.unravel_index(int(u.sample("X", 1, np.random.default_rng(i))[0][0, 0, 0, 0, 0]), vol.shape)
                       for i in range(400)])
    for axis in range(3):
        counts = np.bincount(starts[:, axis], minlength=9)
        assert len(counts) == 9 and np.all(counts > 0)  # every origin 0..8 is drawn, none beyond
        assert abs(starts[:, axis].mean() - 4.0) < 0.6


def test_lesion_oversampling_puts_lesions_in_patches(tiny_manifest):
    rows = select(read_manifest(tiny_manifest), split="train", known=True)
    uniform = CenterPatchSampler.from_manifest(rows, 6)
    always = CenterPatchSampler.from_manifest(rows, 6, lesion_oversample=1.0)
    assert not uniform.lesions and len(always.lesions["A"]) == 2
    les = always.lesions["A"][0]
    assert len(les) > 0
    # a lesion voxel is brighter than 3 SUV on the full dose (phantom: body + 4 in lesions); every lesion-centred
    # patch contains one, uniform patches mostly do not
    hit_always = np.mean([always.sample("A", 1, np.random.default_rng(i))[1].max() > 3.0 for i in range(60)])
    hit_uniform = np.mean([uniform.sample("A", 1, np.random.default_rng(i))[1].max() > 3.0 for i in range(60)])
    assert hit_always == 1.0 and hit_uniform < hit_always
    with pytest.raises(InputError, match="lesion_oversample"):
        CenterPatchSampler({"X": []}, 6, lesion_oversample=2.0)


def test_train_all_centres_per_step_checkpoint_and_resume(tiny_manifest, tmp_path):
    out_a = tmp_path / "a"
    s1 = train(_cfg(max_steps=4), tiny_manifest, out_a)
    assert s1["steps"] == 4 and (out_a / "last.pt").is_file() and s1["centers_per_step"] == 2
    with open(out_a / "train_log_rank0.csv") as fh:
        centers = [r["center"] for r in csv.DictReader(fh)]
    assert centers == ["A+B"] * 4  # every step sees every known centre (the paper's setup)
    s_one = train(_cfg(max_steps=4, centers_per_step=1), tiny_manifest, tmp_path / "one")
    assert s_one["centers_per_step"] == 1
    with open(tmp_path / "one" / "train_log_rank0.csv") as fh:
        assert [r["center"] for r in csv.DictReader(fh)] == ["A", "B", "A", "B"]  # opt-in: one centre per step
    # 2 steps, stop, resume for 2 more == 4 uninterrupted steps
    out_b = tmp_path / "b"
    train(_cfg(max_steps=2), tiny_manifest, out_b)
    s2 = train(_cfg(max_steps=4), tiny_manifest, out_b)
    assert s2["steps"] == 4 and s2["steps_this_run"] == 2
    a = read_torch_file(out_a / "last.pt", ())["state_dict"]
    b = read_torch_file(out_b / "last.pt", ())["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    w = export_weights(out_a / "last.pt", tmp_path / "w.pt")
    ck = torch.load(w, weights_only=True)
    assert set(ck) >= {"config", "state_dict"} and "optimizer" not in ck


def test_resumed_stage_uses_the_overridden_learning_rate(tiny_manifest, tmp_path):
    import argparse
    from SynthesisModuleLib.train import add_override_arguments, apply_overrides
    ap = argparse.ArgumentParser()
    add_override_arguments(ap)
    a = ap.parse_args(["--max-steps", "4", "--lr", "1e-5", "--lesion-oversample", "0.5"])
    cfg = apply_overrides(_cfg(max_steps=2, lr=3e-3), a)
    assert cfg["train"]["max_steps"] == 4 and cfg["train"]["lr"] == 1e-5 and cfg["train"]["lesion_oversample"] == 0.5
    train(_cfg(max_steps=2, lr=3e-3), tiny_manifest, tmp_path)
    train(cfg, tiny_manifest, tmp_path)
    ck = read_torch_file(tmp_path / "last.pt", ())
    assert ck["step"] == 4 and ck["optimizer"]["param_groups"][0]["lr"] == 1e-5
    assert ck["config"]["train"]["lr"] == 1e-5


def test_training_reduces_loss(tiny_manifest, tmp_path):
    cfg = _cfg(max_steps=40, lr=3e-3, log_every=1, checkpoint_every=100)
    train(cfg, tiny_manifest, tmp_path)
    with open(tmp_path / "train_log_rank0.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        train(_cfg(), tmp_path / "missing.csv", tmp_path)
    with pytest.raises(InputError, match="not found"):
        load_config("no_such_config")


def test_ddp_two_cpu_processes_average_gradients(tiny_manifest, tmp_path):
    cfg = _cfg(max_steps=1, checkpoint_every=1)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "SynthesisModule"), str(ROOT)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "SynthesisModuleLib.train", "--config", str(cfg_path), "--manifest", str(tiny_manifest),
           "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["world_size"] == 2
    logs = {r: list(csv.DictReader(open(tmp_path / "ddp" / f"train_log_rank{r}.csv"))) for r in (0, 1)}
    assert logs[0][0]["center"] == "A" and logs[1][0]["center"] == "B"  # each process its own centre
    ddp_state = read_torch_file(tmp_path / "ddp" / "last.pt", ())["state_dict"]

    # reference: one process, loss = mean of the two processes' losses (= DDP gradient averaging), one Adam step
    full = load_config(cfg)
    rows = select(read_manifest(tiny_manifest), split="train", known=True)
    sampler = CenterPatchSampler.from_manifest(rows, full["train"]["patch_size"])
    torch.manual_seed(full["train"]["seed"])
    net = build_model(full["model"])
    opt = torch.optim.Adam(net.parameters(), lr=full["train"]["lr"])
    loss = 0
    for rank, center in ((0, "A"), (1, "B")):
        lo, fu = sampler.sample(center, full["train"]["batch_size"],
                                np.random.default_rng([full["train"]["seed"], rank, 0]))
        loss = loss + charbonnier_loss(net(torch.from_numpy(lo)), torch.from_numpy(fu)) / 2
    loss.backward()
    opt.step()
    ref = net.state_dict()
    diffs = {k: float((ref[k] - ddp_state[k]).abs().max()) for k in ref}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
    # and a single-centre step would differ: the averaging matters
    torch.manual_seed(full["train"]["seed"])
    net1 = build_model(full["model"])
    opt1 = torch.optim.Adam(net1.parameters(), lr=full["train"]["lr"])
    lo, fu = sampler.sample("A", full["train"]["batch_size"], np.random.default_rng([full["train"]["seed"], 0, 0]))
    charbonnier_loss(net1(torch.from_numpy(lo)), torch.from_numpy(fu)).backward()
    opt1.step()
    assert max(float((net1.state_dict()[k] - ddp_state[k]).abs().max()) for k in ref) > 1e-5


def test_step_centres_share_the_centres_of_a_step_over_processes():
    from SynthesisModuleLib.train import step_centers
    c = ["C1", "C2", "C3", "C4"]
    assert step_centers(0, c, 4) == [(0, "C1"), (1, "C2"), (2, "C3"), (3, "C4")]
    assert [step_centers(0, c, 4, world=4, rank=r) for r in range(4)] == [[(r, c[r])] for r in range(4)]
    assert step_centers(5, c, 4, world=2, rank=1) == [(1, "C2"), (3, "C4")]
    assert [step_centers(s, c, 1)[0][1] for s in range(5)] == ["C1", "C2", "C3", "C4", "C1"]
    with pytest.raises(InputError, match="processes"):
        from SynthesisModuleLib.train import train as _train
        os.environ["WORLD_SIZE"] = "3"
        try:
            _train(_cfg(centers_per_step=2), sampler=CenterPatchSampler({"A": [], "B": []}, 12))
        finally:
            del os.environ["WORLD_SIZE"]


def test_one_process_accumulates_the_mean_gradient_of_all_centres(tiny_manifest, tmp_path):
    """1 process, 2 centres: one train() step == one Adam step on the mean of the two centres' losses."""
    cfg = _cfg(max_steps=1, checkpoint_every=1)
    train(cfg, tiny_manifest, tmp_path)
    got = read_torch_file(tmp_path / "last.pt", ())["state_dict"]
    full = load_config(cfg)
    rows = select(read_manifest(tiny_manifest), split="train", known=True)
    sampler = CenterPatchSampler.from_manifest(rows, full["train"]["patch_size"])
    torch.manual_seed(full["train"]["seed"])
    net = build_model(full["model"])
    net.sparse = False
    opt = torch.optim.Adam(net.parameters(), lr=full["train"]["lr"])
    loss = 0
    for q, center in enumerate(("A", "B")):
        rng = np.random.default_rng([full["train"]["seed"], q, 0])
        lo, fu = sampler.sample(center, full["train"]["batch_size"], rng)
        loss = loss + charbonnier_loss(net(torch.from_numpy(lo)), torch.from_numpy(fu)) / 2
    loss.backward()
    opt.step()
    ref = net.state_dict()
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < 1e-5


def _routing_model(seed=0):
    from synthesis_data import TINY_MODEL
    torch.manual_seed(seed)
    net = build_model({**TINY_MODEL, "tail_init": "default"}).double()
    with torch.no_grad():  # routing biases that switch some experts off for some samples (sparse paths exercised)
        for i, blk in enumerate(net.body):
            for bank in (blk.attention, blk.mlp):
                bank.routing.conv3.bias.copy_(torch.tensor([0.3, -0.05, -5.0], dtype=torch.float64) * (1 + i))
    return net


def test_sparse_training_follows_the_dense_adam_trajectory_exactly():
    """Sparse execution skips zero-weight experts; with their gradients filled with zeros, 8 Adam steps
    (float64) give the parameters of dense training, moments and step counts included."""
    from SynthesisModuleLib.train import accumulate_step
    rng = np.random.default_rng(0)
    batches = [[(torch.from_numpy(rng.random((2, 1, 8, 8, 8))), torch.from_numpy(rng.random((2, 1, 8, 8, 8))))
                for _ in range(2)] for _ in range(8)]
    runs = {}
    for sparse in (False, True):
        net = _routing_model()
        net.sparse = sparse
        net.routing_log = []
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for b in batches:
            accumulate_step(net, net, opt, b, 1e-3, 0.5)
        runs[sparse] = (net, opt, net.routing_log)
    log = torch.cat(runs[True][2])
    assert bool((log == 0).any()) and bool((log > 0).any())  # some experts were skipped, some ran
    dense, sparse = runs[False][0].state_dict(), runs[True][0].state_dict()
    assert max(float((dense[k] - sparse[k]).abs().max()) for k in dense) < 1e-12
    sd, ss = runs[False][1].state_dict()["state"], runs[True][1].state_dict()["state"]
    assert sd.keys() == ss.keys()
    for k in sd:
        assert float(sd[k]["step"]) == float(ss[k]["step"]) == 8.0
        assert float((sd[k]["exp_avg_sq"] - ss[k]["exp_avg_sq"]).abs().max()) < 1e-12
    # without the zero fill, Adam skips the unused experts and the trajectories part
    net = _routing_model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    import SynthesisModuleLib.train as tr
    orig = tr.fill_missing_grads
    tr.fill_missing_grads = lambda model: 0
    try:
        for b in batches:
            accumulate_step(net, net, opt, b, 1e-3, 0.5)
    finally:
        tr.fill_missing_grads = orig
    unfilled = net.state_dict()
    assert max(float((dense[k] - unfilled[k]).abs().max()) for k in dense) > 1e-6


def test_a_later_stage_starts_from_given_weights(tiny_manifest, tmp_path):
    from PETWorkbenchLib.errors import ModelError
    train(_cfg(max_steps=2), tiny_manifest, tmp_path / "s1")
    w = export_weights(tmp_path / "s1" / "last.pt", tmp_path / "w.pt")
    s = train(_cfg(max_steps=0), tiny_manifest, tmp_path / "s2", init=w)
    assert s["init"] == str(w)
    a = torch.load(w, weights_only=True)["state_dict"]
    b = read_torch_file(tmp_path / "s2" / "last.pt", ())["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _cfg(max_steps=0)
    other["model"] = {**other["model"], "n_feats": 4}
    with pytest.raises(ModelError, match="another model config"):
        train(other, tiny_manifest, tmp_path / "s3", init=w)
