"""PE-MED training with simulated clicks (RITM's iterative protocol), checkpoints, resume and torchrun DDP.

Samples (2D axial crops, :class:`.clicks.SliceCrop`) come from the simulated PET set: lesions (``lesions`` label
map) and organs (``labels``) at every dose the manifest holds (full dose and the low-dose levels), so the model
sees the same object at several noise levels. Two kinds of sample:

* **click**: the first positive click inside the object (at least 30 % of the object's largest inner distance
  from its boundary), with probability ``p_extra`` up to two more positive clicks and up to two negative clicks in
  a band around the object; previous mask empty;
* **propagation** (probability ``p_propagation``): the previous mask is the object on a neighbouring slice (1 or 2
  slices away) and the only click is a positive one at that mask's deepest point; the target may be empty (the
  slice past the end of the object): this is how :mod:`.lesion` carries a segment from the clicked slice to the
  slices around it, so the model learns where to stop.

Then 0 - ``max_iterations`` iterations without gradient (RITM): predict, feed the thresholded prediction back as
the previous mask and the logits as TSIP's previous output, and add the next click at the larger error region
(:func:`.clicks.next_click`); with probability ``p_self_loop`` an iteration adds no click (the self-loop warm
start's second pass). The loss (normalised focal loss) is back-propagated on the last iteration only.

Optimiser as the paper: Adam, the learning rate times ``lr_gamma`` (0.6) every ``lr_step`` fraction of the run
(the paper: every 20 of 100 epochs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage

from PETWorkbenchLib.allocator import reusing_freed_memory
from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.progress import Reporter

from .clicks import SliceCrop, deepest_point, extent_mm, next_click
from .pemed import (build_pemed, crop_geometry, disk_maps, normalise_suv, normalized_focal_loss,
                    zoom_pixel_mm)
from .train import (_init_dist, agreed_stop, dist_info, resume_training, save_trained_model, save_training_state,
                    start_from)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DOSE_KEYS = ("full_dose", "low_dose", "low_dose_drf20")


def load_config(path_or_name: dict | str | Path) -> dict:
    from PETWorkbenchLib.config import read_config
    return read_config(path_or_name, Path(__file__).resolve().parent / "configs")


def load_cases(manifest: str | Path, split: str = "train", doses: Sequence[str] = DOSE_KEYS,
               limit: int | None = None) -> list[dict]:
    """Volumes of the manifest rows of ``split`` that have lesions or organ labels, as numpy (z, y, x) arrays."""
    import SimpleITK as sitk

    from .data import read_manifest, select
    manifest = Path(manifest)
    rows = [r for r in select(read_manifest(manifest), split=split) if r.get("labels") or r.get("lesions")]
    if limit:
        rows = rows[:limit]
    cases = []
    for r in rows:
        def read(key, r=r):
            img = sitk.ReadImage(str(manifest.parent / r[key]))
            return img, sitk.GetArrayFromImage(img)
        images = {}
        spacing = None
        for k in doses:
            if r.get(k):
                img, arr = read(k)
                images[k] = arr.astype(np.float32)
                spacing = img.GetSpacing()[::-1]
        labels = read("labels")[1].astype(np.uint8) if r.get("labels") else None
        lesions = read("lesions")[1].astype(np.uint8) if r.get("lesions") else None
        cases.append(dict(case_id=r.get("case_id"), images=images, labels=labels, lesions=lesions,
                          spacing=tuple(float(s) for s in spacing)))
    if not cases:
        raise InputError(f"No cases of split '{split}' with lesion or organ labels in {manifest}")
    return cases


def _objects(case, min_organ_voxels=50):
    objs = []
    if case["lesions"] is not None:
        objs += [("lesion", int(v)) for v in np.unique(case["lesions"]) if v > 0]
    if case["labels"] is not None:
        vals, counts = np.unique(case["labels"], return_counts=True)
        objs += [("organ", int(v)) for v, c in zip(vals, counts) if v > 0 and c >= min_organ_voxels]
    return objs


class ClickSampler:
    """Draws (image crop, initial clicks, previous mask, target) training samples; seeded, resumable."""

    def __init__(self, cases: list[dict], cfg: dict, seed: int):
        self.cases, self.cfg = cases, cfg
        self.rng = np.random.default_rng(seed)
        self.objects = [_objects(c) for c in cases]
        self.size, self.pixel_mm, self.radius = crop_geometry(cfg)
        self.min_pixel_mm = float(cfg["input"].get("min_pixel_mm", self.pixel_mm))
        self.zoom = self.min_pixel_mm < self.pixel_mm
        t = cfg.get("training", {})
        self.p_lesion = float(t.get("p_lesion", 0.6))
        self.p_prop = float(t.get("p_propagation", 0.3))
        self.p_extra = float(t.get("p_extra", 0.3))

    def _mask(self, case, obj):
        kind, v = obj
        return (case["lesions"] if kind == "lesion" else case["labels"]) == v

    def sample_one(self):
        rng = self.rng
        while True:
            ci = int(rng.integers(len(self.cases)))
            case, objs = self.cases[ci], self.objects[ci]
            lesions = [o for o in objs if o[0] == "lesion"]
            organs = [o for o in objs if o[0] == "organ"]
            pool = lesions if (lesions and (rng.random() < self.p_lesion or not organs)) else organs
            if pool:
                break
        obj = pool[int(rng.integers(len(pool)))]
        dose = list(case["images"])[int(rng.integers(len(case["images"])))]
        vol = case["images"][dose]
        mask3 = self._mask(case, obj)
        zs = np.flatnonzero(mask3.any(axis=(1, 2)))
        sp = case["spacing"]
        propagate = rng.random() < self.p_prop and len(zs) >= 1
        if propagate:
            step = int(rng.choice([-2, -1, 1, 2], p=[0.15, 0.35, 0.35, 0.15]))
            # the neighbour (the previous mask) holds the object; the target slice may be past its end
            zn = int(rng.choice(zs))
            z = int(np.clip(zn + step, 0, vol.shape[0] - 1))
            prev_full = mask3[zn]
            anchor = deepest_point(prev_full, sp[1:])
        else:
            z = int(rng.choice(zs))
            anchor = None
        target_full = mask3[z]
        ref = prev_full if propagate else target_full
        if anchor is None:
            d = ndimage.distance_transform_edt(np.pad(ref, 1))[1:-1, 1:-1]
            cand = np.argwhere(d >= max(1.0, 0.3 * d.max()))
            anchor = tuple(cand[int(rng.integers(len(cand)))])
        pixel_mm = self.pixel_mm
        if self.zoom:  # Zoom-In: the crop pixel chosen from the guiding mask's extent as at inference, jittered
            if rng.random() < 0.25:
                pixel_mm = float(np.exp(rng.uniform(np.log(self.min_pixel_mm), np.log(self.pixel_mm))))
            else:
                pixel_mm = zoom_pixel_mm(self.cfg, extent_mm(ref, sp[1:]) * float(np.exp(rng.uniform(-0.3, 0.3))))
        jitter = rng.uniform(-0.25, 0.25, 2) * self.size * pixel_mm / np.asarray(sp[1:])
        crop = SliceCrop(np.asarray(anchor, float) + jitter, sp[1:], self.size, pixel_mm)
        image = normalise_suv(crop.sample(vol[z]))
        target = crop.sample(target_full.astype(np.float32), order=0)
        clicks = [(*crop.to_crop(anchor), True)]
        prev = np.zeros_like(target)
        if propagate:
            prev = crop.sample(prev_full.astype(np.float32), order=0)
        elif rng.random() < self.p_extra:
            inside = np.argwhere(target > 0.5)
            for _ in range(int(rng.integers(0, 3)) if len(inside) else 0):
                r, c = inside[int(rng.integers(len(inside)))]
                clicks.append((float(r), float(c), True))
            band = ndimage.binary_dilation(target > 0.5, iterations=5) & ~ndimage.binary_dilation(target > 0.5)
            outside = np.argwhere(band)
            for _ in range(int(rng.integers(0, 3)) if len(outside) else 0):
                r, c = outside[int(rng.integers(len(outside)))]
                clicks.append((float(r), float(c), False))
        return image, clicks, prev, target

    def sample(self, n):
        return [self.sample_one() for _ in range(n)]


def batch_tensors(samples: list, clicks: list, prev: list, radius: float, dev: torch.device
                  ) -> tuple[torch.Tensor, ...]:
    """(image, positive disks, negative disks, previous mask) tensors (B, 1, H, W) of a batch."""
    img = torch.from_numpy(np.stack([s[0] for s in samples])[:, None]).to(dev)
    maps = torch.from_numpy(np.stack([disk_maps(s[0].shape, c, radius) for s, c in zip(samples, clicks)])).to(dev)
    prev_t = torch.from_numpy(np.stack(prev)[:, None].astype(np.float32)).to(dev)
    return img, maps[:, :1], maps[:, 1:], prev_t


def lr_at(lr0: float, it: int, total: int, gamma: float = 0.6, step: float = 0.2) -> float:
    """The paper's step schedule: lr0 * gamma ** floor(progress / step)."""
    return lr0 * gamma ** int((it / max(total, 1)) // step)


@reusing_freed_memory
def train(cfg: dict | str | Path, out_dir: str | Path, manifest: str | Path | None = None,
          cases: list[dict] | None = None, resume: bool = True, max_minutes: float | None = None,
          device: str | torch.device = "auto", threads: int | None = None,
          progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
          log: Callable[[str], None] = print, init: str | Path | None = None) -> dict:
    """Train PE-MED; returns a summary. ``checkpoint_latest.pt`` every ``checkpoint_every`` iterations and at a time
    limit (resumed from automatically); ``model.pt`` at the end. ``init``: a model file whose weights the network
    starts from when there is no checkpoint to resume (a later stage: fresh optimiser and schedule)."""
    from PETWorkbenchLib.device import torch_device
    cfg = load_config(cfg)
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
    t = cfg.get("training", {})
    if cases is None:
        if manifest is None:
            raise InputError("PE-MED training needs a manifest or cases")
        cases = load_cases(manifest, t.get("split", "train"), limit=t.get("max_cases"))
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    sampler = ClickSampler(cases, cfg, seed + 1000 * rank)
    model = build_pemed(cfg).to(dev)
    lr0 = float(t.get("lr", 5e-3))
    opt = torch.optim.Adam(model.parameters(), lr=lr0)
    total = int(t.get("iterations", 1000))
    bs = int(t.get("batch_size", 16))
    max_iters = int(t.get("max_iterations", 3))
    p_self = float(t.get("p_self_loop", 0.25))
    every = int(t.get("checkpoint_every", 100))
    radius = sampler.radius
    start_it, history, before = 0, [], 0.0
    ck = out_dir / "checkpoint_latest.pt"
    if resume and ck.is_file():
        start_it, history, before = resume_training(ck, model, opt, sampler.rng, rank)
        log(f"resumed from {ck} at iteration {start_it}")
    elif init is not None:
        start_from(model, init, cfg, log)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    t0 = time.time()
    it, stopped, run = start_it, "finished", []

    def save_latest():  # called by every rank at the same iteration
        save_training_state(ck, model, opt, it, history, sampler.rng, before + time.time() - t0, cfg, rank, world)

    while it < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(lr0, it, total, float(t.get("lr_gamma", 0.6)), float(t.get("lr_step", 0.2)))
        samples = sampler.sample(bs)
        clicks = [list(s[1]) for s in samples]
        prev = [s[2] for s in samples]
        targets = [s[3] > 0.5 for s in samples]
        prev_out = None
        n_iter = int(sampler.rng.integers(0, max_iters + 1))
        model.eval()
        with torch.no_grad():
            for _ in range(n_iter):
                img, pos, neg, prev_t = batch_tensors(samples, clicks, prev, radius, dev)
                logits = model(img, pos, neg, prev_t, prev_out)
                prev_out = logits
                pred = (logits[:, 0] > 0).cpu().numpy()
                prev = [p.astype(np.float32) for p in pred]
                for b in range(bs):
                    if sampler.rng.random() < p_self:
                        continue
                    nc = next_click(pred[b], targets[b])
                    if nc is not None:
                        clicks[b].append((float(nc[0][0]), float(nc[0][1]), nc[1]))
        model.train()
        img, pos, neg, prev_t = batch_tensors(samples, clicks, prev, radius, dev)
        target = torch.from_numpy(np.stack(targets)[:, None].astype(np.float32)).to(dev)
        logits = net(img, pos, neg, prev_t, prev_out)
        loss = normalized_focal_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it += 1
        with torch.no_grad():
            p, g = logits > 0, target > 0.5
            inter = (p & g).flatten(1).sum(1).float()
            denom = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).float()
            dice = torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.ones_like(denom)).mean()
        run.append((float(loss.detach()), float(dice)))
        if it % every == 0 or it == total:
            history.append({"iteration": it, "loss": float(np.mean([r[0] for r in run])),
                            "dice": float(np.mean([r[1] for r in run])),
                            "seconds_total": before + time.time() - t0})
            run = []
            if rank == 0:
                log(f"it {it}/{total} loss={history[-1]['loss']:.4f} dice={history[-1]['dice']:.3f} "
                    f"lr={opt.param_groups[0]['lr']:.2e}")
            save_latest()
        rep(it / total, f"PE-MED iteration {it}/{total}")
        stop = agreed_stop(max_minutes is not None and (time.time() - t0) > 60.0 * max_minutes, world)
        if stop and it < total:
            stopped = "time_limit"
            save_latest()
            break
    model_path = out_dir / "model.pt"
    save_trained_model(model_path, model, cfg, {
        "iterations": it, "total_iterations": total, "stopped": stopped, "history": history[-5:],
        "seconds_total": round(before + time.time() - t0, 1), "n_cases": len(cases),
        "cases": [c.get("case_id") for c in cases][:200], "world_size": world,
        "torch_threads": torch.get_num_threads(), "init": str(Path(init).name) if init else None}, rank, world)
    return {"iterations": it, "total_iterations": total, "stopped": stopped, "seconds": time.time() - t0,
            "model": str(model_path), "world_size": world, "rank": rank,
            "last": json.loads(json.dumps(history[-1])) if history else None}
