"""Command groups and the foundation's own commands, for the ``petworkbench`` entry point (PETWorkbenchApp.cli).

A command is a callable ``func(args, reporter) -> dict``. Engines add theirs in ``<Name>ModuleLib/cli.py`` through
``add_commands(subparsers)``; commands several families share (``train``, ``evaluate``) are groups made with
:func:`group`, e.g. ``petworkbench train synthesis ...``.
"""

import sys

from .errors import InputError


def group(subparsers, name, help=None):
    """Get or create the command group ``name`` (e.g. "train") and return its sub-parsers object."""
    choices = subparsers.choices
    if name not in choices:
        p = subparsers.add_parser(name, help=help or f"{name} commands")
        p.set_defaults(func=None, _group=p)
        p._pwb_sub = p.add_subparsers(dest=f"{name}_what", metavar="WHAT")
    return choices[name]._pwb_sub


def _cmd_info(args, rep):
    from .device import describe
    from .paths import models_cache_dir, resources_dir
    info = describe()
    info["resources"] = str(resources_dir())
    info["models_cache"] = str(models_cache_dir())
    info.update(getattr(args, "extra_info", None) or {})
    return info


def _cmd_models(args, rep):
    from . import models
    if args.action == "list":
        return {"models": [{"id": e.id, "family": e.family, "method": e.method, "version": e.version,
                            "status": models.status(e), "title": e.title} for e in models.registry(args.family)]}
    if not args.model_id:
        raise InputError(f"'models {args.action}' needs a model id (see 'petworkbench models list')")
    if args.action == "download":
        return {"id": args.model_id, "path": str(models.ensure(args.model_id, progress=rep))}
    if args.action == "verify":
        return {"id": args.model_id, "path": str(models.verify(args.model_id)), "status": "ok"}
    if args.action == "install":
        if not args.file:
            raise InputError("'models install' needs the weights file: petworkbench models install ID FILE")
        return {"id": args.model_id, "path": str(models.install_from_file(args.model_id, args.file))}
    if args.action == "delete":
        return {"id": args.model_id, "deleted": models.delete(args.model_id)}
    raise InputError(f"Unknown models action {args.action}")


def _cmd_selftest(args, rep):
    """Exercise the worker protocol: progress, optional child process, optional failure."""
    import subprocess
    import time
    child = None
    if args.spawn_child:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    for i in range(args.steps):
        rep(i / args.steps, f"step {i + 1} of {args.steps}")
        time.sleep(args.delay)
        if args.fail_at is not None and i + 1 == args.fail_at:
            raise InputError(f"selftest failure requested at step {i + 1}")
    rep(1.0, "done")
    return {"steps": args.steps, "child_pid": child.pid if child else None}


def add_commands(sub):
    """The foundation's own commands: ``info``, ``models ...``, ``selftest``."""
    p = sub.add_parser("info", help="versions, devices, folders")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("models", help="list, download, verify, install or delete model weights")
    p.add_argument("action", choices=["list", "download", "verify", "install", "delete"])
    p.add_argument("model_id", nargs="?")
    p.add_argument("file", nargs="?", help="weights file (install)")
    p.add_argument("--family", help="only this family (list)")
    p.set_defaults(func=_cmd_models)
    p = sub.add_parser("selftest", help="check the worker protocol (progress, cancel, errors)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--delay", type=float, default=0.05)
    p.add_argument("--fail-at", type=int, default=None)
    p.add_argument("--spawn-child", action="store_true", help="start a child process (tests process-tree cancel)")
    p.set_defaults(func=_cmd_selftest)
