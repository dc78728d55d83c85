"""Evaluation of a segmentation model on a data set's manifest: per-case and aggregate Dice, IoU, HD95, ASD."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PETWorkbenchLib.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    import SimpleITK as sitk
    import torch


def evaluate_manifest(model: str | Path | dict, manifest: str | Path, split: str | Sequence[str] = "test",
                      input_key: str | None = None, denoiser: str | Path | dict | None = None,
                      device: str | torch.device = "auto", progress: Callable[[float, str], None] | None = None,
                      tracer: str | Sequence[str] | None = None, tta: bool | None = None,
                      postprocess: bool = True) -> dict:
    """Segment every case of ``split`` and score it against its labels. Returns per-case and aggregate metrics.
    ``tta``: mirror test-time augmentation (None: the model's default; False: off). ``postprocess``: the model's
    post-processing (``segment``'s; False: the network's label maps as they are)."""
    import time
    from PETWorkbenchLib.progress import Reporter
    from .infer import segment, segment_fake_fdpet
    from .metrics import aggregate, evaluate
    from .organs import organ_specs
    rep = Reporter(progress)
    rows, key = _labelled_cases(model, manifest, split, input_key, tracer)
    specs = organ_specs()
    per_case, times = [], []
    for i, r in enumerate(rows):
        sub = rep.sub(i / len(rows), (i + 1) / len(rows))
        pet, ref = _read_case(r, key)
        t = time.time()
        if denoiser:
            pred, _ = segment_fake_fdpet(pet, denoiser, model, device=device, progress=sub, allow_empty=True,
                                         tta=tta, postprocess=postprocess)
        else:
            pred, _ = segment(pet, model, device=device, progress=sub, allow_empty=True, tta=tta,
                              postprocess=postprocess)
        times.append(time.time() - t)
        res = evaluate(pred, ref, specs)
        res["case_id"] = r["case_id"]
        per_case.append(res)
    agg = aggregate(per_case)
    agg.update(cases=[c["case_id"] for c in per_case], input_key=key, split=split,
               seconds_per_case=sum(times) / len(times), per_case=per_case)
    return agg


def _labelled_cases(model: str | Path | dict, manifest: str | Path, split: str | Sequence[str],
                    input_key: str | None, tracer: str | Sequence[str] | None) -> tuple[list[dict], str]:
    """(manifest rows of ``split``, the input key: ``input_key`` or the model config's); refuses an empty split."""
    from .data import read_manifest, select
    from .infer import load_model
    rows = select(read_manifest(manifest), split=split, tracers=tracer)
    if not rows:
        raise InputError(f"No cases with split '{split}' in {manifest}")
    _, cfg = load_model(model)
    return rows, input_key or cfg.get("input_key", "low_dose_drf20")


def _read_case(row: dict, key: str) -> tuple[sitk.Image, sitk.Image]:
    """(PET of input ``key``, reference labels) of a manifest row."""
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import read_image
    from .data import case_path
    pet = read_image(case_path(row, key), f"case {row['case_id']} PET", pixel_type=sitk.sitkFloat32)
    ref = read_image(case_path(row, "labels"), f"case {row['case_id']} labels", pixel_type=sitk.sitkUInt8)
    return pet, ref


def determine_postprocessing_manifest(model: str | Path | dict, manifest: str | Path, split: str = "train",
                                      input_key: str | None = None, device: str | torch.device = "auto",
                                      progress: Callable[[float, str], None] | None = None,
                                      tracer: str | Sequence[str] | None = None) -> tuple[dict, dict]:
    """nnU-Net's post-processing decision (:func:`.postprocess.determine_postprocessing`) for ``model`` from the
    cases of ``split`` (not the cases it will be tested on): each case is segmented without post-processing and
    compared with its labels. Returns (decision, report)."""
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import match_grid
    from PETWorkbenchLib.progress import Reporter
    from .infer import segment
    from .organs import organ_specs
    from .postprocess import determine_postprocessing
    rep = Reporter(progress)
    rows, key = _labelled_cases(model, manifest, split, input_key, tracer)
    preds, refs = [], []
    for i, r in enumerate(rows):
        pet, ref = _read_case(r, key)
        pred, _ = segment(pet, model, device=device, progress=rep.sub(i / len(rows), (i + 1) / len(rows)),
                          allow_empty=True, postprocess=False)
        pred = match_grid(pred, ref, "the prediction", "the reference labels")
        preds.append(sitk.GetArrayFromImage(pred))
        refs.append(sitk.GetArrayFromImage(ref))
    decision, report = determine_postprocessing(preds, refs, [s["value"] for s in organ_specs()])
    report.update(split=split, input_key=key, cases=[r["case_id"] for r in rows])
    return decision, report


def with_postprocessing(model: str | Path | dict, decision: dict, out: str | Path,
                        inputs: Sequence[str | Path] = (), overwrite: bool = False) -> Path:
    """Write ``model``'s weights with ``decision`` as its ``inference.postprocessing`` to ``out`` (a new file;
    never one of ``inputs``), atomically. Returns the path."""
    from pathlib import Path as _Path
    from PETWorkbenchLib.imageio import check_output
    from PETWorkbenchLib.models import save_checkpoint
    from .infer import read_checkpoint
    from .postprocess import check_postprocessing
    decision = check_postprocessing(decision)
    check_output(out, list(inputs), overwrite, "model weights")
    ckpt = read_checkpoint(model)
    cfg = dict(ckpt["config"])
    cfg["inference"] = dict(cfg.get("inference", {}), postprocessing=decision)
    extra = {k: v for k, v in ckpt.items() if k not in ("config", "state_dict")}
    save_checkpoint(out, cfg, ckpt["state_dict"], **extra)
    return _Path(out)
