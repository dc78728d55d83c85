"""PET Registration module as Slicer runs it."""

import json

import numpy as np

from guitools import add_volume, pump, run_apply, scene_state


MODULE = "RegistrationModule"


def blob(shift=0.0, shape=(20, 32, 32)):
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float32)
    c = np.array(shape, np.float32) / 2
    return np.exp(-(((z - c[0]) / 5) ** 2 + ((y - c[1] - shift) / 6) ** 2 + ((x - c[2]) / 7) ** 2)).astype(np.float32)


def test_registration_gives_grid_transform_selected_and_referenced(widget, scene):
    # Guards: the output transform selector (showChildNodeTypes false, nodeTypes vtkMRMLTransformNode) hid the
    # vtkMRMLGridTransformNode it received, so the result could not be shown or chosen in the panel.
    fixed = add_volume(blob(), "Fixed")
    moving = add_volume(blob(2.0), "Moving")
    widget.ui.fixedSelector._userSelect("Fixed")
    widget.ui.movingSelector._userSelect("Moving")
    assert widget.ui.applyButton.enabled, widget.ui.applyButton.toolTip
    widget._parameterNode.iterations = 20
    widget._parameterNode.device = "cpu"
    run_apply(widget)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    t = widget._parameterNode.outputTransform
    assert t is not None and t.IsA("vtkMRMLGridTransformNode")
    assert widget.ui.outputTransformSelector.currentNode() is t
    assert t.GetNodeReference("fixedVolume") is fixed and t.GetNodeReference("movingVolume") is moving
    assert widget.ui.summaryLabel.text


def test_same_volume_twice_keeps_apply_disabled(widget, scene):
    # Guards: empty selectors (no .ui connection): nothing could be chosen.
    add_volume(blob(), "Fixed")
    widget.ui.fixedSelector._userSelect("Fixed")
    widget.ui.movingSelector._userSelect("Fixed")
    assert not widget.ui.applyButton.enabled
    assert "differ" in widget.ui.applyButton.toolTip


def test_nan_input_shows_error_and_keeps_scene(widget, scene, errors):
    # Guards: a NaN volume was passed to the engine as NIfTI and registered without any message (found by this
    # layer; volumes are now checked for finite values when they leave the scene).
    bad = blob(1.0)
    bad[0, 0, 0] = np.nan
    add_volume(blob(), "Fixed")
    add_volume(bad, "Broken")
    widget.ui.fixedSelector._userSelect("Fixed")
    widget.ui.movingSelector._userSelect("Broken")
    before = scene_state(scene)
    widget.ui.applyButton.click()
    pump(lambda: not widget.controller.busy, 120)
    assert errors.records, "no error shown"
    assert scene_state(scene) == before


def test_pet_ct_preset_runs_the_main_jobs_settings(widget, scene):
    # the checkbox is bound to the parameter node, and the run uses the preset, not the panel's similarity
    add_volume(blob() * 1500.0 - 1000.0, "CT")         # HU: air around a body
    add_volume(blob(1.5), "PET")
    widget.ui.fixedSelector._userSelect("CT")
    widget.ui.movingSelector._userSelect("PET")
    widget.ui.petCtPresetCheckBox.click()
    assert widget._parameterNode.petCtPreset is True
    assert not widget.ui.similarityComboBox.enabled and not widget.ui.iterationsSpinBox.enabled
    widget._parameterNode.similarity = "mind"          # ignored under the preset
    widget._parameterNode.device = "cpu"
    run_apply(widget)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    summary = json.loads(widget._parameterNode.outputTransform.GetAttribute("PETWorkbench.summary"))
    assert summary["preset"] == "pet-ct" and summary["similarity"] == "lncc"
    widget.ui.petCtPresetCheckBox.click()
    assert widget.ui.similarityComboBox.enabled and widget.ui.iterationsSpinBox.enabled
