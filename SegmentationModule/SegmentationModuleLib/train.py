"""LDOS training (and the paper's baselines) with checkpoints, resume and torchrun DDP.

Tasks (``cfg["task"]``):
* ``"ldos"``: shared encoder + segmentation and denoising decoders, loss ``phi(E) L_g + lambda L_s``;
* ``"segonly"``: the same network without the denoising decoder, loss ``L_s`` (paper's LDPET / FDPET baselines,
  depending on ``input_key``);
* ``"denoise"``: encoder + denoising decoder only, loss ``L_g`` (first stage of the Fake-FDPET baseline).

Multi-process: start with ``torchrun --nproc_per_node N -m PETWorkbenchApp.cli train segmentation ...``; the
process group is made from the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR...), NCCL on CUDA, gloo on
CPU. Each rank samples its own patches; gradients are averaged by DistributedDataParallel; rank 0 writes the
checkpoints. ``checkpoint_latest.pt`` is written every epoch and when a time limit stops the run; training
resumes from it. Checkpoints hold tensors and plain data only and are read with torch's weights-only loader.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from PETWorkbenchLib.allocator import reusing_freed_memory
from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.imageio import save_torch
from PETWorkbenchLib.progress import Reporter

from .augment import augment_batch, augmentation_config, build_augmentation, misalign_labels, spatial_margin
from .losses import denoising_loss, ldos_loss
from .model import build_network

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

TASKS = ("ldos", "segonly", "denoise")


def load_config(path_or_name: dict | str | Path) -> dict:
    """A config dict from a JSON file or the name of a bundled config (``ldos_cpu_demo``, ``ldos_resenc_l``)."""
    from PETWorkbenchLib.config import read_config
    return read_config(path_or_name, Path(__file__).resolve().parent / "configs")


def network_config_for_task(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    task = cfg.get("task", "ldos")
    if task not in TASKS:
        raise InputError(f"Unknown task '{task}': choose one of {', '.join(TASKS)}")
    cfg["network"]["denoise"] = task in ("ldos", "denoise")
    return cfg


def dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def _init_dist(device):
    import torch.distributed as dist
    rank, world, local = dist_info()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world


def _make_optimizer(params, ocfg):
    name = ocfg.get("name", "sgd").lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=ocfg.get("lr", 1e-2), momentum=ocfg.get("momentum", 0.99),
                               nesterov=ocfg.get("nesterov", True), weight_decay=ocfg.get("weight_decay", 3e-5))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=ocfg.get("lr", 1e-3), weight_decay=ocfg.get("weight_decay", 3e-5))
    raise InputError(f"Unknown optimizer '{name}' (sgd or adamw)")


def poly_lr(lr0: float, it: int, total: int, exponent: float = 0.9) -> float:
    return lr0 * (1 - min(it, total) / max(total, 1)) ** exponent


RESUME_KEYS = ("model", "optimizer", "iteration", "sampler_rng", "torch_rng")


def read_checkpoint(path: str | Path, keys: Sequence[str] = RESUME_KEYS,
                    map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint written by :func:`train` (:func:`PETWorkbenchLib.models.read_torch_file`: tensors and plain
    data only; anything else raises ModelError naming the file and nothing in it is run)."""
    from PETWorkbenchLib.models import read_torch_file
    return read_torch_file(path, keys, "training checkpoint", map_location)


def start_from(model: torch.nn.Module, init: str | Path, cfg: dict, log: Callable[[str], None] = print) -> None:
    """Load the weights of model file ``init`` into ``model`` (a later training stage); refused (ModelError) when
    they were made with another network configuration than ``cfg["network"]``."""
    from PETWorkbenchLib.errors import ModelError
    from PETWorkbenchLib.models import load_checkpoint
    src = load_checkpoint(init)
    if src.get("config", {}).get("network") != cfg.get("network"):
        raise ModelError(f"weights {init} were made with another network config")
    model.load_state_dict(src["state_dict"])
    log(f"starting from the weights of {init}")


def agreed_stop(stop: bool, world: int) -> bool:
    """True on every rank when any rank asks to stop (a time limit), so all stop at the same iteration."""
    if world <= 1:
        return bool(stop)
    import torch.distributed as dist
    flag = torch.tensor([1.0 if stop else 0.0])
    dist.all_reduce(flag)
    return flag.item() > 0


