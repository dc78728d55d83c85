"""PET Reconstruction: OSEM from list-mode or sinograms, low-dose acquisition simulation, SR4ZCT super-resolution.

Scripting from Slicer's Python console::

    logic = slicer.util.getModuleLogic("ReconstructionModule")
    img = logic.reconstruct("/data/PET_ACQ_small.l.hdr.STIR", iterations=4, subsets=8)   # list-mode -> volume
    low = logic.simulateLowDose(slicer.util.getNode("PET"), drf=10, seed=1)              # 10 % of the counts
    sr = logic.superResolve(slicer.util.getNode("ThickCT"))                                # SR4ZCT

Each returns a new volume node (or fills the one given), referenced to its input.
"""

import os
from pathlib import Path
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from PETWorkbenchSlicer.slicer_bridge import ModuleWidgetMixin

OPERATIONS = ("reconstruct", "lowdose", "sr4zct")


class ReconstructionModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PET Reconstruction")
        self.parent.categories = ["PETWorkbench"]
        self.parent.dependencies = []
        self.parent.contributors = ["PETWorkbench developers"]
        self.parent.helpText = _(
            "Reconstruct PET with OSEM from Siemens PETLINK list-mode or sinograms (2D multi-slice after "
            "rebinning, attenuation, PSF, normalisation, randoms and scatter), simulate a low-dose acquisition "
            "(binomial thinning of counts by a dose reduction factor, as DRMC made its data), and improve "
            "through-plane resolution of thick-slice volumes with self-supervised SR4ZCT. Research use only.")
        self.parent.acknowledgementText = _(
            "OSEM: Hudson & Larkin, IEEE TMI 1994. Low-dose simulation: DRMC (Yang et al., MICCAI 2023). SR4ZCT: "
            "self-supervised through-plane resolution enhancement for CT images with arbitrary resolution and "
            "overlap (MLMI 2023).")


@parameterNodeWrapper
class ReconstructionModuleParameterNode:
    operation: Annotated[str, Choice(list(OPERATIONS))] = "reconstruct"
    dataFile: Path                     # ctkPathLineEdit: the wrapper's connector takes pathlib types only
    timeWindow: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    iterations: Annotated[int, WithinRange(1, 100)] = 4
    subsets: Annotated[int, WithinRange(1, 64)] = 8
    postFilter: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
    lowDoseInput: vtkMRMLScalarVolumeNode
    drf: Annotated[float, WithinRange(1.0, 1000.0)] = 10.0
    seed: Annotated[int, WithinRange(0, 1000000)] = 0
    srInput: vtkMRMLScalarVolumeNode
    srEpochs: Annotated[int, WithinRange(1, 1000)] = 20
    outputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"


class ReconstructionModuleWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    moduleName = "ReconstructionModule"
    family = None

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logicClass = ReconstructionModuleLogic

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi()
        self.ui.operationComboBox.connect("currentIndexChanged(int)", self.onOperationChanged)
        self.onOperationChanged(self.ui.operationComboBox.currentIndex)

    def onOperationChanged(self, index):
        op = OPERATIONS[max(index, 0)]
        if self._parameterNode:
            self._parameterNode.operation = op
        self.ui.reconCollapsibleButton.collapsed = op != "reconstruct"
        self.ui.lowDoseCollapsibleButton.collapsed = op != "lowdose"
        self.ui.srCollapsibleButton.collapsed = op != "sr4zct"
        self._checkCanApply()

    def canApply(self, p):
        if p.operation == "reconstruct" and not Path(p.dataFile).is_file():
            return False, "Choose a list-mode or sinogram file"
        if p.operation == "lowdose" and not p.lowDoseInput:
            return False, "Select the PET volume to thin"
        if p.operation == "sr4zct" and not p.srInput:
            return False, "Select the thick-slice volume"
        return True, ""

    def startRun(self):
        p = self._parameterNode
        common = dict(outputVolumeNode=p.outputVolume, device=p.device, wait=False, progress=self.controller.progress)
        if p.operation == "reconstruct":
            return self.logic.reconstruct(str(p.dataFile), iterations=p.iterations, subsets=p.subsets,
                                          postFilterMm=p.postFilter, timeWindow=p.timeWindow or None, **common)
        if p.operation == "lowdose":
            return self.logic.simulateLowDose(p.lowDoseInput, drf=p.drf, seed=p.seed, **common)
        return self.logic.superResolve(p.srInput, epochs=p.srEpochs, **common)

    def onRunSucceeded(self, node):
        self._parameterNode.outputVolume = node
        slicer.util.setSliceViewerLayers(background=node, fit=True)


