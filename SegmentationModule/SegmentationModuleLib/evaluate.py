"""Evaluation of a segmentation model on a data set's manifest: per-case and aggregate Dice, IoU, HD95, ASD."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PETWorkbenchLib.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    import torch


def evaluate_manifest(model: str | Path | dict, manifest: str | Path, split: str | Sequence[str] = "test",
                      input_key: str | None = None, denoiser: str | Path | dict | None = None,
                      device: str | torch.device = "auto", progress: Callable[[float, str], None] | None = None,
                      tracer: str | Sequence[str] | None = None, tta: bool | None = None) -> dict:
    """Segment every case of ``split`` and score it against its labels. Returns per-case and aggregate metrics.
    ``tta``: mirror test-time augmentation (None: the model's default, on; False: off)."""
    import time
    import SimpleITK as sitk
    from PETWorkbenchLib.progress import Reporter
    from .data import case_path, read_manifest, select
    from PETWorkbenchLib.imageio import read_image
    from .infer import load_model, segment, segment_fake_fdpet
    from .metrics import aggregate, evaluate
    from .organs import organ_specs
    rep = Reporter(progress)
    rows = select(read_manifest(manifest), split=split, tracers=tracer)
    if not rows:
        raise InputError(f"No cases with split '{split}' in {manifest}")
    _, cfg = load_model(model)
    key = input_key or cfg.get("input_key", "low_dose_drf20")
    specs = organ_specs()
    per_case, times = [], []
    for i, r in enumerate(rows):
        sub = rep.sub(i / len(rows), (i + 1) / len(rows))
        pet = read_image(case_path(r, key), f"case {r['case_id']} PET", pixel_type=sitk.sitkFloat32)
        ref = read_image(case_path(r, "labels"), f"case {r['case_id']} labels", pixel_type=sitk.sitkUInt8)
        t = time.time()
        if denoiser:
            pred, _ = segment_fake_fdpet(pet, denoiser, model, device=device, progress=sub, allow_empty=True,
                                         tta=tta)
        else:
            pred, _ = segment(pet, model, device=device, progress=sub, allow_empty=True, tta=tta)
        times.append(time.time() - t)
        res = evaluate(pred, ref, specs)
        res["case_id"] = r["case_id"]
        per_case.append(res)
    agg = aggregate(per_case)
    agg.update(cases=[c["case_id"] for c in per_case], input_key=key, split=split,
               seconds_per_case=sum(times) / len(times), per_case=per_case)
    return agg
