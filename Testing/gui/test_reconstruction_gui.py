"""PET Reconstruction module as Slicer runs it."""

import numpy as np

from guitools import add_volume, pump, scene_state


MODULE = "ReconstructionModule"


def phantom():
    arr = np.zeros((8, 48, 48), np.float32)
    yy, xx = np.mgrid[:48, :48]
    arr[:, (yy - 24) ** 2 + (xx - 24) ** 2 < 18 ** 2] = 1.0
    return arr


def test_panel_builds_and_path_edit_drives_apply(widget, tmp_path):
    # Guards: `dataFile: str` bound to a ctkPathLineEdit made connectGui raise while the panel was built
    # (the wrapper's ctkPathLineEdit connector takes pathlib types only).
    assert widget._parameterNode.operation == "reconstruct"
    assert not widget.ui.applyButton.enabled
    sino = tmp_path / "scan.npz"
    sino.write_bytes(b"not really a sinogram")
    widget.ui.dataFileLineEdit.currentPath = str(sino)
    assert str(widget._parameterNode.dataFile) == str(sino)
    assert widget.ui.applyButton.enabled
    widget.ui.dataFileLineEdit.currentPath = str(tmp_path / "missing.npz")
    assert not widget.ui.applyButton.enabled


def test_lowdose_runs_on_chosen_device_and_references_input(widget, scene):
    # Guards: the device choice of the panel was never passed to the engine.
    node = add_volume(phantom(), "FullDosePET", spacing=(4.0, 4.0, 4.0))
    combo = widget.ui.operationComboBox
    combo.currentIndex = combo.findText("Simulate low-dose PET")
    assert widget._parameterNode.operation == "lowdose"
    assert not widget.ui.lowDoseCollapsibleButton.collapsed and widget.ui.reconCollapsibleButton.collapsed
    widget.ui.lowDoseInputSelector._userSelect("FullDosePET")
    widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")
    button = widget.ui.applyButton
    button.click()
    args = widget.controller.run.job.args
    assert args[args.index("--device") + 1] == "cpu"
    pump(lambda: not widget.controller.busy, 180)
    assert "Done" in widget.ui.statusLabel.text, widget.ui.statusLabel.text
    out = widget._parameterNode.outputVolume
    assert out is not None and out.GetNodeReference("PETWorkbench.input") is node
    import slicer
    low = slicer.util.arrayFromVolume(out)
    assert abs(low[phantom() > 0.5].mean() - 1.0) < 0.2


def test_bad_reconstruction_file_shows_error_and_keeps_scene(widget, scene, tmp_path, errors):
    # Guards: the panel failed while it was built (ctkPathLineEdit bound to str), so no file could be given.
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"\x00" * 100)
    widget.ui.dataFileLineEdit.currentPath = str(bad)
    before = scene_state(scene)
    widget.ui.applyButton.click()
    pump(lambda: not widget.controller.busy, 120)
    assert errors.records, "no error was shown"
    assert "Traceback" not in errors.records[-1].getMessage()
    assert scene_state(scene) == before