class ReconstructionModuleLogic(ScriptedLoadableModuleLogic):
    """MRML <-> reconstruction engine."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return ReconstructionModuleParameterNode(super().getParameterNode())

    def _run(self, command, request, inputNode, outputVolumeNode, defaultName, wait, progress, log, image=None):
        """Run ``command`` with ``request`` (its typed request; ``input`` and ``out`` are set here to files in the
        worker's temporary folder)."""
        import dataclasses
        from PETWorkbenchLib import imageio
        from PETWorkbenchLib.requests import to_argv
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchSlicer.slicer_bridge import EngineRun

        def prepare(tmp):
            files = {"out": os.path.join(tmp, "output.nii")}
            if image is not None:
                files["input"] = os.path.join(tmp, "input.nii")
                imageio.write_image(image, files["input"])
            return to_argv(dataclasses.replace(request, **files))

        def finish(tmp, result):
            output = imageio.read_image(os.path.join(tmp, "output.nii"), "engine output")
            node = mrml.image_to_volume(output, outputVolumeNode,
                                        name=None if outputVolumeNode else defaultName)
            if inputNode is not None:
                mrml.reference_result(node, inputNode)
            for k, v in (result or {}).items():
                if isinstance(v, (int, float, str)):
                    node.SetAttribute(f"PETWorkbench.{k}", str(v))
            return node

        run = EngineRun([command], prepare=prepare, finish=finish, progress=progress, log=log)
        return run.wait() if wait else run

    def reconstruct(self, dataFile, outputVolumeNode=None, iterations=4, subsets=8, postFilterMm=0.0,
                    timeWindow=None, device="auto", wait=True, progress=None, log=None):
        """OSEM reconstruction of a Siemens mMR PETLINK list-mode file (.l.hdr / .l; prompts minus delays,
        optional time window in seconds from the start) or of a 2D multi-slice sinogram file (.npz)."""
        from PETWorkbenchLib.errors import InputError
        from ReconstructionModuleLib.cli import ListModeRequest, ReconstructRequest
        dataFile = str(dataFile) if dataFile else ""
        if not dataFile or not os.path.isfile(dataFile):
            raise InputError(f"Data file not found: {dataFile}")
        if dataFile.endswith(".npz"):
            command = "reconstruct"
            request = ReconstructRequest(sinogram=dataFile, out="", post_filter=float(postFilterMm),
                                         iterations=int(iterations), subsets=int(subsets), device=device)
        else:
            command = "listmode"
            request = ListModeRequest(header=dataFile, out="", iterations=int(iterations), subsets=int(subsets),
                                      time_window=(0.0, float(timeWindow)) if timeWindow else None, device=device)
        name = os.path.basename(dataFile).split(".")[0] + " OSEM"
        return self._run(command, request, None, outputVolumeNode, name, wait, progress, log)

    def simulateLowDose(self, inputVolumeNode, drf=10.0, seed=0, outputVolumeNode=None, device="auto", wait=True,
                        progress=None, log=None):
        """Image-domain low-dose simulation: forward-project, Poisson counts, binomial thinning by ``drf``, OSEM."""
        from PETWorkbenchLib.errors import InputError
        from PETWorkbenchSlicer import mrml
        from ReconstructionModuleLib.cli import LowDoseRequest
        if drf < 1:
            raise InputError(f"Dose reduction factor must be >= 1, got {drf}")
        image = mrml.volume_to_image(inputVolumeNode, dtype="float32")
        request = LowDoseRequest(input="", out="", drf=float(drf), seed=int(seed), device=device)
        return self._run("lowdose", request, inputVolumeNode, outputVolumeNode,
                         f"{inputVolumeNode.GetName()} DRF{drf:g}", wait, progress, log, image=image)

    def superResolve(self, inputVolumeNode, outputVolumeNode=None, epochs=20, device="auto", wait=True,
                     progress=None, log=None):
        """SR4ZCT through-plane super-resolution (self-supervised on the volume itself)."""
        from PETWorkbenchSlicer import mrml
        from ReconstructionModuleLib.cli import SR4ZCTRequest
        image = mrml.volume_to_image(inputVolumeNode, dtype="float32")
        try:
            thickness = float(inputVolumeNode.GetAttribute("DICOM.SliceThickness") or "nan")
        except ValueError:      # not a number: the engine reads the thickness from the spacing instead
            thickness = float("nan")
        request = SR4ZCTRequest(input="", out="", epochs=int(epochs), device=device,
                                thickness=thickness if thickness == thickness else None)
        return self._run("sr4zct", request, inputVolumeNode, outputVolumeNode, f"{inputVolumeNode.GetName()} SR4ZCT",
                         wait, progress, log, image=image)


class ReconstructionModuleTest(ScriptedLoadableModuleTest):
    """Slicer self-test: low-dose simulation of a small phantom keeps the mean and adds noise."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_lowdose_phantom()
        self.test_widget_apply()

    def test_lowdose_phantom(self):
        import numpy as np
        import SimpleITK as sitk
        from PETWorkbenchSlicer import mrml
        arr = np.zeros((8, 48, 48), np.float32)
        yy, xx = np.mgrid[:48, :48]
        arr[:, (yy - 24) ** 2 + (xx - 24) ** 2 < 18 ** 2] = 1.0
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((4.0, 4.0, 4.0))
        node = mrml.image_to_volume(img, name="phantom")
        low = ReconstructionModuleLogic().simulateLowDose(node, drf=10, seed=1, device="cpu")
        out = slicer.util.arrayFromVolume(low)
        assert out.shape == arr.shape
        inside = arr > 0.5
        assert abs(out[inside].mean() - 1.0) < 0.15
        self.delayDisplay("Reconstruction low-dose test passed")

    def test_widget_apply(self):
        import numpy as np
        from PETWorkbenchSlicer.slicer_bridge import self_test_widget_apply
        arr = np.zeros((8, 48, 48), np.float32)
        yy, xx = np.mgrid[:48, :48]
        arr[:, (yy - 24) ** 2 + (xx - 24) ** 2 < 18 ** 2] = 1.0
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "phantom")
        node.SetSpacing(4.0, 4.0, 4.0)
        slicer.util.updateVolumeFromArray(node, arr)

        def select(widget):
            widget.ui.operationComboBox.currentIndex = widget.ui.operationComboBox.findText("Simulate low-dose PET")
            widget.ui.lowDoseInputSelector.setCurrentNode(node)
            widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")

        widget = self_test_widget_apply("ReconstructionModule", select)
        out = widget._parameterNode.outputVolume
        assert out is not None and out.GetNodeReference("PETWorkbench.input") is node
        self.delayDisplay("Reconstruction widget test passed")
