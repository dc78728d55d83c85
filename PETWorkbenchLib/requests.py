"""Typed requests: one dataclass per engine operation, from which both its command line (argparse) and the module
logic (the worker's argument list) are built, so that an option is added in one place.

    @dataclass
    class SynthesizeRequest:
        input: str = option(positional=True, help="low-dose PET")
        overlap: float = option(0.5, help="sliding-window overlap")

    add_arguments(parser, SynthesizeRequest)          # positional INPUT, --overlap (float, default 0.5)
    request = from_args(SynthesizeRequest, args)      # in the command
    argv = to_argv(SynthesizeRequest(input=path, overlap=0.25))   # in the module logic: [path, "--overlap", "0.25"]

Options: ``positional`` (given in field order, before the others), ``required`` (an option that must be given),
``flag`` (a bool switch), ``choices`` (a list or a callable returning one), ``parse``/``format`` (text <-> value,
e.g. "100,60,30" <-> (100, 60, 30)), ``short`` (e.g. "-o"), ``nargs`` (several values after the option); the type
of a plain option is the type of its default (str when the default is None).
"""

from dataclasses import MISSING, field, fields


def option(default=None, *, help="", positional=False, required=False, flag=False, choices=None, parse=None,
           format=None, short=None, nargs=None):
    """A request field with its command-line metadata (see the module docstring)."""
    meta = {"help": help, "positional": positional, "required": required, "flag": flag, "choices": choices,
            "parse": parse, "format": format, "short": short, "nargs": nargs}
    if (positional or required) and default is None:
        return field(default=MISSING, metadata=meta)
    return field(default=False if flag and default is None else default, metadata=meta)


def _cli_name(f):
    return "--" + f.name.replace("_", "-")


def add_arguments(parser, cls):
    """Add the request's fields to an argparse parser."""
    for f in fields(cls):
        m = f.metadata
        kw = {"help": m.get("help") or None}
        choices = m.get("choices")
        if choices is not None:
            kw["choices"] = list(choices() if callable(choices) else choices)
        if m.get("flag"):
            parser.add_argument(_cli_name(f), dest=f.name, action="store_true", **kw)
            continue
        default = None if f.default is MISSING else f.default
        kw["type"] = m.get("parse") or (type(default) if default is not None and not isinstance(default, bool)
                                        else str)
        if m.get("nargs"):
            kw["nargs"] = m["nargs"]
        if m.get("positional"):
            parser.add_argument(f.name, **kw)
        else:
            names = [_cli_name(f)] + ([m["short"]] if m.get("short") else [])
            parser.add_argument(*names, dest=f.name, default=default, required=bool(m.get("required")), **kw)


def from_args(cls, args):
    """The request an argparse namespace describes."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def to_argv(request):
    """The command-line arguments that describe ``request`` (positional ones first; options at their default are
    left out, so the engine's own default applies)."""
    positional, options = [], []
    for f in fields(request):
        m, value = f.metadata, getattr(request, f.name)
        if m.get("positional"):
            positional.append(str(value))
        elif m.get("flag"):
            if value:
                options.append(_cli_name(f))
        elif value is not None and (f.default is MISSING or value != f.default):
            if m.get("nargs"):
                options += [_cli_name(f)] + [str(v) for v in value]
            else:
                options += [_cli_name(f), m["format"](value) if m.get("format") else str(value)]
    return positional + options
