"""The 18 LDOS organs: label values, names, colours and SNOMED CT terminology.

The table lives in ``Resources/Terminology/PETWorkbenchOrgans.json``; this module only reads it and turns it into
segment specs (``{"value", "name", "color", "terminology"}``, see docs/ARCHITECTURE.md).
"""

import json
import os
from functools import lru_cache
from pathlib import Path

from PETWorkbenchLib.errors import InputError

TERMINOLOGY_FILE = "Terminology/PETWorkbenchOrgans.json"


def _candidates():
    here = Path(__file__).resolve().parent
    env = os.environ.get("PETWORKBENCH_RESOURCES")
    out = [Path(env)] if env else []
    out += [here.parent.parent / "Resources", here.parent / "Resources", here / "Resources"]
    try:
        import PETWorkbenchLib
        lib = Path(PETWorkbenchLib.__file__).resolve().parent
        out += [lib / "Resources", lib.parent / "Resources"]
    except Exception:  # pragma: no cover
        pass
    return out


def terminology_path():
    for c in _candidates():
        p = c / TERMINOLOGY_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(f"{TERMINOLOGY_FILE} not found under " + ", ".join(str(c) for c in _candidates()))


@lru_cache(maxsize=1)
def _table():
    with open(terminology_path(), encoding="utf-8") as f:
        doc = json.load(f)
    return tuple(doc["organs"])


def organ_specs(organs=None):
    """Segment specs for all organs (or the selected ones: names or label values), sorted by value."""
    table = [dict(o) for o in _table()]
    if organs is None:
        return table
    values = set(resolve_organs(organs))
    return [o for o in table if o["value"] in values]


def organ_names():
    return [o["name"] for o in _table()]


def n_classes():
    """Number of network output classes (background + organs)."""
    return 1 + max(o["value"] for o in _table())


def resolve_organs(organs):
    """Organ names or label values -> sorted list of label values. Unknown organs are an InputError."""
    if organs is None:
        return [o["value"] for o in _table()]
    if isinstance(organs, (str, int)):
        organs = [organs]
    by_name = {o["name"]: o["value"] for o in _table()}
    by_name.update({o["displayName"].lower(): o["value"] for o in _table()})
    valid = set(by_name.values())
    out = set()
    for item in organs:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if isinstance(item, int) and not isinstance(item, bool):
            if item not in valid:
                raise InputError(f"Unknown organ label value {item}: valid values are 1..{max(valid)}")
            out.add(item)
        elif isinstance(item, str):
            key = item.strip().lower().replace(" ", "_")
            v = by_name.get(key, by_name.get(item.strip().lower()))
            if v is None:
                raise InputError(f"Unknown organ '{item}': choose from {', '.join(organ_names())}")
            out.add(v)
        else:
            raise InputError(f"Organ must be a name or a label value, got {item!r}")
    if not out:
        raise InputError("The organ selection is empty")
    return sorted(out)
