"""Training of DRMC / baseline as in the paper (Sec. 3.2).

Charbonnier loss (eps 1e-3), Adam (lr 1e-4), patches sampled uniformly from volumes resampled to 2 mm. Every
optimiser step averages the gradients of one batch from each of ``centers_per_step`` centres (default: every known
centre, as the paper's one-GPU-per-centre setup in which every update sees all four centres). The centres of a step
are shared out over the processes (process ``rank`` takes the step's centres ``rank, rank + world, ...``); a process
with several accumulates their gradients (one backward pass per batch, so memory stays that of one batch), and
torch DDP (gloo on CPU, NCCL on GPUs) averages across processes. With 4 processes and 4 centres this is exactly the
paper's setup; with 1 process it is the same update computed by gradient accumulation.
Launch several processes with
``torchrun --standalone --nproc_per_node P -m SynthesisModuleLib.train --config C --manifest M --out DIR``
(the ``train synthesis`` CLI command does this for ``--nproc P``). Checkpoints (``last.pt``) are written every
``checkpoint_every`` steps and at the end; training resumes from ``last.pt`` when it exists. Checkpoints hold
tensors and plain data only and are read with torch's weights-only loader.

Sparse execution (experts with routing weight 0 are not computed) leaves their parameters without a gradient;
:func:`accumulate_step` gives them an explicit zero gradient before the Adam step, which is what dense execution
computes, so Adam's moments and step counts evolve exactly as in dense training (tested over several steps).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from PETWorkbenchLib.allocator import reusing_freed_memory
from PETWorkbenchLib.errors import InputError, ModelError
from PETWorkbenchLib.imageio import save_torch
from PETWorkbenchLib.progress import Reporter

from .data import CenterPatchSampler, read_manifest, select
from .model import build_model, charbonnier_loss, count_parameters, model_config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEFAULT_TRAIN = {
    "patch_size": 64,
    "batch_size": 1,
    "lr": 1e-4,
    "loss_eps": 1e-3,
    "max_steps": 1000,
    "max_minutes": None,
    "checkpoint_every": 100,
    "log_every": 10,
    "seed": 0,
    "suv_scale": 1.0,
    "num_threads": None,
    "sparse": True,
    "train_split": "train",
    "tracers": None,
    "lesion_oversample": 0.0,
    "centers_per_step": None,  # None: every known centre in every step (the paper); an int m: m centres per step
}

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_config(config: dict | str | Path) -> dict:
    """Config dict from a dict, a JSON file path or the name of a file in ``configs/`` (without .json)."""
    from PETWorkbenchLib.config import read_config
    cfg = read_config(config, CONFIG_DIR)
    cfg["model"] = model_config(cfg.get("model"))
    tr = copy.deepcopy(DEFAULT_TRAIN)
    tr.update(cfg.get("train") or {})
    cfg["train"] = tr
    cfg.setdefault("name", cfg["model"]["arch"])
    return cfg


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return world, rank


def read_checkpoint(path: str | Path, keys: Sequence[str] = ("config", "state_dict"),
                    map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by :func:`train` (:func:`PETWorkbenchLib.models.read_torch_file`: tensors and plain
    data only; anything else raises ModelError naming the file and nothing in it is run)."""
    from PETWorkbenchLib.models import read_torch_file
    return read_torch_file(path, keys, "training checkpoint", map_location)