def resume_training(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    rng: np.random.Generator, rank: int) -> tuple[int, list, float]:
    """Restore a run from its ``checkpoint_latest.pt`` (weights, optimiser, this rank's sampler and torch random
    states); returns (iteration, history, seconds trained so far)."""
    state = read_checkpoint(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if rank < len(state["sampler_rng"]):
        rng.bit_generator.state = state["sampler_rng"][rank]
    torch.set_rng_state(state["torch_rng"])
    return int(state["iteration"]), state.get("history", []), float(state.get("seconds_total", 0.0))


def save_training_state(path: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer, iteration: int,
                        history: list, rng: np.random.Generator, seconds_total: float, cfg: dict, rank: int,
                        world: int) -> None:
    """Write ``checkpoint_latest.pt`` (rank 0) with every rank's sampler state; called by every rank at the same
    iteration."""
    rngs = [_rng_state(rng)]
    if world > 1:
        import torch.distributed as dist
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state(rng))
    if rank == 0:
        save_torch({"model": model.state_dict(), "optimizer": opt.state_dict(), "iteration": int(iteration),
                    "history": history, "sampler_rng": rngs, "seconds_total": float(seconds_total),
                    "torch_rng": torch.get_rng_state(), "config": cfg}, path)


def save_trained_model(path: str | Path, model: torch.nn.Module, cfg: dict, training: dict, rank: int,
                       world: int) -> None:
    """Write the final weights file (rank 0; tensors on the CPU, ``training`` the run's summary), then wait for
    every rank."""
    if rank == 0:
        from PETWorkbenchLib.models import save_checkpoint
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint(path, cfg, state, training=training)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _rng_state(rng):
    """The state of a numpy Generator as plain Python data (arrays in it become lists)."""
    return json.loads(json.dumps(rng.bit_generator.state, default=lambda a: a.tolist()))


