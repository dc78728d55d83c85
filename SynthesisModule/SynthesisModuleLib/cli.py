"""Command-line commands of the synthesis family: ``synthesize``, ``train synthesis``, ``evaluate synthesis``."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.device import PRECISIONS
from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.requests import option
from PETWorkbenchLib.units import PETUnits

from . import DEFAULT_OVERLAP, DEFAULT_PRECISION

if TYPE_CHECKING:
    import argparse

    import SimpleITK as sitk


@dataclass
class SynthesizeRequest(PETUnits):
    """``petworkbench synthesize``: what the command line and the Synthesis module's logic both build."""

    input: str = option(positional=True, help="low-dose PET (NIfTI/NRRD), in SUV or Bq/ml (see --units), or a "
                        "folder holding a PET DICOM series (SUV from its tags)")
    output: str = option(positional=True, help="output file")
    model: str = option(None, help="model id or weights file (default: the synthesis model marked default in "
                        "Models.json)")
    device: str = option("auto", help="auto, cpu, cuda[:N] or mps")
    patch: int = option(None, parse=int, help="sliding-window patch size (default: training size)")
    overlap: float = option(DEFAULT_OVERLAP, help="sliding-window overlap in [0, 1)")
    sw_batch_size: int = option(2, help="patches per forward pass")
    precision: str = option(DEFAULT_PRECISION, choices=PRECISIONS, help="the network's arithmetic: float32 "
                            "(default) or bfloat16 (autocast, for CPUs or GPUs with native bfloat16)")
    routing_json: str = option(None, help="write the routing summary here")
    lesions: str = option(None, help="write the lesion-change report here (.json; .csv for the table only)")
    liver_mask: str = option(None, help="liver mask, or an organ label map of `petworkbench segment` (liver = its "
                             "liver value), on the input grid: hot spots above PERCIST's liver threshold")
    lesion_threshold: float = option(None, parse=float, help="fixed SUV threshold of the hot spots (default: "
                                     "PERCIST's with --liver-mask, else 2.5)")


def _cmd_synthesize(args, rep):
    from PETWorkbenchLib.imageio import check_output, write_image, write_json
    from PETWorkbenchLib.requests import from_args

    from .infer import synthesize
    overwrite = args.overwrite
    req = from_args(SynthesizeRequest, args)
    inputs = [req.input]
    check_output(req.output, inputs, overwrite)
    if req.routing_json:
        check_output(req.routing_json, inputs + [req.output], overwrite, "routing file")
    if req.lesions:
        check_output(req.lesions, inputs + [req.output], overwrite, "lesion-change report")
    from PETWorkbenchLib.models import default_model
    image, factor, input_units = read_input(req.input, "low-dose PET", req)
    liver = read_liver_mask(req.liver_mask, image) if req.liver_mask else None
    model = req.model or default_model("synthesis")
    out, summary = synthesize(image, model, device=req.device, patch=req.patch,
                              overlap=req.overlap, sw_batch_size=req.sw_batch_size, units="SUV",
                              precision=req.precision, progress=rep.sub(0.0, 0.95))
    rep(0.95, "lesion-change report")
    from .lesions import CSV_COLUMNS, lesion_change_report, model_calibration, report_rows
    report = lesion_change_report(image, out, liver_mask=liver, threshold_suv=req.lesion_threshold,
                                  calibration=model_calibration(model))
    if factor != 1.0:
        out = out / factor                                      # back to the input's units, as the module does
    summary["units"] = input_units
    write_image(out, req.output, inputs=inputs, overwrite=overwrite)
    if req.routing_json:
        write_json(summary, req.routing_json, inputs=inputs, overwrite=overwrite)
    if req.lesions:
        if str(req.lesions).lower().endswith(".csv"):
            from PETWorkbenchLib.imageio import write_csv
            write_csv(report_rows(report), req.lesions, fieldnames=CSV_COLUMNS, inputs=inputs,
                      overwrite=overwrite)
        else:
            write_json(report, req.lesions, inputs=inputs, overwrite=overwrite)
    summary["lesions"] = {k: report[k] for k in ("threshold", "rule", "n_hot_spots", "n_flagged")}
    summary["lesions"]["flagged"] = [{k: r[k] for k in ("id", "center_lps", "suv_peak_change_pct")}
                                     for r in report["lesions"] if r["flagged"]]
    rep(1.0, "done")
    return {"output": req.output, **summary}


def read_liver_mask(path: str | Path, like: sitk.Image) -> sitk.Image:
    """A liver mask on the PET grid from a binary mask or an organ label map (the terminology's liver value)."""
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import read_image, resample_like

    from .lesions import liver_from_labels
    lab = read_image(path, "liver mask", pixel_type=sitk.sitkUInt8)
    values = set(int(v) for v in np.unique(sitk.GetArrayViewFromImage(lab))) - {0}
    if values == {1}:
        mask = resample_like(lab, like, label=True)
        mask = mask if sitk.GetArrayViewFromImage(mask).any() else None
    else:
        mask = liver_from_labels(lab, like)
        if mask is None and values:
            raise InputError(f"--liver-mask {Path(path).name} is neither a binary mask nor an organ label map with "
                             "the liver on the PET's field of view")
    if mask is None:
        raise InputError(f"--liver-mask {Path(path).name} holds no liver voxel on the PET's field of view")
    return mask


def read_input(path: str | Path, what: str, units: PETUnits | None = None) -> tuple[sitk.Image, float, str]:
    """The PET of the command line (an image file, or a folder holding a PET DICOM series) in SUV, refused from its
    header when larger than the engine's memory bound: (image, factor SUV per input unit, units of the input)."""
    from PETWorkbenchLib.dicom import read_pet

    from .infer import input_voxel_limit
    return read_pet(path, what, units, voxel_limit=input_voxel_limit)


