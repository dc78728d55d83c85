"""CMakeLists.txt puts Resources/ at the same place in a Slicer build tree and in the install tree, where
PETWorkbenchLib.paths.resources_dir() looks, and the catalogue's icon and screenshot URLs name files that exist."""

import importlib.util
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CMAKE = (ROOT / "CMakeLists.txt").read_text()
BUILD_PREFIX = "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/"
INSTALL_PREFIX = "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/"


def _commands(name):
    """Arguments (list of tokens) of every ``name(...)`` call; comments removed, nested parentheses not needed."""
    code = re.sub(r"#[^\n]*", "", CMAKE)
    return [shlex.split(m.group(1)) for m in re.finditer(rf"\b{name}\s*\(([^()]*)\)", code, re.I)]


def _variables():
    return {args[0]: " ".join(args[1:]) for args in _commands("set") if len(args) >= 2}


def _expand(s, variables):
    for _ in range(5):
        s = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), s)
    return s


def _build_tree_destinations():
    """Destinations (suffix after the build tree's scripted-modules dir) that Resources/ is copied to."""
    variables = _variables()
    out = []
    # configure_file(Resources/${f} <build dir>/<suffix>/${f} COPYONLY) in a foreach over a GLOB_RECURSE of
    # Resources/
    globs = {args[1] for args in _commands("file") if args[0].upper() == "GLOB_RECURSE"
             and any(a.rstrip("/*").endswith("Resources") for a in args[2:])}
    loops = {args[0]: args[1:] for args in _commands("foreach")}
    for args in _commands("configure_file"):
        if len(args) < 3 or "COPYONLY" not in args:
            continue
        src, dst = args[0], _expand(args[1], variables)
        m = re.fullmatch(r"Resources/\$\{(\w+)\}", src)
        if not m or not dst.startswith(BUILD_PREFIX) or not dst.endswith("/${%s}" % m.group(1)):
            continue
        loop_var = m.group(1)
        assert loop_var in loops and any(f"${{{g}}}" in loops[loop_var] for g in globs), \
            f"configure_file of Resources/${{{loop_var}}} is not in a loop over a GLOB_RECURSE of Resources/"
        out.append(dst[len(BUILD_PREFIX):-len("/${%s}" % loop_var)])
    # or: cmake -E copy_directory <source>/Resources <build dir>/<suffix> (a custom target or command)
    for name in ("add_custom_target", "add_custom_command"):
        for args in _commands(name):
            if "copy_directory" in args:
                i = args.index("copy_directory")
                src, dst = args[i + 1], _expand(args[i + 2], variables)
                if src.rstrip("/").endswith("Resources") and dst.startswith(BUILD_PREFIX):
                    out.append(dst[len(BUILD_PREFIX):].rstrip("/"))
    return out


def _install_destinations():
    variables = _variables()
    out = []
    for args in _commands("install"):
        if args[:2] in (["DIRECTORY", "Resources/"], ["DIRECTORY", "${CMAKE_CURRENT_SOURCE_DIR}/Resources/"]):
            dst = _expand(args[args.index("DESTINATION") + 1], variables)
            assert dst.startswith(INSTALL_PREFIX), dst
            out.append(dst[len(INSTALL_PREFIX):].rstrip("/"))
    return out


def test_resources_copied_to_the_build_tree_and_installed_at_the_same_place():
    build, install = _build_tree_destinations(), _install_destinations()
    assert build, "Resources/ is not copied into the build tree"
    assert install, "Resources/ is not installed"
    assert set(build) == set(install) == {"PETWorkbenchLib/Resources"}


def test_the_destination_is_beside_the_compiled_PETWorkbenchLib():
    """PETWorkbenchLib/*.py lands in <build or install scripted-modules dir>/PETWorkbenchLib, so the resources are
    ``Path(paths.__file__).parent / "Resources"`` in both trees."""
    (lib,) = [args for args in _commands("ctkMacroCompilePythonScript") if "PETWorkbenchLib" in args]
    opt = {k: lib[lib.index(k) + 1] for k in ("DESTINATION_DIR", "INSTALL_DIR")}
    assert opt["DESTINATION_DIR"] + "/" == BUILD_PREFIX and opt["INSTALL_DIR"] + "/" == INSTALL_PREFIX
    assert "NO_INSTALL_SUBDIR" in lib
    assert "PETWorkbenchLib/*.py" in CMAKE


def test_resources_dir_finds_that_layout(tmp_path, monkeypatch):
    """resources_dir() of a paths.py copied into such a tree returns <tree>/PETWorkbenchLib/Resources."""
    monkeypatch.delenv("PETWORKBENCH_RESOURCES", raising=False)
    tree = tmp_path / "lib" / "Slicer-5.9" / "qt-scripted-modules"
    lib = tree / "PETWorkbenchLib"
    (lib / "Resources").mkdir(parents=True)
    (lib / "paths.py").write_text((ROOT / "PETWorkbenchLib" / "paths.py").read_text())
    (lib / "Resources" / "Models.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("_copied_paths", lib / "paths.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.resources_dir() == lib / "Resources"


def test_catalogue_icon_and_screenshots_exist_in_the_repository():
    variables = _variables()
    urls = []
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert key in variables, f"{key} not set"
        urls += variables[key].split()
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith("https://") and "/main/" in url, url
        path = ROOT / url.split("/main/", 1)[1]
        assert path.is_file(), f"{url} points at {path.relative_to(ROOT)}, which is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
