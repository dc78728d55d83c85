"""The layers of docs/ARCHITECTURE.md, checked on the source: no upward import, no import cycle.

    modules (<Name>Module.py, the Segment Editor effect)      Slicer UI: may import everything below
    PETWorkbenchApp      pipeline, batch, report, CLI           the only code importing several engines
    PETWorkbenchSlicer   MRML bridge, module helpers, scenes    the only package importing slicer/vtk/qt
    <Name>ModuleLib      the four engines                       foundation only; never each other
    PETWorkbenchLib      the foundation                         nothing of the above

Every import counts, at file scope or inside a function (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ("ReconstructionModuleLib", "SynthesisModuleLib", "SegmentationModuleLib", "RegistrationModuleLib")
SLICER_SIDE = ("slicer", "vtk", "vtkmodules", "qt", "ctk", "PythonQt", "SampleData", "mrml")
ALLOWED = {
    "PETWorkbenchLib": {"PETWorkbenchLib"},
    "PETWorkbenchSlicer": {"PETWorkbenchLib", "PETWorkbenchSlicer"},
    "PETWorkbenchApp": {"PETWorkbenchLib", "PETWorkbenchSlicer", "PETWorkbenchApp", *ENGINES},
    **{e: {"PETWorkbenchLib", e} for e in ENGINES},
}
FIRST_PARTY = set(ALLOWED)


def package_files():
    for pkg in FIRST_PARTY:
        base = ROOT / pkg if pkg.startswith("PETWorkbench") else ROOT / pkg.replace("Lib", "") / pkg
        for f in sorted(base.rglob("*.py")):
            yield pkg, f


def module_name(pkg, f):
    base = ROOT / pkg if pkg.startswith("PETWorkbench") else ROOT / pkg.replace("Lib", "") / pkg
    parts = list(f.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([pkg] + parts)


def imports_of(pkg, f, module_of=None):
    """(absolute module name, line) of every import in the file; relative imports resolved."""
    tree = ast.parse(f.read_text(), str(f))
    here = (module_of or module_name)(pkg, f)
    package = here if f.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            for a in node.names:                       # "from pkg import module" imports pkg.module
                out.append((f"{mod}.{a.name}", node.lineno))
    return out


def violations(files, module_of=None):
    bad = []
    for pkg, f in files:
        for mod, line in imports_of(pkg, f, module_of):
            top = mod.split(".")[0]
            where = f"{f.name if not f.is_relative_to(ROOT) else f.relative_to(ROOT)}:{line} imports {mod}"
            if top in FIRST_PARTY and top not in ALLOWED[pkg]:
                bad.append(where)
            if top in SLICER_SIDE and pkg != "PETWorkbenchSlicer":
                bad.append(where + " (only PETWorkbenchSlicer may import Slicer, VTK or Qt)")
    return bad


def test_no_upward_or_sideways_import():
    bad = violations(package_files())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def cycles_of(modules):
    """Import cycles among ``modules`` ({module name: (package, file)})."""
    graph = {}
    for name, (pkg, f) in modules.items():
        deps = set()
        for mod, _ in imports_of(pkg, f, lambda p, g: name):
            while mod and mod not in modules:          # "from a.b import c" where c is not a module
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):   # a package's own __init__ is no cycle
                deps.add(mod)
        graph[name] = deps
    cycles, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_no_import_cycle():
    cycles = cycles_of({module_name(pkg, f): (pkg, f) for pkg, f in package_files()})
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail(tmp_path):
    """An engine importing the application (lazily, inside a function), an engine importing Qt, and two modules
    importing each other are all reported."""
    eng = tmp_path / "x.py"
    eng.write_text("def f():\n    from PETWorkbenchApp.pipeline import run_study\n    import qt\n")
    bad = violations([("SynthesisModuleLib", eng)], lambda p, f: "SynthesisModuleLib.x")
    assert any("imports PETWorkbenchApp.pipeline" in b for b in bad) and any("imports qt (" in b for b in bad)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from PETWorkbenchLib import b\n")
    b.write_text("import PETWorkbenchLib.a\n")
    assert cycles_of({"PETWorkbenchLib.a": ("PETWorkbenchLib", a), "PETWorkbenchLib.b": ("PETWorkbenchLib", b)})


def test_every_noqa_says_why():
    """A suppressed lint warning names its code and the reason (``# noqa: F401 - re-exported``)."""
    import re
    import subprocess
    marker = "# no" + "qa"                               # not written out, so that this line is no match itself
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    bare = [f"{f}:{i}" for f in files if (ROOT / f).is_file()
            for i, line in enumerate((ROOT / f).read_text().splitlines(), 1)
            if marker in line and not re.search(marker + r": [A-Z0-9, ]+\s*(-|\()\s*\S", line)]
    assert not bare, "noqa without a reason: " + ", ".join(bare)
