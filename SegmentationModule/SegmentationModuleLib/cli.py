"""Command-line commands of the segmentation family.

* ``petworkbench segment --input PET.nii.gz --model ID|file.pt --output labels.nii.gz [--organs liver,spleen]
  [--probabilities probs.nii.gz] [--uptake uptake.json] [--device auto]``
* ``petworkbench train segmentation --config ldos_cpu_demo --manifest .../manifest.csv --out DIR
  [--task ldos|segonly|denoise] [--input-key low_dose_drf20|full_dose] [--max-minutes M] [--threads N]``
  (use ``torchrun --nproc_per_node N -m PETWorkbenchApp.cli train segmentation ...`` for DDP)
* ``petworkbench evaluate segmentation --pred P.nii.gz --ref R.nii.gz`` or
  ``--model ID|file.pt --manifest manifest.csv [--split test] [--input-key low_dose_drf20]
  [--denoiser ID|file.pt (Fake-FDPET)] [--output metrics.json]``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.requests import option
from PETWorkbenchLib.units import PETUnits

if TYPE_CHECKING:
    import argparse


@dataclass
class SegmentRequest(PETUnits):
    """``petworkbench segment``: what the command line and the Segmentation module's logic both build."""

    input: str = option(required=True, help="PET volume (NIfTI/NRRD), in SUV or Bq/ml (see --units), or a folder "
                        "holding a PET DICOM series (SUV from its tags)")
    output: str = option(required=True, help="output label map")
    model: str = option(None, help="model id or checkpoint file (default: the segmentation model marked default "
                        "in Models.json)")
    organs: str = option("", help="comma-separated organ names or values (default: all 18)")
    probabilities: str = option("", help="also write class probabilities here")
    uptake: str = option("", help="write the organ uptake table (JSON) here")
    no_tta: bool = option(flag=True, help="no mirror test-time augmentation even if the model's config asks for "
                          "it (nnU-Net's mirroring: 8 passes per patch)")
    device: str = option("auto", help="auto, cpu, cuda[:N] or mps")


def _group(subparsers, name):
    try:
        from PETWorkbenchLib.commands import group
        return group(subparsers, name)
    except ImportError:  # pragma: no cover
        return subparsers


def _read(path, what, pixel_type=None):
    from PETWorkbenchLib.imageio import read_image
    return read_image(path, what, pixel_type=pixel_type)


def _organs_arg(s):
    return None if not s else [o.strip() for o in s.split(",") if o.strip()]


def _cmd_segment(args, rep):
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import check_output, write_image, write_json
    from .infer import segment
    from .organs import organ_specs
    from .uptake import organ_uptake
    from PETWorkbenchLib.requests import from_args
    overwrite = args.overwrite
    req = from_args(SegmentRequest, args)
    inputs = [req.input]
    outputs = [(req.output, "label map"), (req.probabilities, "probabilities file"), (req.uptake, "uptake table")]
    for path, what in outputs:
        if path:
            check_output(path, inputs, overwrite, what)
    named = [p for p, _ in outputs if p]
    if len({str(Path(p).resolve()) for p in named}) != len(named):
        raise InputError("--output, --probabilities and --uptake must be different files")
    from PETWorkbenchLib.dicom import read_pet

    from .infer import input_voxel_limit
    pet, _, _ = read_pet(req.input, "PET", req, voxel_limit=input_voxel_limit)
    from PETWorkbenchLib.models import default_model
    label, probs = segment(pet, req.model or default_model("segmentation"), organs=_organs_arg(req.organs),
                           device=req.device, progress=rep.sub(0.0, 0.95),
                           return_probabilities=bool(req.probabilities), tta=False if req.no_tta else None)
    rows = organ_uptake(sitk.Cast(pet, sitk.sitkFloat64), label, organ_specs())
    write_image(label, req.output, inputs=inputs, overwrite=overwrite)
    if probs is not None:
        write_image(probs, req.probabilities, inputs=inputs, overwrite=overwrite)
    if req.uptake:
        write_json(rows, req.uptake, inputs=inputs, overwrite=overwrite)
    return {"output": str(req.output), "organs_found": [r["name"] for r in rows], "uptake": rows,
            "uptake_units": "SUV"}