def export_weights(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write the shipped form {config, state_dict, meta} of a training checkpoint; returns its path."""
    ck = read_checkpoint(checkpoint_path)
    meta = {"step": ck.get("step"), "elapsed_s": ck.get("elapsed_s")}
    state = {k: v.clone() for k, v in ck["state_dict"].items()}
    return save_torch({"config": ck["config"], "state_dict": state, "meta": meta}, out_path, inputs=(checkpoint_path,))


def step_centers(step: int, centers: Sequence[str], per_step: int, world: int = 1, rank: int = 0
                 ) -> list[tuple[int, str]]:
    """(slot, centre) pairs process ``rank`` computes at optimiser step ``step``: the step covers centre slots
    ``step * per_step + q`` (q < per_step, cycling through ``centers``) and process ``rank`` takes q = rank,
    rank + world, ... The slot q seeds the batch draw, so the update does not depend on the number of processes."""
    k = len(centers)
    return [(q, centers[(step * per_step + q) % k]) for q in range(rank, per_step, world)]


def fill_missing_grads(model: torch.nn.Module) -> int:
    """Give every parameter without a gradient an explicit zero gradient (what dense execution computes for an
    expert whose routing weight is 0), so that Adam updates its moments and step count as in dense training.
    Returns the number of parameters filled."""
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
            n += 1
    return n


def accumulate_step(net: torch.nn.Module, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_eps: float, scale: float = 1.0
                    ) -> list[float]:
    """One optimiser step on the sum of ``scale`` x the Charbonnier losses of ``batches`` (one backward pass per
    batch; under DDP, gradient synchronisation only on the last). ``net`` is ``model`` or its DDP wrapper.
    Returns the per-batch losses."""
    import contextlib
    opt.zero_grad(set_to_none=True)
    losses = []
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        ctx = net.no_sync() if (not last and hasattr(net, "no_sync")) else contextlib.nullcontext()
        with ctx:
            loss = charbonnier_loss(net(x), y, loss_eps)
            (loss * scale).backward()
        losses.append(float(loss.detach()))
    fill_missing_grads(model)
    opt.step()
    return losses


@reusing_freed_memory
def train(config: dict | str | Path, manifest: str | Path | None = None, out_dir: str | Path = ".",
          sampler: CenterPatchSampler | None = None, resume: bool = True, device: str | torch.device = "cpu",
          progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
          init: str | Path | None = None) -> dict:
    """Train one model; returns a summary dict. ``sampler`` (a CenterPatchSampler) replaces ``manifest``.
    ``init``: weights ({config, state_dict}, e.g. a shipped model) to start from when there is no checkpoint to
    resume (a fresh optimiser; a later training stage)."""
    cfg = load_config(config)
    tr = cfg["train"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rep = Reporter(progress, cancel)
    world, rank = _dist_env()
    distributed = world > 1
    if tr["num_threads"]:
        torch.set_num_threads(int(tr["num_threads"]))
    from PETWorkbenchLib.device import torch_device
    dev = torch_device(device)

    if sampler is None:
        if manifest is None:
            raise InputError("either a manifest or a sampler is needed for training")
        rows = select(read_manifest(manifest), split=tr["train_split"], known=True, tracers=tr["tracers"])
        if not rows:
            raise InputError(f"manifest {manifest} has no known-centre rows with split {tr['train_split']!r}")
        sampler = CenterPatchSampler.from_manifest(rows, tr["patch_size"], tr["suv_scale"],
                                                   lesion_oversample=float(tr.get("lesion_oversample", 0.0)))
    centers = [str(c) for c in sampler.centers]
    per_step = len(centers) if tr.get("centers_per_step") in (None, 0) else int(tr["centers_per_step"])
    if per_step < world:
        raise InputError(f"centers_per_step={per_step} is smaller than the number of processes ({world}); "
                         f"use at most {per_step} processes")
    if distributed:
        import torch.distributed as dist
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")

    torch.manual_seed(int(tr["seed"]))
    model = build_model(cfg["model"]).to(dev)
    model.sparse = bool(tr["sparse"])
    opt = torch.optim.Adam(model.parameters(), lr=float(tr["lr"]))
    step, elapsed0 = 0, 0.0
    ck_path = out_dir / "last.pt"
    if resume and ck_path.is_file():
        ck = read_checkpoint(ck_path, ("config", "state_dict", "optimizer", "step"), map_location=dev)
        if ck["config"]["model"] != cfg["model"]:
            raise ModelError(f"checkpoint {ck_path} was made with another model config; use a new output folder")
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        for g in opt.param_groups:  # the config's learning rate wins over the one saved (a later stage may lower it)
            g["lr"] = float(tr["lr"])
        step, elapsed0 = int(ck["step"]), float(ck.get("elapsed_s", 0.0))
    elif init is not None:
        ck = read_checkpoint(init, ("config", "state_dict"), map_location=dev)
        if model_config(ck["config"].get("model", ck["config"])) != cfg["model"]:
            raise ModelError(f"weights {init} were made with another model config than {cfg['name']!r}")
        model.load_state_dict(ck["state_dict"])
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                  find_unused_parameters=model.sparse and model.config["arch"] == "drmc")

    def save():
        if rank == 0:
            save_torch({"config": cfg, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": int(step), "elapsed_s": float(elapsed0 + time.time() - t0), "centers": centers},
                       ck_path)

    log_path = out_dir / f"train_log_rank{rank}.csv"
    if not log_path.exists():
        log_path.write_text("step,center,loss,loss_identity,elapsed_s\n")
    t0 = time.time()
    max_steps = int(tr["max_steps"])
    max_s = None if tr["max_minutes"] in (None, 0) else 60.0 * float(tr["max_minutes"])
    losses = []
    start_step = step
    while step < max_steps:
        work = step_centers(step, centers, per_step, world, rank)
        batches = []
        for q, center in work:
            rng = np.random.default_rng([int(tr["seed"]), q, step])
            low, full = sampler.sample(center, int(tr["batch_size"]), rng)
            batches.append((torch.from_numpy(low).to(dev), torch.from_numpy(full).to(dev)))
        # DDP averages over processes; world / per_step makes the result the mean over the step's centres
        step_losses = accumulate_step(net, model, opt, batches, float(tr["loss_eps"]), world / per_step)
        step += 1
        lv = float(np.mean(step_losses))
        if not math.isfinite(lv):
            raise ModelError(f"training diverged at step {step} (loss {lv})")
        losses.append(lv)
        center = "+".join(c for _, c in work)
        elapsed = elapsed0 + time.time() - t0
        if step % int(tr["log_every"]) == 0 or step == max_steps:
            ident = float(np.mean([float(charbonnier_loss(x, y, float(tr["loss_eps"])))
                                   for x, y in batches]))  # loss of returning the input
            with open(log_path, "a") as fh:
                fh.write(f"{step},{center},{lv:.6g},{ident:.6g},{elapsed:.1f}\n")
        stop = max_s is not None and elapsed >= max_s
        if distributed:
            import torch.distributed as dist
            flag = torch.tensor([1.0 if stop else 0.0])
            dist.all_reduce(flag)
            stop = bool(flag.item() > 0)
        if step % int(tr["checkpoint_every"]) == 0:
            save()
        rep(step / max_steps, f"step {step}/{max_steps} {center} loss {lv:.4g}")
        if stop:
            break
    save()
    summary = {"name": cfg["name"], "steps": step, "steps_this_run": step - start_step,
               "final_loss_mean10": float(np.mean(losses[-10:])) if losses else None,
               "elapsed_s": round(elapsed0 + time.time() - t0, 1), "params": count_parameters(model),
               "centers": centers, "centers_per_step": per_step, "init": str(init) if init else None,
               "world_size": world, "checkpoint": str(ck_path)}
    if distributed:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return summary


OVERRIDES = (("max_steps", int, "stop at this many steps in all"),
             ("max_minutes", float, "stop after this many minutes of training in all (resumed runs included)"),
             ("lr", float, "Adam learning rate (also applied when resuming)"),
             ("lesion_oversample", float, "fraction of lesion-centred patches"),
             ("centers_per_step", int, "centres whose gradients each optimiser step averages (default: all known "
                                       "centres, as the paper)"))


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-steps, --max-minutes, --lr, --lesion-oversample: training settings that replace the config's."""
    for key, typ, text in OVERRIDES:
        parser.add_argument("--" + key.replace("_", "-"), type=typ, default=None, help=text)


def apply_overrides(cfg: dict, args: argparse.Namespace) -> dict:
    """Copy the override arguments that were given into cfg['train']; returns cfg."""
    for key, typ, _ in OVERRIDES:
        value = getattr(args, key, None)
        if value is not None:
            cfg["train"][key] = typ(value)
    return cfg


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train DRMC / baseline (use torchrun for several processes)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    add_override_arguments(ap)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--init", default=None, help="start from these weights when there is no checkpoint to resume")
    a = ap.parse_args(argv)
    cfg = apply_overrides(load_config(a.config), a)
    summary = train(cfg, a.manifest, a.out, resume=not a.no_resume, device=a.device, init=a.init)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
