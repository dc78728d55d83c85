"""The organ list (label values, names, colours, SNOMED CT terminology) shared by engines and Slicer modules.

Source of truth: ``Resources/Terminology/PETWorkbenchOrgans.term.json``, a 3D Slicer terminology context
(the format of Slicer's own ``SegmentationCategoryTypeModifier-*.json`` files: ``SegmentationCodes`` ->
``Category`` -> ``Type`` with ``CodingSchemeDesignator``/``CodeValue``/``CodeMeaning``), so Slicer's
Terminologies module can load it as it is. Each organ is one ``Type`` of the "Anatomical Structure" category:

* ``3dSlicerLabel``: the organ name, which is also the name of the segments we create (``"urinary_bladder"``);
* ``3dSlicerIntegerLabel``: the organ's value in PETWorkbench label maps (1..18);
* ``recommendedDisplayRGBValue``: its colour (0..255);
* ``PETWorkbenchDisplayName``: a human-readable name (``"Urinary bladder"``), ours, ignored by Slicer.

This module is the only reader of the file. Segment terminology entries written from these specs name the
context (:data:`CONTEXT_NAME`); :func:`PETWorkbenchSlicer.mrml.load_into_slicer` loads it into Slicer's
Terminologies module so Slicer finds them.
"""

import copy
import json
from functools import lru_cache

from .errors import InputError
from .paths import resources_dir

TERMINOLOGY_FILE = "Terminology/PETWorkbenchOrgans.term.json"
CONTEXT_NAME = "Segmentation category and type - PETWorkbench organs"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"


def terminology_path():
    """Path of the terminology context file (``<Resources>/Terminology/PETWorkbenchOrgans.term.json``)."""
    p = resources_dir() / TERMINOLOGY_FILE
    if not p.is_file():
        raise FileNotFoundError(f"PETWorkbench terminology not found: {p}")
    return p


def _code(d):
    return {"codingScheme": d["CodingSchemeDesignator"], "codeValue": str(d["CodeValue"]),
            "codeMeaning": d["CodeMeaning"]}


def _serialized(context, category, type_):
    def triple(c):
        return "^".join([c["codingScheme"], c["codeValue"], c["codeMeaning"]]) if c else "^^"
    return "~".join([context, triple(category), triple(type_), triple(None), ANATOMIC_CONTEXT_NAME,
                     triple(None), triple(None)])


@lru_cache(maxsize=1)
def _table():
    doc = json.loads(terminology_path().read_text(encoding="utf-8"))
    context = doc["SegmentationCategoryTypeContextName"]
    organs = []
    for cat in doc["SegmentationCodes"]["Category"]:
        category = _code(cat)
        for t in cat.get("Type", []):
            type_ = _code(t)
            organs.append({
                "value": int(t["3dSlicerIntegerLabel"]),
                "name": t["3dSlicerLabel"],
                "displayName": t.get("PETWorkbenchDisplayName", t["CodeMeaning"]),
                # stored as 0..255 integers; the 4-decimal 0..1 floats are what the organ list always gave
                "color": [round(c / 255.0, 4) for c in t["recommendedDisplayRGBValue"]],
                "terminology": {"contextName": context, "category": category, "type": type_, "typeModifier": None,
                                "anatomicContextName": ANATOMIC_CONTEXT_NAME, "anatomicRegion": None,
                                "anatomicRegionModifier": None,
                                "slicerTerminologyEntry": _serialized(context, category, type_)},
                "_sources": tuple(t.get("PETWorkbenchSourceClasses", [])),
            })
    organs.sort(key=lambda o: o["value"])
    return context, tuple(organs)


def context_name():
    """The terminology context name as written in the file (``SegmentationCategoryTypeContextName``)."""
    return _table()[0]


def organ_table():
    """All organs, sorted by label value: [{value, name, displayName, color (0..1 RGB), terminology}] (copies)."""
    return [{k: v for k, v in o.items() if k != "_sources"} for o in copy.deepcopy(list(_table()[1]))]


def source_classes():
    """{label value: TotalSegmentator class names or shell patterns (``vertebrae_*``)} that the simulator maps to
    each organ (``PETWorkbenchSourceClasses`` in the terminology file: a new organ is one entry there)."""
    return {o["value"]: list(o["_sources"]) for o in _table()[1]}


def organ_specs(organs=None):
    """Segment specs ({value, name, color, terminology}) for all organs or the given names/values, in label order."""
    specs = [{"value": o["value"], "name": o["name"], "color": o["color"], "terminology": o["terminology"]}
             for o in organ_table()]
    if not organs:
        return specs
    wanted = {str(o).strip().lower() for o in organs}
    out = [s for s in specs if s["name"].lower() in wanted or str(s["value"]) in wanted]
    unknown = wanted - {s["name"].lower() for s in out} - {str(s["value"]) for s in out}
    if unknown:
        raise InputError(f"Unknown organ(s): {', '.join(sorted(unknown))}. Known: "
                         + ", ".join(s["name"] for s in specs))
    return out