def _cmd_train(args, rep):
    from .train import load_config, train
    cfg = load_config(args.config)
    if args.task:
        cfg["task"] = args.task
    if args.input_key:
        cfg["input_key"] = args.input_key
    if args.epochs:
        cfg["epochs"] = args.epochs
    if args.augmentation:
        cfg["augmentation"] = args.augmentation
    if args.lr:
        cfg.setdefault("optimizer", {})["lr"] = args.lr
    if args.phi_epoch_offset:
        cfg["phi_epoch_offset"] = args.phi_epoch_offset
    return train(cfg, args.out, manifest=args.manifest, resume=not args.no_resume, max_minutes=args.max_minutes,
                 device=args.device, threads=args.threads, progress=rep, cache_dir=args.cache_dir, init=args.init)


def _cmd_evaluate(args, rep):
    from .metrics import evaluate
    from .organs import organ_specs
    if args.pred or args.ref:
        if not (args.pred and args.ref):
            raise InputError("--pred and --ref go together")
        res = evaluate(_read(args.pred, "prediction"), _read(args.ref, "reference"), organ_specs())
    else:
        if not (args.model and args.manifest):
            raise InputError("give --pred/--ref, or --model and --manifest")
        from .evaluate import evaluate_manifest
        res = evaluate_manifest(args.model, args.manifest, args.split, args.input_key, args.denoiser, args.device,
                                rep)
    if args.output:
        from PETWorkbenchLib.imageio import write_json
        write_json(res, args.output, inputs=[args.pred, args.ref], overwrite=args.overwrite)
    return {"mean": res["mean"], "organs": {k: {m: v for m, v in o.items() if m in ("status", "dice", "hd95")}
                                            for k, o in res["organs"].items()}}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from PETWorkbenchLib.requests import add_arguments
    p = subparsers.add_parser("segment", help="LDOS organ segmentation of a PET volume")
    add_arguments(p, SegmentRequest)
    p.set_defaults(func=_cmd_segment)

    t = _group(subparsers, "train").add_parser("segmentation", help="train LDOS or a baseline")
    t.add_argument("--config", default="ldos_cpu_demo", help="config name (configs/) or JSON file")
    t.add_argument("--manifest", required=True)
    t.add_argument("--out", required=True, help="output folder (checkpoints, model.pt)")
    t.add_argument("--task", choices=("ldos", "segonly", "denoise"), default=None)
    t.add_argument("--input-key", default=None, help="manifest column of the network input")
    t.add_argument("--epochs", type=int, default=None)
    t.add_argument("--max-minutes", type=float, default=None)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--no-resume", action="store_true")
    t.add_argument("--init", default=None,
                   help="start from these weights (a model file) when there is no checkpoint to resume")
    t.add_argument("--lr", type=float, default=None, help="initial learning rate of the poly schedule")
    t.add_argument("--phi-epoch-offset", type=int, default=None,
                   help="epochs of earlier stages (a stage started with --init continues LDOS's phi(E) decay)")
    t.add_argument("--augmentation", choices=("nnunet", "none"), default=None,
                   help="training augmentation (default: the config's; nnU-Net's default pipeline)")
    t.add_argument("--cache-dir", default=None, help="where resampled volumes are cached (default OUT/cache)")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_cmd_train)

    e = _group(subparsers, "evaluate").add_parser("segmentation", help="Dice, IoU, HD95, ASD per organ")
    e.add_argument("--pred", default="")
    e.add_argument("--ref", default="")
    e.add_argument("--model", default="")
    e.add_argument("--denoiser", default="", help="Fake-FDPET: denoise with this model first")
    e.add_argument("--manifest", default="")
    e.add_argument("--split", default="test")
    e.add_argument("--input-key", default=None)
    e.add_argument("--output", default="")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_evaluate)