def _cmd_train(args, rep):
    from .train import apply_overrides, export_weights, load_config, train
    cfg = apply_overrides(load_config(args.config), args)
    out = Path(args.out)
    if args.nproc > 1:
        out.mkdir(parents=True, exist_ok=True)
        cfg_path = out / "config.json"
        from PETWorkbenchLib.imageio import write_json
        write_json(cfg, cfg_path)
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parents[1])
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([here, root, env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "SynthesisModuleLib.train", "--config", str(cfg_path), "--manifest", args.manifest,
               "--out", str(out), "--device", args.device] + (["--no-resume"] if args.no_resume else []) + \
            (["--init", str(args.init)] if args.init else [])
        rep(0.0, f"launching {args.nproc} processes")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"torchrun training failed (exit code {proc.returncode}): {tail}")
        import json as _json
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        summary = _json.loads(line)
    else:
        summary = train(cfg, args.manifest, out, resume=not args.no_resume, device=args.device, progress=rep,
                        init=args.init)
    if args.export:
        summary["exported"] = str(export_weights(out / "last.pt", args.export))
    return summary


def _cmd_evaluate(args, rep):
    from .evaluate import evaluate
    models = {}
    for spec in args.model or []:
        name, _, path = spec.partition("=")
        if not path:
            name, path = Path(spec).stem, spec
        models[name] = path
    summary = evaluate(models, args.manifest, out_dir=args.out, split=args.split, patch=args.patch,
                       overlap=args.overlap, device=args.device, max_cases_per_center=args.max_cases,
                       tracers=args.tracer,
                       progress=rep.sub(0.0, 0.9 if args.interference else 1.0))
    if (args.lesion_calibration or args.interference) and not models:
        from PETWorkbenchLib.errors import InputError
        raise InputError("--lesion-calibration and --interference need a model (--model)")
    if args.lesion_calibration:
        from .evaluate import lesion_calibration
        name, m = next(iter(models.items()))
        summary["lesion_calibration"] = {name: lesion_calibration(m, args.manifest, split=args.split,
                                                                  device=args.device)}
        if args.out:
            from PETWorkbenchLib.imageio import write_json
            write_json(summary["lesion_calibration"][name], Path(args.out) / "lesion_calibration.json",
                       overwrite=True)
    if args.interference:
        from .data import CenterPatchSampler, read_manifest, select
        from .infer import load_model
        from .metrics import interference
        name, m = next(iter(models.items()))
        net, cfg = load_model(m, "cpu")
        rows = select(read_manifest(args.manifest), split="train", known=True)
        sampler = CenterPatchSampler.from_manifest(rows, cfg["train"]["patch_size"], cfg["train"]["suv_scale"])
        summary["interference"] = {name: interference(net, sampler, n_batches=args.interference)}
        if args.out:
            from PETWorkbenchLib.imageio import write_json
            write_json(summary["interference"], Path(args.out) / "interference.json")
    rep(1.0, "done")
    return summary


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from PETWorkbenchLib.requests import add_arguments
    p = subparsers.add_parser("synthesize", help="full-dose PET estimate from a low-dose PET (DRMC)")
    add_arguments(p, SynthesizeRequest)
    p.set_defaults(func=_cmd_synthesize)

    from PETWorkbenchLib.commands import group
    for name, sub in (("train", group(subparsers, "train")), ("evaluate", group(subparsers, "evaluate"))):
        q = sub.add_parser("synthesis", help=f"{name} DRMC / baseline synthesis models")
        q.add_argument("--manifest", required=True, help="multi-centre manifest.csv")
        q.add_argument("--device", default="auto" if name == "evaluate" else "cpu")
        if name == "train":
            q.add_argument("--config", required=True, help="config file or name in SynthesisModuleLib/configs")
            q.add_argument("--out", required=True, help="output folder (checkpoints, logs; resumes from it)")
            q.add_argument("--nproc", type=int, default=1,
                           help="processes (torchrun); each step's centres are shared out over them")
            from .train import add_override_arguments
            add_override_arguments(q)
            q.add_argument("--no-resume", action="store_true")
            q.add_argument("--init", default=None,
                           help="start from these weights (a model file) when there is no checkpoint to resume")
            q.add_argument("--export", default=None, help="write shipped weights {config, state_dict} here")
            q.set_defaults(func=_cmd_train)
        else:
            q.add_argument("--model", action="append", help="NAME=weights (repeatable) or a model id / file")
            q.add_argument("--out", default=None, help="output folder for tables and plots")
            q.add_argument("--split", default="test")
            q.add_argument("--patch", type=int, default=None)
            q.add_argument("--overlap", type=float, default=0.5)
            q.add_argument("--max-cases", type=int, default=None, help="at most this many cases per centre")
            q.add_argument("--tracer", action="append", default=None, help="only this tracer (repeatable)")
            q.add_argument("--interference", type=int, default=0,
                           help="also compute I_ij of the first model with this many batches per centre "
                                "(the supplement uses 100)")
            q.add_argument("--lesion-calibration", action="store_true",
                           help="also measure the first model's SUVpeak change of the true lesions against their "
                                "volume (the lesion report's calibration; Models.json 'lesion_calibration'); it "
                                "runs synthesize() as users do: --patch, --overlap, --tracer and --max-cases do not "
                                "apply to it")
            q.set_defaults(func=_cmd_evaluate)
