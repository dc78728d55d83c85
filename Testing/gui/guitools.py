"""What the GUI tests do as a user would: open a module, pick nodes in selectors, press buttons, wait."""

import time

import numpy as np
from PySide6 import QtCore

import slicer_layer


def pump(condition, timeout=180.0):
    """Run the Qt event loop (timers fire, signals are delivered) until condition() is true."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached while running the event loop")
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.AllEvents, 50)
        time.sleep(0.02)


def open_module(name):
    """Slicer's way: the module is loaded (module class), its widget representation created (setup(), scene set)
    and entered (enter()). Returns the Python widget object."""
    module = slicer_layer.load_module(name)
    module._widget = None                      # a fresh widget per test (each test has its own scene)
    rep = module.widgetRepresentation()
    rep.enter()
    return rep.self()


def close_module(widget):
    rep = widget.parent
    rep.exit()
    if hasattr(widget, "cleanup"):
        widget.cleanup()


def add_volume(array, name, spacing=(3.0, 3.0, 3.0), origin=(0.0, 0.0, 0.0), cls="vtkMRMLScalarVolumeNode"):
    """A volume node (array in k, j, i order) in the current scene, as a user loading a file gets."""
    import slicer
    node = slicer.mrmlScene.AddNewNodeByClass(cls, name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def pet_phantom(shape=(24, 40, 40), seed=0):
    """A small low-dose PET in SUV: warm background, a hot block, Poisson noise."""
    rng = np.random.default_rng(seed)
    arr = np.full(shape, 0.5, np.float32)
    arr[8:16, 12:28, 12:28] = 2.5
    return (rng.poisson(arr * 20).astype(np.float32) / 20)


def scene_state(scene):
    """(class, name, id) of every node: compare before/after to prove nothing in the scene changed."""
    return sorted((scene.GetNthNode(i).GetClassName(), scene.GetNthNode(i).GetName() or "",
                   scene.GetNthNode(i).GetID()) for i in range(scene.GetNumberOfNodes()))


class ProgressRecorder:
    def __init__(self, bar):
        self.values = []
        bar.valueChanged.connect(self.values.append)


def run_apply(widget, timeout=300.0):
    """Press Apply, check it turns into Cancel with a visible progress bar, wait for the end."""
    button = widget.ui.applyButton
    rec = ProgressRecorder(widget.ui.progressBar)
    assert button.enabled, f"Apply is disabled: {button.toolTip}"
    button.click()
    assert widget.controller.busy, "pressing Apply did not start a job"
    assert button.text == "Cancel"
    assert not widget.ui.progressBar.isHidden()
    pump(lambda: not widget.controller.busy, timeout)
    assert button.text == "Apply"
    return rec.values


def process_alive(pid):
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
