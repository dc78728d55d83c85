"""Manifests of simulated (or real) multi-centre data sets: one CSV row per case (written by
``ReconstructionModuleLib.simulate``; columns in its ``MANIFEST_COLUMNS``). Read here for every engine.

Image columns (``full_dose``, ``low_dose*``, ``ct``, ``labels``, ``lesions``, ``suv_true``) are made absolute
(relative to the manifest's folder, which is also kept in ``_root``); ``known`` becomes a bool.
"""

import csv
from pathlib import Path

from .errors import InputError

IMAGE_COLUMNS = ("full_dose", "ct", "labels", "lesions", "suv_true")


def _is_image_column(name):
    return name in IMAGE_COLUMNS or name.startswith("low_dose")


def read_manifest(path, required=()):
    """The rows of ``path`` (list of dicts); InputError when it is missing, empty or lacks ``required`` columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Data-set manifest not found: {path}")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise InputError(f"Data-set manifest {path} has no rows")
    missing = set(required) - set(rows[0])
    if missing:
        raise InputError(f"Data-set manifest {path} lacks columns {sorted(missing)}")
    root = path.parent
    for r in rows:
        r["_root"] = str(root)
        for key, value in list(r.items()):
            if value and _is_image_column(key) and not Path(value).is_absolute():
                r[key] = str((root / value).resolve())
        r["known"] = str(r.get("known", "1")).strip().lower() in ("1", "true", "yes", "known")
    return rows


def select(rows, split=None, known=None, centers=None, tracers=None):
    """The rows of a split (name or names), known or unknown centres, some centres, some tracers (case-insensitive;
    a single name or several)."""
    def as_set(x):
        return {x} if isinstance(x, str) else set(x)
    tracer_set = {t.lower() for t in as_set(tracers)} if tracers else None
    return [r for r in rows
            if (split is None or r.get("split") in as_set(split))
            and (known is None or r["known"] == known)
            and (centers is None or r.get("center") in as_set(centers))
            and (tracer_set is None or str(r.get("tracer", "")).lower() in tracer_set)]


def case_path(row, key):
    """Path of a case's ``key`` image; InputError when the row has none."""
    p = row.get(key)
    if not p:
        raise InputError(f"Case {row.get('case_id')} has no '{key}' column value")
    p = Path(p)
    return p if p.is_absolute() else Path(row["_root"]) / p
