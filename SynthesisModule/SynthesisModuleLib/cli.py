"""Command-line commands of the synthesis family: ``synthesize``, ``train synthesis``, ``evaluate synthesis``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PETWorkbenchLib.errors import InputError


def _cmd_synthesize(args, rep):
    from PETWorkbenchLib.imageio import check_output, write_image, write_json

    from .infer import synthesize
    inputs = [args.input]
    check_output(args.output, inputs, args.overwrite)
    if args.routing_json:
        check_output(args.routing_json, inputs + [args.output], args.overwrite, "routing file")
    from PETWorkbenchLib.models import default_model
    from PETWorkbenchLib.units import pet_in_suv
    image, factor = pet_in_suv(read_input(args.input, "low-dose PET"), args,
                               f"low-dose PET {Path(args.input).name}")
    out, summary = synthesize(image, args.model or default_model("synthesis"), device=args.device, patch=args.patch,
                              overlap=args.overlap, sw_batch_size=args.sw_batch_size, units="SUV", progress=rep)
    if factor != 1.0:
        out = out / factor                                      # back to the input's units, as the module does
    summary["units"] = args.units
    write_image(out, args.output, inputs=inputs, overwrite=args.overwrite)
    if args.routing_json:
        write_json(summary, args.routing_json, inputs=inputs, overwrite=args.overwrite)
    return {"output": args.output, **summary}


def read_input(path, what):
    """The PET of the command line, refused from its header when larger than the engine's memory bound."""
    from PETWorkbenchLib.imageio import image_header, read_image

    from .infer import input_voxel_limit
    reader, _ = image_header(path, what)
    limit, reason = input_voxel_limit(reader.GetSpacing())
    return read_image(path, what, max_voxels=limit, limit_reason=reason)


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
               "--out", str(out), "--device", args.device] + (["--no-resume"] if args.no_resume else [])
        rep(0.0, f"launching {args.nproc} processes")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"torchrun training failed (exit code {proc.returncode}): {tail}")
        import json as _json
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        summary = _json.loads(line)
    else:
        summary = train(cfg, args.manifest, out, resume=not args.no_resume, device=args.device, progress=rep)
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


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="full-dose PET estimate from a low-dose PET (DRMC)")
    p.add_argument("input", help="low-dose PET (NIfTI/NRRD) in SUV")
    p.add_argument("output", help="output file")
    p.add_argument("--model", default=None, help="model id or weights file (default: the synthesis model marked "
                   "default in Models.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--patch", type=int, default=None, help="sliding-window patch size (default: training size)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=2)
    from PETWorkbenchLib.units import add_units_arguments
    add_units_arguments(p)
    p.add_argument("--routing-json", default=None, help="write the routing summary here")
    p.set_defaults(func=_cmd_synthesize)

    from PETWorkbenchLib.commands import group
    for name, sub in (("train", group(subparsers, "train")), ("evaluate", group(subparsers, "evaluate"))):
        q = sub.add_parser("synthesis", help=f"{name} DRMC / baseline synthesis models")
        q.add_argument("--manifest", required=True, help="multi-centre manifest.csv")
        q.add_argument("--device", default="auto" if name == "evaluate" else "cpu")
        if name == "train":
            q.add_argument("--config", required=True, help="config file or name in SynthesisModuleLib/configs")
            q.add_argument("--out", required=True, help="output folder (checkpoints, logs; resumes from it)")
            q.add_argument("--nproc", type=int, default=1, help="processes (torchrun, one centre each per step)")
            from .train import add_override_arguments
            add_override_arguments(q)
            q.add_argument("--no-resume", action="store_true")
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
                           help="also compute I_ij of the first model with this many batches per centre")
            q.set_defaults(func=_cmd_evaluate)
