"""PET Synthesis: low-dose PET -> full-dose PET with DRMC (dynamic routing of experts, multi-center).

Scripting from Slicer's Python console::

    logic = slicer.util.getModuleLogic("SynthesisModule")
    out = logic.synthesize(slicer.util.getNode("LowDosePET"))            # blocks, returns the new volume node

The engine (SynthesisModuleLib) runs in a worker process; nothing in the scene changes unless the run succeeds.
"""

import json
import os
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from PETWorkbenchSlicer.slicer_bridge import ModuleWidgetMixin
from SynthesisModuleLib import DEFAULT_OVERLAP

class SynthesisModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PET Synthesis (DRMC)")
        self.parent.categories = ["PETWorkbench"]
        self.parent.dependencies = []
        self.parent.contributors = ["PETWorkbench developers"]
        self.parent.helpText = _(
            "Estimate a full-dose PET from a low-dose PET with DRMC, a generalist model that routes each image "
            "through a few of its experts so one model serves many centers. Input in SUV (or Bq/ml with weight "
            "and dose). Research use only: not for diagnosis. The shipped model is a CPU-sized demonstration "
            "trained on simulated data (see the model card in Resources/Models.json).")
        self.parent.acknowledgementText = _(
            "Method: Yang Z., Zhou Y., Zhang H., Wei B., Fan Y., Xu Y. 'DRMC: A Generalist Model with Dynamic "
            "Routing for Multi-Center PET Image Synthesis', MICCAI 2023 (arXiv:2307.05249). Model code follows the "
            "authors' public implementation (Apache-2.0) in structure.")
        slicer.app.connect("startupCompleted()", self.registerSampleData)

    def registerSampleData(self):
        from PETWorkbenchSlicer.slicer_bridge import register_sample_data
        register_sample_data()


@parameterNodeWrapper
class SynthesisModuleParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    units: Annotated[str, Choice(["SUV", "Bq/ml"])] = "SUV"
    patientWeight: Annotated[float, WithinRange(0.0, 400.0)] = 0.0
    injectedDose: Annotated[float, WithinRange(0.0, 2000.0)] = 0.0
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    patchSize: Annotated[int, WithinRange(0, 128)] = 0
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = DEFAULT_OVERLAP
    patchBatch: Annotated[int, WithinRange(1, 32)] = 4


class SynthesisModuleWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    moduleName = "SynthesisModule"
    family = "synthesis"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logicClass = SynthesisModuleLogic

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi()

    def canApply(self, p):
        if not p.inputVolume:
            return False, "Select a low-dose PET volume"
        if p.units == "Bq/ml" and (p.patientWeight <= 0 or p.injectedDose <= 0):
            return False, "Bq/ml input needs the patient weight and the injected dose"
        return True, ""

    def startRun(self):
        p = self._parameterNode
        return self.logic.synthesize(p.inputVolume, p.outputVolume, model=self.selectedModel(),
                                     device=p.device, patchSize=p.patchSize, overlap=p.overlap,
                                     patchBatch=p.patchBatch, units=p.units, patientWeight=p.patientWeight,
                                     injectedDose=p.injectedDose, wait=False, progress=self.controller.progress)

    def onRunSucceeded(self, outputNode):
        self._parameterNode.outputVolume = outputNode
        slicer.util.setSliceViewerLayers(background=outputNode)
        text = SynthesisModuleLogic.routingText(outputNode.GetAttribute("PETWorkbench.routing"))
        table = outputNode.GetNodeReference("PETWorkbench.lesionTable")
        if table is not None:
            flagged = outputNode.GetAttribute("PETWorkbench.lesionsFlagged") or "0"
            text += (f"\nLesion changes: {table.GetNumberOfRows()} hot spots, {flagged} flagged (changed more than "
                     f"the input's noise explains, or lost SUVpeak at a size this model's calibration cannot clear "
                     f"of flattening; table '{table.GetName()}', flagged points in the views)")
        self.ui.routingLabel.text = text


