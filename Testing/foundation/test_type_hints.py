"""Every public function of the four engines carries type hints, checked on the source (``ast``; nothing is imported).

A public function is a top-level ``def`` whose name does not start with "_"; it must annotate every parameter
(``*args`` and ``**kwargs`` included; ``self``/``cls`` excepted) and its return. Methods and dataclass fields are
not checked. The annotations are never evaluated at run time: a file with annotations starts with
``from __future__ import annotations`` (so they cost no import, e.g. of torch, and can form no import cycle).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("ReconstructionModule/ReconstructionModuleLib", "SynthesisModule/SynthesisModuleLib",
           "SegmentationModule/SegmentationModuleLib", "RegistrationModule/RegistrationModuleLib")


def engine_files():
    for folder in ENGINES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def _functions(tree):
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def unannotated(source, filename="<string>"):
    """(line, name, [what lacks an annotation]) for every public top-level function of ``source``."""
    out = []
    for fn in _functions(ast.parse(source, filename)):
        if fn.name.startswith("_"):
            continue
        a = fn.args
        missing = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs
                   if p.annotation is None and p.arg not in ("self", "cls")]
        missing += [star + p.arg for star, p in (("*", a.vararg), ("**", a.kwarg))
                    if p is not None and p.annotation is None]
        if fn.returns is None:
            missing.append("return")
        if missing:
            out.append((fn.lineno, fn.name, missing))
    return out


def public_count(source):
    return sum(not fn.name.startswith("_") for fn in _functions(ast.parse(source)))


def test_every_public_engine_function_is_annotated():
    bad, counted = [], {}
    for f in engine_files():
        source = f.read_text()
        rel = f.relative_to(ROOT)
        counted[rel.parts[0]] = counted.get(rel.parts[0], 0) + public_count(source)
        bad += [f"{rel}:{line} {name} (no annotation: {', '.join(what)})"
                for line, name, what in unannotated(source, str(f))]
    assert set(counted) == {e.split("/")[0] for e in ENGINES} and all(counted.values()), counted
    assert not bad, f"{len(bad)} public engine functions lack type hints:\n" + "\n".join(bad)


def test_annotations_are_not_evaluated_at_run_time():
    def annotated(fn):
        a = fn.args
        params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p is not None]
        return fn.returns is not None or any(p.annotation is not None for p in params)

    bad = []
    for f in engine_files():
        tree = ast.parse(f.read_text(), str(f))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                     and any(a.name == "annotations" for a in n.names) for n in tree.body)
        if not future and any(annotated(n) for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            bad.append(str(f.relative_to(ROOT)))
    assert not bad, "annotated files without 'from __future__ import annotations': " + ", ".join(bad)


def test_the_check_can_fail():
    """Unannotated parameters, ``*args``/``**kwargs`` and returns are reported; private functions, methods and
    fully annotated functions are not."""
    source = (
        "def ok(a: int, *args: str, b: float = 1.0, **kw: bool) -> None:\n    pass\n\n\n"
        "def _private(a):\n    pass\n\n\n"
        "class C:\n    def method(self, x):\n        pass\n\n\n"
        "def bad(a, b: int, *args, c=2, **kw):\n    pass\n\n\n"
        "def no_return(a: int):\n    pass\n"
    )
    assert unannotated(source) == [(14, "bad", ["a", "c", "*args", "**kw", "return"]),
                                   (18, "no_return", ["return"])]
    assert public_count(source) == 3
