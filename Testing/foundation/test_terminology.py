"""The organ terminology is a real 3D Slicer terminology context: slicer-core's own Terminologies logic loads it,
finds every organ in it, and resolves the terminology entries our segments carry."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PETWorkbenchLib.terminology import CONTEXT_NAME, organ_specs, organ_table, terminology_path
from PETWorkbenchSlicer.mrml import load_into_slicer

ROOT = Path(__file__).resolve().parents[2]
GENERAL_ANATOMY = (ROOT.parent / "shared" / "slicer-python" / "Terminologies"
                   / "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json")
GENERAL_ANATOMY_NAME = "Segmentation category and type - 3D Slicer General Anatomy list"
NOT_IN_GENERAL_ANATOMY = {"sacrum", "vertebrae", "femur", "hip", "autochthon"}


def _logic():
    import slicer
    return slicer.vtkSlicerTerminologiesModuleLogic()


def _types_in(logic, name, category):
    import slicer
    out = []
    for i in range(logic.GetNumberOfTypesInTerminologyCategory(name, category)):
        t = slicer.vtkSlicerTerminologyType()
        assert logic.GetNthTypeInTerminologyCategory(name, category, i, t)
        out.append(t)
    return out


def _types(logic, name):
    import slicer
    assert logic.GetNumberOfCategoriesInTerminology(name) == 1
    category = slicer.vtkSlicerTerminologyCategory()
    assert logic.GetNthCategoryInTerminology(name, 0, category)
    return category, _types_in(logic, name, category)


def test_slicer_loads_the_context_with_the_18_organs():
    logic = _logic()
    assert logic.LoadTerminologyFromFile(str(terminology_path())) == CONTEXT_NAME
    names = []
    logic.GetLoadedTerminologyNames(names)
    assert CONTEXT_NAME in names and logic.IsTerminologyContextLoaded(CONTEXT_NAME)
    category, types = _types(logic, CONTEXT_NAME)
    assert (category.GetCodingSchemeDesignator(), category.GetCodeValue(), category.GetCodeMeaning()) == \
        ("SCT", "123037004", "Anatomical Structure")
    specs = organ_specs()
    assert len(types) == len(specs) == 18
    for spec, t in zip(specs, types):
        code = spec["terminology"]["type"]
        assert (t.GetCodingSchemeDesignator(), t.GetCodeValue(), t.GetCodeMeaning()) == \
            (code["codingScheme"], code["codeValue"], code["codeMeaning"])
        assert t.GetSlicerLabel() == spec["name"]
        assert list(t.GetRecommendedDisplayRGBValue()) == [round(c * 255) for c in spec["color"]]
        # Slicer's lookup by 3dSlicerLabel (what it does for a segment named after the organ)
        import slicer
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(CONTEXT_NAME, spec["name"], entry)
        assert entry.GetTypeObject().GetCodeValue() == code["codeValue"]
        assert entry.GetTerminologyContextName() == CONTEXT_NAME


def test_file_is_in_slicers_format_and_reader_keeps_names_values_colours():
    doc = json.loads(terminology_path().read_text())
    assert doc["SegmentationCategoryTypeContextName"] == CONTEXT_NAME
    assert "segment-context-schema" in doc["@schema"]
    types = [t for c in doc["SegmentationCodes"]["Category"] for t in c["Type"]]
    for t in types:
        assert {"CodingSchemeDesignator", "CodeValue", "CodeMeaning", "recommendedDisplayRGBValue",
                "3dSlicerLabel", "3dSlicerIntegerLabel"} <= set(t)
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in t["recommendedDisplayRGBValue"])
    table = organ_table()
    assert [o["value"] for o in table] == sorted(t["3dSlicerIntegerLabel"] for t in types) == list(range(1, 19))
    by_name = {o["name"]: o for o in table}
    assert by_name["urinary_bladder"]["displayName"] == "Urinary bladder"
    assert by_name["liver"]["color"] == [0.8667, 0.5098, 0.3961]
    assert by_name["clavicula"]["terminology"]["type"]["codeValue"] == "51299004"


def test_codes_are_those_of_slicers_general_anatomy_list():
    if not GENERAL_ANATOMY.is_file():
        pytest.skip("Slicer's General Anatomy terminology (../shared/slicer-python) not present")
    logic = _logic()
    assert logic.LoadTerminologyFromFile(str(GENERAL_ANATOMY)) == GENERAL_ANATOMY_NAME
    _, ga_types = _types_of_category(logic, GENERAL_ANATOMY_NAME, "123037004")
    ga = {t.GetCodeValue(): t for t in ga_types}
    missing = set()
    for spec in organ_specs():
        code = spec["terminology"]["type"]
        t = ga.get(code["codeValue"])
        if t is None:
            missing.add(spec["name"])
            continue
        assert (t.GetCodingSchemeDesignator(), t.GetCodeMeaning()) == (code["codingScheme"], code["codeMeaning"])
        if t.GetSlicerLabel():          # organs Slicer lists without left/right modifiers have its colour
            assert list(t.GetRecommendedDisplayRGBValue()) == [round(c * 255) for c in spec["color"]]
    assert missing == NOT_IN_GENERAL_ANATOMY


def _types_of_category(logic, name, category_code):
    import slicer
    category = slicer.vtkSlicerTerminologyCategory()
    for i in range(logic.GetNumberOfCategoriesInTerminology(name)):
        assert logic.GetNthCategoryInTerminology(name, i, category)
        if category.GetCodeValue() == category_code:
            break
    else:
        raise AssertionError(f"category {category_code} not in {name}")
    return category, _types_in(logic, name, category)


def test_segments_we_write_name_the_context_and_slicer_resolves_them(mrml):
    import slicer
    from PETWorkbenchSlicer import mrml as bridge
    lab = np.zeros((6, 6, 20), np.uint8)
    for v in range(1, 19):
        lab[1:5, 1:5, v] = v
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((2.0, 2.0, 2.0))
    seg, ids, missing = bridge.labelmap_to_segmentation(img, organ_specs())
    assert missing == [] and len(ids) == 18
    logic = _logic()
    load_into_slicer(logic)
    segmentation = seg.GetSegmentation()
    for spec in organ_specs():
        segment = segmentation.GetSegment(ids[spec["value"]])
        serialized = segment.GetTerminology()
        assert serialized == spec["terminology"]["slicerTerminologyEntry"]
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(serialized, entry)
        assert entry.GetTerminologyContextName() == CONTEXT_NAME
        # Slicer fills in the type's metadata from the loaded context: it found the type there
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [CONTEXT_NAME], [])
        assert entry.GetTypeObject().GetSlicerLabel() == spec["name"] == segment.GetName()
        assert list(entry.GetTypeObject().GetRecommendedDisplayRGBValue()) == \
            [round(c * 255) for c in spec["color"]]
        t = spec["terminology"]
        assert list(logic.FindTerminologyNames(
            t["category"]["codingScheme"], t["category"]["codeValue"], t["type"]["codingScheme"],
            t["type"]["codeValue"], "", "", [])) == [CONTEXT_NAME]


def test_load_into_slicer_once_and_not_without_slicer(mrml):
    logic = _logic()
    assert load_into_slicer(logic) == CONTEXT_NAME
    assert load_into_slicer(logic) == CONTEXT_NAME           # already loaded: not loaded twice
    names = []
    logic.GetLoadedTerminologyNames(names)
    assert names.count(CONTEXT_NAME) == 1
    assert load_into_slicer() is None                        # headless scene: no Terminologies module


def _repository_texts(suffixes=(".py", ".md", ".json", ".txt")):
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("out", "build", "__pycache__")]
        for name in files:
            p = Path(folder) / name
            if p.suffix in suffixes and p.resolve() != Path(__file__).resolve():
                out[p.relative_to(ROOT).as_posix()] = p.read_text(errors="ignore")
    return out


def test_one_organ_list():
    """The old JSON is gone, nothing names it, and only PETWorkbenchLib.terminology opens the organ file (the only
    string literal naming it outside the tests); the reconstruction and segmentation engines get their organs
    from there."""
    assert not (ROOT / "Resources" / "Terminology" / "PETWorkbenchOrgans.json").exists()
    texts = _repository_texts()
    assert [k for k, t in texts.items() if "PETWorkbenchOrgans.json" in t] == []
    literal = re.compile(r"[\"'][^\"'\s]*PETWorkbenchOrgans[^\"'\s]*[\"']")
    readers = [k for k, t in texts.items() if k.endswith(".py") and not k.startswith("Testing/") and literal.search(t)]
    assert readers == ["PETWorkbenchLib/terminology.py"]
    from ReconstructionModuleLib.organs import LDOS_ORGANS, segment_specs
    from SegmentationModuleLib.organs import organ_specs as segmentation_specs
    assert LDOS_ORGANS == [(s["value"], s["name"]) for s in organ_specs()]
    assert [s["color"] for s in segment_specs()] == [s["color"] for s in organ_specs()]
    assert [(s["value"], s["name"], s["color"]) for s in segmentation_specs()] == \
        [(s["value"], s["name"], s["color"]) for s in organ_specs()]