class SynthesisModuleLogic(ScriptedLoadableModuleLogic):
    """MRML <-> engine for DRMC synthesis. All heavy work happens in the worker process."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SynthesisModuleParameterNode(super().getParameterNode())

    def synthesize(self, inputVolumeNode, outputVolumeNode=None, model=None, device="auto", patchSize=None,
                   overlap=DEFAULT_OVERLAP, patchBatch=4, units="SUV", patientWeight=None, injectedDose=None, wait=True,
                   progress=None, log=None):
        """Low-dose PET node -> full-dose estimate in ``outputVolumeNode`` (new node if None), same grid and units
        as the input. A volume loaded from the DICOM database is converted to SUV with its series' tags (``units``,
        ``patientWeight`` and ``injectedDose`` are then not needed). ``patchSize`` None/0 uses the model's training
        patch (at 2 mm). ``wait=True`` returns the output node; otherwise an EngineRun to poll/cancel."""
        from PETWorkbenchLib import imageio, models
        from PETWorkbenchLib.requests import to_argv
        from PETWorkbenchSlicer import mrml
        from SynthesisModuleLib.cli import SynthesizeRequest
        from PETWorkbenchSlicer.slicer_bridge import EngineRun, pet_volume_in_suv
        model = model or models.default_model("synthesis")

        image, scale, units = pet_volume_in_suv(inputVolumeNode, units, patientWeight, injectedDose)

        def prepare(tmp):
            imageio.write_image(image, os.path.join(tmp, "input.nii"))
            return to_argv(SynthesizeRequest(
                input=os.path.join(tmp, "input.nii"), output=os.path.join(tmp, "output.nii"),
                routing_json=os.path.join(tmp, "routing.json"), lesions=os.path.join(tmp, "lesions.json"),
                model=str(model), device=device,
                overlap=float(overlap), sw_batch_size=int(patchBatch), patch=int(patchSize) if patchSize else None))

        def finish(tmp, result):
            out = imageio.read_image(os.path.join(tmp, "output.nii"), "engine output")
            if scale != 1.0:
                out = out / scale
            node = mrml.image_to_volume(out, outputVolumeNode,
                                        name=None if outputVolumeNode else f"{inputVolumeNode.GetName()} DRMC")
            mrml.reference_result(node, inputVolumeNode)
            node.SetAttribute("PETWorkbench.model", str(model))
            node.SetAttribute("PETWorkbench.units", units)
            routing_path = os.path.join(tmp, "routing.json")
            if os.path.exists(routing_path):
                with open(routing_path) as f:
                    node.SetAttribute("PETWorkbench.routing", f.read())
            self.lesionReport(node, os.path.join(tmp, "lesions.json"))
            return node

        run = EngineRun(["synthesize"], prepare=prepare, finish=finish, progress=progress, log=log)
        return run.wait() if wait else run

    def lesionReport(self, outputNode, reportPath):
        """Lesion-change table node and a point list at the flagged hot spots, both referenced from the output
        node ("PETWorkbench.lesionTable", "PETWorkbench.lesionMarkups") and replaced when it is recomputed."""
        from PETWorkbenchSlicer import mrml
        from SynthesisModuleLib.lesions import REASON_SIZE, report_rows
        if not os.path.exists(reportPath):  # an engine that wrote no report (older or stand-in)
            return None
        with open(reportPath) as f:
            report = json.load(f)
        name = outputNode.GetName()
        table = mrml.table_from_rows(report_rows(report), outputNode.GetNodeReference("PETWorkbench.lesionTable"),
                                     name=f"{name} lesion changes")
        table.SetAttribute("PETWorkbench.lesionRule", report["rule"])
        table.SetAttribute("PETWorkbench.threshold", json.dumps(report["threshold"]))
        mrml.reference_result(table, outputNode)
        outputNode.SetNodeReferenceID("PETWorkbench.lesionTable", table.GetID())
        flagged = [r for r in report["lesions"] if r["flagged"]]
        old = outputNode.GetNodeReference("PETWorkbench.lesionMarkups")
        if flagged or old is not None:
            points = mrml.points_to_markups(
                [r["center_lps"] for r in flagged],
                [f"L{r['id']} SUVpeak {r['suv_peak_change_pct']:+.0f}%"
                 + (" (size)" if r.get("flag_reason") == REASON_SIZE else "") for r in flagged], old,
                name=f"{name} flagged lesions")
            outputNode.SetNodeReferenceID("PETWorkbench.lesionMarkups", points.GetID())
        outputNode.SetAttribute("PETWorkbench.lesionsFlagged", str(len(flagged)))
        return table

    @staticmethod
    def routingText(routingJson):
        """One line per layer: the expert with the largest mean routing weight."""
        if not routingJson:
            return ""
        try:
            r = json.loads(routingJson)
        except json.JSONDecodeError:
            return ""
        banks, top1 = r.get("banks") or [], r.get("top1_fraction") or []
        if not banks or not top1:
            return "Baseline model (no routing)" if r.get("routed") is False else ""
        best = [max(range(len(f)), key=lambda m: f[m]) + 1 for f in top1]
        return "Most used expert per routing bank: " + ", ".join(f"{b} E{m}" for b, m in zip(banks, best))


class SynthesisModuleTest(ScriptedLoadableModuleTest):
    """Slicer self-test: runs the shipped CPU model on a small simulated PET."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_synthesis_on_small_phantom()
        self.test_widget_apply_on_sample_pet()

    def test_synthesis_on_small_phantom(self):
        import numpy as np
        import SimpleITK as sitk
        from PETWorkbenchSlicer import mrml
        rng = np.random.default_rng(0)
        arr = np.full((24, 40, 40), 0.5, np.float32)
        arr[8:16, 12:28, 12:28] = 2.5
        noisy = rng.poisson(arr * 20).astype(np.float32) / 20
        img = sitk.GetImageFromArray(noisy)
        img.SetSpacing((3.0, 3.0, 3.0))
        node = mrml.image_to_volume(img, name="LowDose")
        out = SynthesisModuleLogic().synthesize(node, device="cpu")
        result = slicer.util.arrayFromVolume(out)
        assert result.shape == noisy.shape and np.isfinite(result).all() and result.min() >= 0
        assert out.GetNodeReference("PETWorkbench.input") is node
        self.delayDisplay("Synthesis test passed")

    def test_widget_apply_on_sample_pet(self):
        from PETWorkbenchSlicer.slicer_bridge import sample_data_path, self_test_widget_apply
        node = slicer.util.loadVolume(sample_data_path("SimulatedPET", "lowdose_pet.nii.gz"))

        def select(widget):
            widget.ui.inputSelector.setCurrentNode(node)
            widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")

        widget = self_test_widget_apply("SynthesisModule", select)
        out = widget._parameterNode.outputVolume
        assert out is not None and out.GetNodeReference("PETWorkbench.input") is node
        self.delayDisplay("Synthesis widget test passed")
