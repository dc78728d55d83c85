"""``petworkbench``: the command line shared by batch users, cluster jobs and the Slicer worker process.

The entry point of the application layer: the foundation's commands (:mod:`PETWorkbenchLib.commands`: ``info``,
``models ...``, ``selftest``), the application's (``demo``, ``pipeline``, ``batch``), and each engine's, added by
``<Name>ModuleLib/cli.py`` through ``add_commands(subparsers)`` (groups such as ``train`` and ``evaluate`` come
from :func:`PETWorkbenchLib.commands.group`).

A command is a callable ``func(args, reporter) -> dict``. The dict is its JSON summary: printed as a table, or as
JSON with ``--json``. Progress goes through ``reporter``: a progress bar on a terminal, ``PWB_PROGRESS`` lines when
run by the worker (``--progress-lines``). Errors print one clear line (the traceback only with ``--debug``) and
exit with the documented code (:mod:`PETWorkbenchLib.errors`): 2 bad input, 3 model problem, 4 disk, permission or
memory, 5 a batch with failed studies, 130 cancelled (Ctrl-C, SIGTERM), 1 an internal error. Global flags, accepted
anywhere on the line: ``--json``, ``--debug``, ``--overwrite`` (replace existing output files; without it an
existing output is refused).
"""

import argparse
import importlib
import json
import os
import signal
import sys
import traceback

from PETWorkbenchLib import commands
from PETWorkbenchLib.commands import group
from PETWorkbenchLib.errors import EXIT_BUG, EXIT_PARTIAL, InputError, as_user_error
from PETWorkbenchLib.progress import Reporter

FAMILIES = ("ReconstructionModuleLib", "SynthesisModuleLib", "SegmentationModuleLib", "RegistrationModuleLib")
_GLOBAL_FLAGS = ("--progress-lines", "--json", "--debug", "--overwrite")


def _steps(text):
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def _cmd_pipeline(args, rep):
    from .pipeline import run_study
    spec = {"id": args.id}
    if args.low_dose:
        spec.update({k: getattr(args, k) for k in ("low_dose", "ct", "full_dose", "labels", "lesions")
                     if getattr(args, k)})
    else:
        spec["anatomy"] = args.anatomy or "sample"
    return run_study(spec, args.out, steps=_steps(args.steps), device=args.device, seed=args.seed, progress=rep)


def _cmd_batch(args, rep):
    from .batch import format_table, load_studies, run_batch
    summary = run_batch(load_studies(args.studies), args.out, steps=_steps(args.steps), device=args.device,
                        seed=args.seed, scheduler=args.scheduler, progress=rep,
                        scheduler_timeout_s=args.scheduler_timeout)
    if not args.json:
        print(format_table(summary))
        return {"done": summary["done"], "skipped": summary["skipped"], "failed": summary["failed"]}
    return summary


def _cmd_demo(args, rep):
    """The main job on the embedded sample data, then the Slicer scene and a one-screen summary."""
    import time
    from pathlib import Path
    from .batch import format_table
    from .pipeline import run_study
    t0 = time.perf_counter()
    summary = run_study({"id": "demo", "anatomy": "sample"}, args.out, device=args.device, seed=args.seed,
                        progress=rep.sub(0.0, 0.95))
    study_dir = Path(summary["dir"])
    try:
        from PETWorkbenchSlicer.scene_export import write_study_scene
        scene_path, _ = write_study_scene(study_dir)
        scene_note = str(scene_path)
    except ImportError:
        scene_note = "not written (slicer-core not installed: pip install slicer-core)"
    rep(1.0, "demo done")
    table = {"studies": [{"id": "demo", "status": "done", "seconds": summary["seconds"],
                          "metrics": summary.get("metrics", {})}], "done": 1, "skipped": 0, "failed": 0,
             "out": str(study_dir)}
    if not args.json:
        print(format_table(table))
        print(f"report: {study_dir / 'report.md'}\nscene:  {scene_note}\n"
              f"total:  {time.perf_counter() - t0:.0f} s")
    return {"report": str(study_dir / "report.md"), "scene": scene_note,
            "seconds": round(time.perf_counter() - t0, 1), **summary.get("metrics", {})}


_FAMILY_STATUS = {}


