"""PET Organ Segmentation module as Slicer runs it, on the sample simulated low-dose PET."""

from pathlib import Path


import slicer_layer
from guitools import pump, run_apply, scene_state

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "SimulatedPET"


MODULE = "SegmentationModule"


def _load(name, file):
    return slicer_layer._state.logics["volumes"].AddArchetypeVolume(str(SAMPLE / file), name, 0)


def test_segments_with_terminology_and_uptake_table(widget, scene):
    # Guards: empty selectors (no .ui connection): the PET could not be chosen, Apply never enabled.
    pet = _load("LowDosePET", "lowdose_pet.nii.gz")
    assert "LowDosePET" in widget.ui.inputSelector._listed()
    widget.ui.inputSelector._userSelect("LowDosePET")
    models = [widget.ui.modelComboBox.itemData(i) for i in range(widget.ui.modelComboBox.count)]
    assert models and not any("fakefdpet" in m.lower() or "denois" in m.lower() for m in models)
    widget._parameterNode.device = "cpu"
    run_apply(widget)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    seg = widget._parameterNode.outputSegmentation
    assert seg is not None and seg.GetNodeReference("PETWorkbench.input") is pet
    assert widget.ui.segmentationSelector.currentNode() is seg
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() > 3
    for i in range(segmentation.GetNumberOfSegments()):
        term = segmentation.GetNthSegment(i).GetTerminology()
        assert term and "SCT" in term, term
    table = widget._parameterNode.outputTable
    assert table is not None and table.GetNumberOfRows() == segmentation.GetNumberOfSegments()


def test_ct_is_refused_with_a_message_and_scene_kept(widget, scene, errors):
    # Guards: as above; a CT must be refused with a message naming it, scene unchanged.
    _load("CT", "lowdose_pet_ct.nii.gz")
    widget.ui.inputSelector._userSelect("CT")
    before = scene_state(scene)
    widget.ui.applyButton.click()
    pump(lambda: not widget.controller.busy, 60)
    assert any("CT" in r.getMessage() for r in errors.records), [r.getMessage() for r in errors.records]
    assert scene_state(scene) == before
