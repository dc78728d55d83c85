"""Organ label conventions.

``LDOS_ORGANS``: the 18 organ classes of LDOS (CT-free low-dose PET organ segmentation) with the label values
used by every PETWorkbench data set and model, as (value, name) pairs read from the one organ list,
``Resources/Terminology/PETWorkbenchOrgans.term.json`` (see :mod:`PETWorkbenchLib.terminology`).
:func:`ts_name_to_ldos` maps TotalSegmentator ("total" task, v2) class names to those values (left/right,
vertebrae and lung lobes merged).
"""

from __future__ import annotations

import csv
import numpy as np

from PETWorkbenchLib.terminology import organ_specs

__all__ = ["LDOS_ORGANS", "ts_name_to_ldos", "read_ts_label_table", "ts_to_ldos_lut", "segment_specs"]

LDOS_ORGANS = [(s["value"], s["name"]) for s in organ_specs()]

_EXACT = {
    "spleen": 1, "colon": 2, "urinary_bladder": 3, "sacrum": 4, "heart": 6, "atrial_appendage_left": 6,
    "aorta": 7, "clavicula_left": 8, "clavicula_right": 8, "femur_left": 9, "femur_right": 9,
    "hip_left": 10, "hip_right": 10, "autochthon_left": 11, "autochthon_right": 11,
    "kidney_left": 12, "kidney_right": 12, "kidney_cyst_left": 12, "kidney_cyst_right": 12,
    "brain": 13, "liver": 14, "stomach": 15, "pancreas": 16, "esophagus": 18,
}


def ts_name_to_ldos(name: str) -> int:
    """LDOS value of a TotalSegmentator class name (0 when the class is not one of the 18 organs)."""
    if name in _EXACT:
        return _EXACT[name]
    if name.startswith("vertebrae_"):
        return 5
    if name.startswith("lung_"):
        return 17
    return 0


def read_ts_label_table(path) -> dict:
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


def segment_specs():
    """Segment specs (value, name, color) of the LDOS-18 label map, as in docs/ARCHITECTURE.md (colours of the
    organ terminology)."""
    return [{"value": s["value"], "name": s["name"], "color": s["color"]} for s in organ_specs()]