def build_parser():
    parser = _ArgumentParser(prog="petworkbench", description="PETWorkbench engines from the command line "
                                     "(research use only, not for clinical decisions).")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--progress-lines", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_commands(sub)
    p = sub.add_parser("demo", help="run the main job end to end on the embedded sample data")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("pipeline", help="the main job (or some steps) for one study")
    p.add_argument("--id", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--low-dose", help="low-dose PET (SUV), or a folder holding its PET DICOM series (SUV from the "
                   "tags); without it the study is simulated from --anatomy")
    p.add_argument("--anatomy", help="folder with example_ct.nii.gz + labels, or 'sample' (default)")
    for k in ("ct", "full-dose", "labels", "lesions"):
        p.add_argument(f"--{k}", help=f"optional {k.replace('-', ' ')} image (used for alignment / metrics)")
    p.add_argument("--steps", help="comma-separated subset of simulate,synthesize,segment,uptake,register,report")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_pipeline)
    p = sub.add_parser("batch", help="the pipeline over a folder or CSV of studies (resumable; Dask optional)")
    p.add_argument("studies", help="CSV (id, low_dose|anatomy, ct, full_dose, labels, lesions) or folder; the PET "
                   "inputs may be PET DICOM folders")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", help="comma-separated subset of the pipeline steps")
    p.add_argument("--scheduler", help="Dask scheduler address (tcp://host:8786) or local:N for N local workers")
    p.add_argument("--scheduler-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to try to reach a scheduler address before giving up (default 10)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_batch)
    group(sub, "train", "train a model (torchrun-compatible)")
    group(sub, "evaluate", "evaluate a model or a result against a reference")
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"{fam}.cli")
            mod.add_commands(sub)
            _FAMILY_STATUS[fam] = None
        except ImportError as e:
            _FAMILY_STATUS[fam] = f"unavailable ({e})"
    return parser


class _TerminalProgress:
    def __init__(self):
        self.bar = None

    def __call__(self, fraction, message):
        from tqdm import tqdm
        if self.bar is None:
            self.bar = tqdm(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}",
                            file=sys.stderr)
        self.bar.n = int(round(fraction * 1000))
        self.bar.set_postfix_str(message[:60], refresh=False)
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _progress_line(fraction, message):
    print("PWB_PROGRESS " + json.dumps({"fraction": round(float(fraction), 5), "message": message}), flush=True)


def _print_summary(summary):
    if not isinstance(summary, dict):
        print(summary)
        return
    width = max((len(str(k)) for k in summary), default=0)
    for k, v in summary.items():
        if isinstance(v, (list, dict)):
            print(f"{k}:")
            for item in (v if isinstance(v, list) else [v]):
                print("  " + (json.dumps(item) if not isinstance(item, str) else item))
        else:
            print(f"{str(k).ljust(width)}  {v}")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors that exit with the input-error code (sub-parsers inherit the class)."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {f for f in _GLOBAL_FLAGS if f in argv}
    argv = [a for a in argv if a not in _GLOBAL_FLAGS]
    lines, as_json, debug = "--progress-lines" in flags, "--json" in flags, "--debug" in flags
    debug = debug or os.environ.get("PETWORKBENCH_DEBUG") == "1"
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        pass
    terminal = None
    code = 0
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.json, args.debug, args.overwrite = as_json, debug, "--overwrite" in flags
        func = getattr(args, "func", None)
        if func is None:
            (getattr(args, "_group", None) or parser).print_help()
            return InputError.exit_code
        if lines:
            rep = Reporter(_progress_line)
        elif sys.stderr.isatty():
            terminal = _TerminalProgress()
            rep = Reporter(terminal)
        else:
            rep = Reporter(None)
        args.extra_info = {"families": {f: ("ok" if not err else err) for f, err in _FAMILY_STATUS.items()}}
        summary = func(args, rep)
        if terminal:
            terminal.close()
        if lines:
            print("PWB_RESULT " + json.dumps(summary, default=str), flush=True)
        elif as_json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            _print_summary(summary)
        if isinstance(summary, dict) and summary.get("failed"):
            code = EXIT_PARTIAL
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing left to say
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    except SystemExit as e:  # --help, or argparse itself
        code = e.code if isinstance(e.code, int) else 0
    except BaseException as e:  # noqa: BLE001 - every error ends in one line and a documented exit code
        if terminal:
            terminal.close()
        user = as_user_error(e, "running the command")
        if user is None and not isinstance(e, Exception):
            raise
        if debug:
            traceback.print_exc(file=sys.stdout if lines else sys.stderr)
        if user is not None:
            code = user.exit_code
            _report_error(type(user).__name__, str(user), lines)
        else:
            code = EXIT_BUG
            _report_error(type(e).__name__, f"internal error ({type(e).__name__}: {e}); please report it with the "
                          "output of the same command run with --debug", lines)
    finally:
        if terminal:
            terminal.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code


def _report_error(kind, message, lines):
    if lines:
        print("PWB_ERROR " + json.dumps({"type": kind, "message": message}), flush=True)
    else:
        print(f"petworkbench: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
