"""Command-line commands of the segmentation family.

* ``petworkbench segment --input PET.nii.gz --model ID|file.pt --output labels.nii.gz [--organs liver,spleen]
  [--probabilities probs.nii.gz] [--uptake uptake.json] [--device auto]``
* ``petworkbench train segmentation --config ldos_cpu_demo --manifest .../manifest.csv --out DIR
  [--task ldos|segonly|denoise] [--input-key low_dose_drf20|full_dose] [--max-minutes M] [--threads N]``
  (use ``torchrun --nproc_per_node N -m PETWorkbenchApp.cli train segmentation ...`` for DDP)
* ``petworkbench lesion --input PET.nii.gz --click=x,y,z[:+|:-] [--click=...]
  --method pemed|suv2.5|41pct|50pct|percist --output mask.nii.gz [--table lesion.json|lesion.csv]
  [--click-space lps|ras|ijk] [--liver-mask liver.nii.gz | --labels organs.nii.gz]``: replays the clicks in
  order (as the "PET lesion" Segment Editor effect) and writes the mask and the lesion measures (SUVmax,
  SUVpeak, SUVmean, MTV, TLG, liver reference; a liver mask or label map is resampled onto the PET grid)
* ``petworkbench train pemed --config pemed_cpu_demo --manifest .../manifest.csv --out DIR [--max-minutes M]``
* ``petworkbench evaluate segmentation --pred P.nii.gz --ref R.nii.gz`` or
  ``--model ID|file.pt --manifest manifest.csv [--split test] [--input-key low_dose_drf20]
  [--denoiser ID|file.pt (Fake-FDPET)] [--no-postprocess] [--output metrics.json]``
* ``petworkbench evaluate segmentation --determine-postprocessing --model ID|file.pt --manifest manifest.csv
  --split train [--output decision.json] [--write-model new.pt]``: nnU-Net's largest-component post-processing
  decided on those cases (postprocess.py); ``--write-model`` stores the decision in a copy of the weights
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


def _model_file(model):
    """The weights file of ``model`` (a file, or a registered id whose weights are here), for comparing outputs
    with it; the argument itself when neither."""
    if Path(model).is_file():
        return model
    from PETWorkbenchLib.errors import ModelError
    from PETWorkbenchLib.models import ensure
    try:
        return str(ensure(model, allow_download=False))
    except (ModelError, InputError, OSError):  # an unknown id is reported by the command itself
        return model


def _cmd_determine_postprocessing(args, rep):
    from PETWorkbenchLib.imageio import check_output, write_json
    from .evaluate import determine_postprocessing_manifest, with_postprocessing
    if not (args.model and args.manifest and args.split):
        raise InputError("--determine-postprocessing needs --model, --manifest and --split (the cases to decide on, "
                         "e.g. train; never the test cases)")
    if args.split == "test":
        raise InputError("--determine-postprocessing decides on cases the model is not tested on: give --split train "
                         "(or another split), not test")
    if args.denoiser or args.no_postprocess or args.pred or args.ref:
        raise InputError("--determine-postprocessing takes --model, --manifest, --split, --input-key, --output and "
                         "--write-model only (not --denoiser, --no-postprocess, --pred or --ref)")
    inputs = [_model_file(args.model), args.manifest]
    outputs = [(p, what) for p, what in ((args.write_model, "model weights"), (args.output, "decision report")) if p]
    for p, what in outputs:                              # refused before the long run, never after it
        check_output(p, inputs, args.overwrite, what)
    if args.write_model and args.output and Path(args.write_model).resolve() == Path(args.output).resolve():
        raise InputError("--write-model and --output must be different files")
    decision, res = determine_postprocessing_manifest(args.model, args.manifest, args.split, args.input_key,
                                                      args.device, rep)
    if args.write_model:
        with_postprocessing(args.model, decision, args.write_model, inputs, args.overwrite)
        res["written"] = args.write_model
    if args.output:
        write_json(res, args.output, inputs=inputs, overwrite=args.overwrite)
    return {"decision": decision, "steps": res["steps"]}


def _cmd_evaluate(args, rep):
    from .metrics import evaluate
    from .organs import organ_specs
    if args.determine_postprocessing:
        return _cmd_determine_postprocessing(args, rep)
    if args.write_model:
        raise InputError("--write-model goes with --determine-postprocessing")
    split = args.split or "test"
    if args.pred or args.ref:
        if not (args.pred and args.ref):
            raise InputError("--pred and --ref go together")
        if args.no_postprocess or args.model or args.denoiser:
            raise InputError("--pred/--ref score two label maps as they are: --model, --denoiser and "
                             "--no-postprocess do not apply")
        res = evaluate(_read(args.pred, "prediction"), _read(args.ref, "reference"), organ_specs())
    else:
        if not (args.model and args.manifest):
            raise InputError("give --pred/--ref, or --model and --manifest")
        from .evaluate import evaluate_manifest
        res = evaluate_manifest(args.model, args.manifest, split, args.input_key, args.denoiser, args.device,
                                rep, postprocess=not args.no_postprocess)
    if args.output:
        from PETWorkbenchLib.imageio import write_json
        write_json(res, args.output, inputs=[args.pred, args.ref], overwrite=args.overwrite)
    return {"mean": res["mean"], "organs": {k: {m: v for m, v in o.items() if m in ("status", "dice", "hd95")}
                                            for k, o in res["organs"].items()}}


def _cmd_lesion(args, rep):
    import numpy as np
    import SimpleITK as sitk

    from PETWorkbenchLib.dicom import read_pet
    from PETWorkbenchLib.imageio import check_output, write_csv, write_image, write_json

    from .lesion import (DEFAULT_MODEL, MEASURE_COLUMNS, METHOD_LABELS, LesionSession, click_to_index,
                         lesion_measures, method_name, parse_click)
    method = method_name(args.method)
    if not args.click:
        raise InputError("Give at least one --click x,y,z (a positive click on the lesion)")
    clicks = [parse_click(c) for c in args.click]
    inputs = [args.input] + [p for p in (args.liver_mask, args.labels) if p]
    check_output(args.output, inputs, args.overwrite, "lesion mask")
    if args.table:
        if Path(args.table).suffix.lower() not in (".json", ".csv"):
            raise InputError(f"--table {args.table}: the lesion table is written as .json or .csv")
        check_output(args.table, inputs, args.overwrite, "lesion table")
        if Path(args.table).resolve() == Path(args.output).resolve():
            raise InputError("--output and --table must be different files")
    pet, _, _ = read_pet(args.input, "PET", args)
    liver = None
    if args.liver_mask or args.labels:
        from PETWorkbenchLib.imageio import resample_like
        from PETWorkbenchLib.terminology import organ_specs
        path = args.liver_mask or args.labels
        ref = _read(path, "liver mask" if args.liver_mask else "organ label map")
        arr = sitk.GetArrayFromImage(resample_like(ref, pet, label=True))  # nearest neighbour onto the PET grid
        if args.liver_mask:
            liver = arr > 0
        else:
            liver = arr == next(o["value"] for o in organ_specs() if o["name"] == "liver")
        if not liver.any():
            raise InputError(f"{Path(path).name} holds no liver voxels")
    session = LesionSession(pet, method, model=args.model or DEFAULT_MODEL,
                            device=args.device, liver_mask=liver, progress=rep.sub(0.0, 0.2))
    replay = []
    for n, (xyz, positive) in enumerate(clicks):
        ijk = click_to_index(pet, xyz, args.click_space)
        session.add_click(ijk, positive)
        replay.append({"click": n + 1, "ijk": [int(round(v)) for v in ijk], "positive": positive,
                       "voxels": int(session.mask.sum()), "seconds": round(session.last_seconds, 4)})
        rep(0.2 + 0.7 * (n + 1) / len(clicks), f"click {n + 1}/{len(clicks)}")
    if not session.mask.any():
        raise InputError("The clicks leave an empty segment: nothing to write (check the clicks' coordinates and "
                         "--click-space)")
    mask = sitk.GetImageFromArray(session.mask.astype(np.uint8))
    mask.CopyInformation(pet)
    measures = lesion_measures(session.suv, session.mask, session.spacing, liver)
    row = {"lesion": 1, "method": method, "n_clicks": len(clicks), **measures}
    write_image(mask, args.output, inputs=inputs, overwrite=args.overwrite)
    if args.table:
        if Path(args.table).suffix.lower() == ".csv":
            write_csv([row], args.table, fieldnames=list(MEASURE_COLUMNS), inputs=inputs, overwrite=args.overwrite)
        else:
            write_json({"lesions": [row], "clicks": replay, "method": METHOD_LABELS[method], "units": "SUV"},
                       args.table, inputs=inputs, overwrite=args.overwrite)
    return {"output": str(args.output), "table": args.table or None, "lesion": row, "clicks": replay}


def _cmd_train_pemed(args, rep):
    from .pemed_train import load_config, train
    cfg = load_config(args.config)
    if args.iterations:
        cfg["training"]["iterations"] = args.iterations
    if args.lr:
        cfg["training"]["lr"] = args.lr
    return train(cfg, args.out, manifest=args.manifest, resume=not args.no_resume, max_minutes=args.max_minutes,
                 device=args.device, threads=args.threads, progress=rep, init=args.init)


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

    lp = subparsers.add_parser("lesion", help="interactive PET lesion segmentation from clicks, with SUV measures")
    lp.add_argument("--input", required=True, help="PET volume (NIfTI/NRRD) in SUV or Bq/ml (see --units), or a "
                    "PET DICOM series folder")
    lp.add_argument("--click", action="append", default=[], metavar="X,Y,Z[:+|:-]",
                    help="a click, repeated in the order made; ':+' adds (default), ':-' removes. Write "
                    "--click=-12,30,5 when the first number is negative")
    lp.add_argument("--click-space", choices=("lps", "ras", "ijk"), default="lps",
                    help="coordinates of the clicks: lps (mm, the file's physical space; default), ras (mm, "
                    "Slicer's) or ijk (voxel indices)")
    lp.add_argument("--method", default="pemed", help="pemed (default), suv2.5, 41pct, 50pct or percist")
    lp.add_argument("--output", required=True, help="lesion mask (uint8 label map on the PET grid)")
    lp.add_argument("--table", default="", help="lesion measures: .json (with the replayed clicks) or .csv")
    lp.add_argument("--liver-mask", default="", help="liver mask on the PET grid (PERCIST, reference region)")
    lp.add_argument("--labels", default="", help="or an organ label map (LDOS values) holding the liver")
    lp.add_argument("--model", default="", help="PE-MED model id or file (default segmentation-pemed-cpu)")
    lp.add_argument("--units", default="SUV", help="units of the PET: SUV (default) or Bq/ml")
    lp.add_argument("--weight-kg", type=float, default=None)
    lp.add_argument("--injected-dose-mbq", type=float, default=None)
    lp.add_argument("--decay-factor", type=float, default=1.0)
    lp.add_argument("--device", default="cpu")
    lp.set_defaults(func=_cmd_lesion)

    tp = _group(subparsers, "train").add_parser("pemed", help="train PE-MED with simulated clicks")
    tp.add_argument("--config", default="pemed_cpu_demo", help="config name (configs/) or JSON file")
    tp.add_argument("--manifest", required=True)
    tp.add_argument("--out", required=True)
    tp.add_argument("--iterations", type=int, default=None)
    tp.add_argument("--max-minutes", type=float, default=None)
    tp.add_argument("--threads", type=int, default=None)
    tp.add_argument("--no-resume", action="store_true")
    tp.add_argument("--init", default=None, help="start from these weights when there is no checkpoint to resume")
    tp.add_argument("--lr", type=float, default=None, help="initial learning rate of the step schedule")
    tp.add_argument("--device", default="auto")
    tp.set_defaults(func=_cmd_train_pemed)

    e = _group(subparsers, "evaluate").add_parser("segmentation", help="Dice, IoU, HD95, ASD per organ")
    e.add_argument("--pred", default="")
    e.add_argument("--ref", default="")
    e.add_argument("--model", default="")
    e.add_argument("--denoiser", default="", help="Fake-FDPET: denoise with this model first")
    e.add_argument("--manifest", default="")
    e.add_argument("--split", default=None,
                   help="manifest split to evaluate (default test); --determine-postprocessing: required, not test")
    e.add_argument("--input-key", default=None)
    e.add_argument("--output", default="")
    e.add_argument("--device", default="auto")
    e.add_argument("--no-postprocess", action="store_true",
                   help="score the network's label maps without the model's post-processing")
    e.add_argument("--determine-postprocessing", action="store_true",
                   help="decide nnU-Net's largest-component post-processing for --model on the --split cases "
                        "(e.g. train; never the test cases) and report it (--output)")
    e.add_argument("--write-model", default="",
                   help="with --determine-postprocessing: write the model with the decision stored to this new file")
    e.set_defaults(func=_cmd_evaluate)
