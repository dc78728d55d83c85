"""The 18 LDOS organs: label values, names, colours and SNOMED CT terminology.

The table lives in ``Resources/Terminology/PETWorkbenchOrgans.term.json`` (a 3D Slicer terminology context) and is
read by :mod:`PETWorkbenchLib.terminology`; this module turns it into segment specs
(``{"value", "name", "displayName", "color", "terminology"}``, see docs/ARCHITECTURE.md) and resolves organ
selections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.terminology import TERMINOLOGY_FILE, organ_table, terminology_path  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from collections.abc import Iterable


def _table():
    return organ_table()


def organ_specs(organs: str | int | Iterable[str | int] | None = None) -> list[dict]:
    """Segment specs for all organs (or the selected ones: names or label values), sorted by value."""
    table = _table()
    if organs is None:
        return table
    values = set(resolve_organs(organs))
    return [o for o in table if o["value"] in values]


def organ_names() -> list[str]:
    return [o["name"] for o in _table()]


def n_classes() -> int:
    """Number of network output classes (background + organs)."""
    return 1 + max(o["value"] for o in _table())


def resolve_organs(organs: str | int | Iterable[str | int] | None) -> list[int]:
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