@reusing_freed_memory
def train(cfg: dict | str | Path, out_dir: str | Path, cases: list[dict] | None = None,
          manifest: str | Path | None = None, resume: bool = True, max_minutes: float | None = None,
          device: str | torch.device = "auto", threads: int | None = None,
          progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
          log: Callable[[str], None] = print,
          cache_dir: str | Path | None = None, init: str | Path | None = None) -> dict:
    """Train a model; returns a summary dict. ``cases`` (list of dicts from :mod:`.data`) or ``manifest``
    (volumes resampled once and cached as .npz in ``cache_dir``, default ``<out_dir>/cache``). ``init``: a model
    file whose weights the network starts from when there is no checkpoint to resume (a later training stage,
    fresh optimiser and learning-rate schedule)."""
    from PETWorkbenchLib.device import torch_device
    cfg = network_config_for_task(load_config(cfg))
    task = cfg["task"]
    rep = Reporter(progress, cancel)
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch_device(device)
    rank, world = _init_dist(dev)
    if dev.type == "cuda" and world > 1:
        dev = torch.device(f"cuda:{dist_info()[2]}")
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    if cases is None:
        if manifest is None:
            raise InputError("train() needs cases or a manifest")
        from .data import load_case, read_manifest, select
        rows = select(read_manifest(manifest), split=cfg.get("train_split", "train"), tracers=cfg.get("tracers"))
        if not rows:
            raise InputError(f"No training cases with split '{cfg.get('train_split', 'train')}' in {manifest}")
        cases = [load_case(r, cfg, cache_dir or (out_dir / "cache")) for r in rows]
    from .data import PatchSampler
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)  # same initial weights on every rank
    sampler = PatchSampler(cases, cfg["patch_size"], cfg.get("foreground_oversample", 0.33), seed + 1000 * rank)
    spacing = cases[0]["spacing"]

    model = build_network(cfg).to(dev)
    opt = _make_optimizer(model.parameters(), cfg.get("optimizer", {}))
    ipe = int(cfg.get("iterations_per_epoch", 250))
    epochs = int(cfg.get("epochs", 500))
    total = ipe * epochs
    start_it, history, resumed_seconds = 0, [], 0.0
    ck = out_dir / "checkpoint_latest.pt"
    if resume and ck.is_file():
        start_it, history, resumed_seconds = resume_training(ck, model, opt, sampler.rng, rank)
        log(f"resumed from {ck} at iteration {start_it}")
    elif init is not None:
        start_from(model, init, cfg, log)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                  find_unused_parameters=(task == "denoise"))
    heads = {"ldos": ("seg", "den"), "segonly": ("seg",), "denoise": ("den",)}[task]
    aug = augmentation_config(cfg.get("augmentation"))
    margin = spatial_margin(cfg["patch_size"], aug)
    transform = None
    if aug:
        intensity_std = float(np.std(np.concatenate([c["x"].ravel()[::97] for c in cases])))
        transform = build_augmentation(aug, cfg["patch_size"], intensity_std)  # same draws for every task
    mis = cfg.get("misalignment", {})
    lr0 = cfg.get("optimizer", {}).get("lr", 1e-2)
    bs = int(cfg.get("batch_size", 2))
    t0 = time.time()
    elapsed_before = resumed_seconds
    it = start_it
    stopped = "finished"
    run_loss = []

    def save_latest():  # called by every rank at the same iteration
        save_training_state(ck, model, opt, it, history, sampler.rng, elapsed_before + time.time() - t0, cfg, rank,
                            world)

    net.train()
    while it < total:
        epoch = it // ipe
        for g in opt.param_groups:
            g["lr"] = poly_lr(lr0, it, total)
        x, y, lab = sampler.sample(bs, margin)
        if transform is not None:  # per-sample seeds from (seed, rank, iteration): resumed runs draw the same
            seeds = [(seed * 1_000_003 + rank * 7_919 + it) * 16 + b for b in range(bs)]
            x, y, lab = augment_batch(transform, x, y, lab, seeds)
        x, y, lab = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev), torch.from_numpy(lab).to(dev)
        if task != "denoise" and mis.get("p", 0) > 0:
            lab = misalign_labels(lab, spacing, p=mis["p"], max_shift_mm=mis.get("max_shift_mm", 6.0),
                                  max_deform_mm=mis.get("max_deform_mm", 4.0),
                                  control_points=mis.get("control_points", 4))
        out = net(x, heads=heads)
        if task == "denoise":
            loss = denoising_loss(out["den"], y)
            parts = {"L_g": float(loss.detach()), "total": float(loss.detach())}
        else:
            # phi(E) counts the epochs of earlier stages too (``phi_epoch_offset``), so a stage started from
            # earlier weights continues the paper's decay instead of restarting it
            loss, parts = ldos_loss(out, lab, y if task == "ldos" else None,
                                    epoch=epoch + int(cfg.get("phi_epoch_offset", 0)),
                                    ell=cfg.get("phi_ell", 0.002), lam=cfg.get("lambda", 1.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
        opt.step()
        it += 1
        run_loss.append(parts)
        if it % ipe == 0 or it == total:
            mean = {k: float(np.mean([p[k] for p in run_loss if k in p])) for k in run_loss[-1]}
            history.append({"epoch": epoch, "iteration": it, "seconds_total": elapsed_before + time.time() - t0,
                            **mean})
            run_loss = []
            if rank == 0:
                log(f"epoch {epoch} it {it}/{total} " + " ".join(f"{k}={v:.4f}" for k, v in mean.items()))
            save_latest()
        rep(it / total, f"{task} iteration {it}/{total}")
        stop = agreed_stop(max_minutes is not None and (time.time() - t0) > 60.0 * max_minutes, world)
        if stop and it < total:
            stopped = "time_limit"
            save_latest()
            break
    model_path = out_dir / "model.pt"
    save_trained_model(model_path, model, cfg, {
        "iterations": it, "total_iterations": total, "stopped": stopped, "history": history[-5:],
        "seconds_total": round(elapsed_before + time.time() - t0, 1), "n_cases": len(cases),
        "cases": [c.get("case_id") for c in cases][:200], "world_size": world,
        "torch_threads": torch.get_num_threads(), "init": str(init) if init else None,
        "augmentation": cfg.get("augmentation")}, rank, world)
    return {"task": task, "iterations": it, "total_iterations": total, "stopped": stopped,
            "seconds": time.time() - t0, "model": str(model_path), "world_size": world, "rank": rank,
            "last": history[-1] if history else None}
