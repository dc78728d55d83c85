"""Organ label conventions.

``LDOS_ORGANS``: the 18 organ classes of LDOS (CT-free low-dose PET organ segmentation) with the label values
used by every PETWorkbench data set and model, as (value, name) pairs read from the one organ list,
``Resources/Terminology/PETWorkbenchOrgans.term.json`` (see :mod:`PETWorkbenchLib.terminology`).
:func:`ts_name_to_ldos` maps TotalSegmentator ("total" task, v2) class names to those values (left/right,
vertebrae and lung lobes merged), from each organ's ``PETWorkbenchSourceClasses`` in the same file.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING
import numpy as np

from PETWorkbenchLib.terminology import organ_specs, source_classes

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["LDOS_ORGANS", "ts_name_to_ldos", "read_ts_label_table", "ts_to_ldos_lut", "segment_specs"]

LDOS_ORGANS = [(s["value"], s["name"]) for s in organ_specs()]


def ts_name_to_ldos(name: str) -> int:
    """LDOS value of a TotalSegmentator class name (0 when the class is not one of the organs): the organ whose
    ``PETWorkbenchSourceClasses`` in the terminology file names the class, exactly or by a shell pattern."""
    from fnmatch import fnmatchcase
    for value, patterns in source_classes().items():
        if name in patterns:
            return value
    for value, patterns in source_classes().items():
        if any(fnmatchcase(name, p) for p in patterns if any(c in p for c in "*?[")):
            return value
    return 0


def read_ts_label_table(path: str | Path) -> dict:
    """{value: name} from a TotalSegmentator ``labels_total_v2.tsv`` style table (header ``label<TAB>name``)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f, delimiter="\t"):
            if not row or not row[0].strip().isdigit():
                continue
            out[int(row[0])] = row[1].strip()
    return out


def ts_to_ldos_lut(ts_names: dict) -> np.ndarray:
    """Lookup table ``lut[ts_value] = ldos_value`` for a {value: name} TotalSegmentator table."""
    lut = np.zeros(max(ts_names) + 1 if ts_names else 1, dtype=np.uint8)
    for v, n in ts_names.items():
        lut[v] = ts_name_to_ldos(n)
    return lut


def segment_specs() -> list[dict]:
    """Segment specs (value, name, color) of the LDOS-18 label map, as in docs/ARCHITECTURE.md (colours of the
    organ terminology)."""
    return [{"value": s["value"], "name": s["name"], "color": s["color"]} for s in organ_specs()]
