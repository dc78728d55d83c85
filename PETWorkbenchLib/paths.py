"""Where the extension's resources and the per-user model cache live."""

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resources_dir():
    """Extension-wide Resources folder.

    Looked for, in this order:

    * ``PETWORKBENCH_RESOURCES`` (environment), when set;
    * ``PETWorkbenchLib/Resources`` beside this file: where CMake puts ``Resources/`` in a Slicer build tree
      (``<build>/<Slicer_QTSCRIPTEDMODULES_LIB_DIR>/PETWorkbenchLib/Resources``, copied at configure time) and in
      the installed extension (``<Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR>/PETWorkbenchLib/Resources``): the
      same layout in both trees;
    * ``<repo>/Resources`` in the source tree (command line, tests).
    """
    env = os.environ.get("PETWORKBENCH_RESOURCES")
    candidates = [Path(env)] if env else []
    candidates += [_HERE / "Resources", _HERE.parent / "Resources"]
    for c in candidates:
        if (c / "Models.json").is_file():
            return c
    raise FileNotFoundError("PETWorkbench Resources folder (with Models.json) not found; looked in "
                            + ", ".join(str(c) for c in candidates))


def models_cache_dir():
    """Per-user model cache: ``PETWORKBENCH_MODELS_DIR`` or ``~/.petworkbench/models``."""
    env = os.environ.get("PETWORKBENCH_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".petworkbench" / "models"
