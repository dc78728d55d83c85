"""The organ list (label values, names, colours, SNOMED CT terminology) shared by engines and Slicer modules.

Source of truth: ``Resources/Terminology/PETWorkbenchOrgans.json``.
"""

import json
from functools import lru_cache

from .errors import InputError
from .paths import resources_dir


@lru_cache(maxsize=1)
def _load():
    return json.loads((resources_dir() / "Terminology" / "PETWorkbenchOrgans.json").read_text())


def organ_specs(organs=None):
    """Segment specs ({value, name, color, terminology}) for all organs or the given names/values, in label order."""
    specs = [{"value": o["value"], "name": o["name"], "color": o["color"], "terminology": o.get("terminology")}
             for o in _load()["organs"]]
    if not organs:
        return specs
    wanted = {str(o).strip().lower() for o in organs}
    out = [s for s in specs if s["name"].lower() in wanted or str(s["value"]) in wanted]
    unknown = wanted - {s["name"].lower() for s in out} - {str(s["value"]) for s in out}
    if unknown:
        raise InputError(f"Unknown organ(s): {', '.join(sorted(unknown))}. Known: "
                         + ", ".join(s["name"] for s in specs))
    return out
