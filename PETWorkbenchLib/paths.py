"""Where the extension's resources and the per-user model cache live."""

import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def resources_dir():
    """Extension-wide Resources folder.

    In the source tree it is ``<repo>/Resources``; in an installed Slicer extension CMake installs it as
    ``PETWorkbenchLib/Resources``. ``PETWORKBENCH_RESOURCES`` overrides both.
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
