"""PET Synthesis module as Slicer runs it: widget setup, selectors, Apply/Cancel, progress, results, errors."""

import numpy as np

from guitools import add_volume, pet_phantom, process_alive, pump, run_apply, scene_state


MODULE = "SynthesisModule"


def test_input_selector_lists_scene_volumes(widget, scene):
    # Guards: no .ui connection from mrmlSceneChanged(vtkMRMLScene*) to the selectors' setMRMLScene, so every
    # qMRMLNodeComboBox stayed empty and disabled.
    add_volume(pet_phantom(), "LowDosePET")
    assert widget.ui.inputSelector.enabled
    assert "LowDosePET" in widget.ui.inputSelector._listed()
    assert widget.ui.outputSelector.mrmlScene() is scene


def test_apply_synthesizes_and_references_input(widget, scene):
    # Guards: with the selectors empty (no .ui connection) no input could be chosen and Apply never enabled.
    node = add_volume(pet_phantom(), "LowDosePET")
    widget.ui.inputSelector._userSelect("LowDosePET")
    assert widget._parameterNode.inputVolume is node
    widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")
    assert widget._parameterNode.device == "cpu"
    progress = run_apply(widget)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    out = widget._parameterNode.outputVolume
    assert out is not None and out is not node
    assert out.GetNodeReference("PETWorkbench.input") is node
    import slicer
    arr = slicer.util.arrayFromVolume(out)
    assert arr.shape == pet_phantom().shape and np.isfinite(arr).all()
    assert any(0 < v < 100 for v in progress), f"progress bar never moved: {progress}"
    assert "Lesion changes:" in widget.ui.routingLabel.text  # routing summary and lesion-change summary shown


def test_bad_input_shows_error_and_keeps_scene(widget, scene, errors):
    # Guards: as above (the input could not be chosen); the NaN must be named in the message.
    bad = pet_phantom()
    bad[3, 3, 3] = np.nan
    add_volume(bad, "BrokenPET")
    widget.ui.inputSelector._userSelect("BrokenPET")
    before = scene_state(scene)
    widget.ui.applyButton.click()
    pump(lambda: not widget.controller.busy, 120)
    assert any("NaN" in r.getMessage() or "not a number" in r.getMessage().lower() for r in errors.records), \
        [r.getMessage() for r in errors.records]
    assert scene_state(scene) == before
    assert widget.ui.applyButton.text == "Apply" and widget.ui.applyButton.enabled


def test_cancel_ends_process_tree_and_changes_nothing(widget, scene):
    # Guards: as above; Cancel must end the worker process and leave the scene as it was.
    add_volume(pet_phantom(shape=(48, 96, 96)), "LowDosePET")
    widget.ui.inputSelector._userSelect("LowDosePET")
    before = scene_state(scene)
    widget.ui.applyButton.click()
    run = widget.controller.run
    pid = run.job.proc.pid
    pump(lambda: widget.ui.progressBar.value > 0 or not widget.controller.busy, 120)
    assert widget.controller.busy, "job ended before it could be cancelled"
    widget.ui.applyButton.click()                          # the button reads Cancel now
    pump(lambda: not widget.controller.busy, 30)
    assert "Cancelled" in widget.ui.statusLabel.text
    assert not process_alive(pid)
    assert scene_state(scene) == before
