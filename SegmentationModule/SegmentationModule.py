"""PET Organ Segmentation: CT-free organ segmentation on (ultra-)low-dose PET with LDOS, and organ uptake.

Scripting from Slicer's Python console::

    logic = slicer.util.getModuleLogic("SegmentationModule")
    seg = logic.segment(slicer.util.getNode("PET"), organs=["liver", "spleen"])   # blocks
    table = seg.GetNodeReference("PETWorkbench.uptakeTable")                      # volume, SUVmean/max/peak

Existing segments are never changed unless ``overwrite=True``; nothing changes if the run fails or is cancelled.
The "PET organs" Segment Editor effect (module SegmentEditorPETOrgans) uses the same logic interactively.
"""

import os
from typing import Annotated

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from PETWorkbenchSlicer.slicer_bridge import ModuleWidgetMixin

class SegmentationModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PET Organ Segmentation (LDOS)")
        self.parent.categories = ["PETWorkbench"]
        self.parent.dependencies = []
        self.parent.contributors = ["PETWorkbench developers"]
        self.parent.helpText = _(
            "Segment 18 organs directly on low-dose or full-dose PET (no CT needed) and tabulate organ uptake "
            "(volume, SUVmean, SUVmax, SUVpeak). Segments carry SNOMED CT terminology. Research use only: not "
            "for diagnosis. The shipped model is a CPU-sized demonstration trained on simulated PET built on real "
            "CT anatomy (see Resources/Models.json).")
        self.parent.acknowledgementText = _(
            "Method: 'Low-dose PET organ segmentation without CT' (LDOS): shared residual encoder with a denoising "
            "and a segmentation decoder, trained jointly (arXiv:2503.03786, yezanting/LDOS).")


@parameterNodeWrapper
class SegmentationModuleParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    overwrite: bool = False
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"


class SegmentationModuleWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    moduleName = "SegmentationModule"
    family = "segmentation"

    @staticmethod
    def modelFilter(entry):  # the Fake-FDPET denoiser and the interactive PE-MED model are not organ models
        from SegmentationModuleLib import segments_organs
        return segments_organs(entry)

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logicClass = SegmentationModuleLogic

    def setup(self):
        import qt
        from PETWorkbenchLib.terminology import organ_specs
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi()
        for spec in organ_specs():
            item = qt.QListWidgetItem(spec["name"].replace("_", " "))
            item.setData(qt.Qt.UserRole, spec["name"])
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            self.ui.organListWidget.addItem(item)

    def selectedOrgans(self):
        import qt
        items = [self.ui.organListWidget.item(i) for i in range(self.ui.organListWidget.count)]
        return [it.data(qt.Qt.UserRole) for it in items if it.checkState() == qt.Qt.Checked]

    def canApply(self, p):
        if not p.inputVolume:
            return False, "Select a PET volume"
        return True, ""

    def startRun(self):
        p = self._parameterNode
        organs = self.selectedOrgans()
        if not organs:
            raise ValueError("Select at least one organ")
        return self.logic.segment(p.inputVolume, p.outputSegmentation, organs=organs,
                                  model=self.selectedModel(), device=p.device,
                                  tableNode=p.outputTable, overwrite=p.overwrite, wait=False,
                                  progress=self.controller.progress)

    def onRunSucceeded(self, segmentationNode):
        p = self._parameterNode
        p.outputSegmentation = segmentationNode
        p.outputTable = segmentationNode.GetNodeReference("PETWorkbench.uptakeTable")
        if p.outputTable:
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(p.outputTable.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


class SegmentationModuleLogic(ScriptedLoadableModuleLogic):
    """MRML <-> engine for LDOS organ segmentation and organ uptake."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return SegmentationModuleParameterNode(super().getParameterNode())

    def segment(self, petVolumeNode, segmentationNode=None, organs=None, model=None, device="auto",
                tableNode=None, overwrite=False, wait=True, progress=None, log=None):
        """PET node (SUV) -> organ segments in ``segmentationNode`` (new if None) + uptake table node.

        Returns the segmentation node (``wait=True``) or an EngineRun. The uptake table is referenced from the
        segmentation node as "PETWorkbench.uptakeTable"; organs not found are listed in its attribute
        "PETWorkbench.missingOrgans".
        """
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchLib.errors import InputError
        from PETWorkbenchLib.terminology import organ_specs

        specs = organ_specs(organs)

        def finish(labels):
            import SimpleITK as sitk
            if not sitk.GetArrayViewFromImage(labels).any():
                raise InputError("The model found none of the requested organs in this volume (empty "
                                 "prediction). Is it a PET in SUV covering these organs?")
            seg, ids, missing = mrml.labelmap_to_segmentation(
                labels, specs, segmentationNode, referenceVolumeNode=petVolumeNode, overwrite=overwrite,
                name=f"{petVolumeNode.GetName()} organs")
            mrml.reference_result(seg, petVolumeNode)
            found = [s for s in specs if s["value"] in ids]
            table = self.organUptake(petVolumeNode, labels, found, tableNode)
            seg.SetNodeReferenceID("PETWorkbench.uptakeTable", table.GetID())
            seg.SetAttribute("PETWorkbench.missingOrgans", ",".join(s["name"] for s in specs
                                                                    if s["value"] in missing))
            return seg

        return self.predictLabels(petVolumeNode, organs=[s["name"] for s in specs] if organs else None,
                                  model=model, device=device, finish=finish, wait=wait, progress=progress, log=log)

    def predictLabels(self, petVolumeNode, organs=None, model=None, device="auto", finish=None, wait=True,
                      progress=None, log=None):
        """Run the model in the worker and return the predicted label image (SimpleITK, on the PET grid), or
        ``finish(labelImage)`` when given. Nothing in the scene is changed here."""
        from PETWorkbenchLib import imageio, models
        from PETWorkbenchLib.requests import to_argv
        from PETWorkbenchSlicer.slicer_bridge import EngineRun, pet_volume_in_suv
        from SegmentationModuleLib.cli import SegmentRequest
        model = model or models.default_model("segmentation")

        image, _, _ = pet_volume_in_suv(petVolumeNode)       # from the DICOM tags for a volume loaded from DICOM

        def prepare(tmp):
            request = SegmentRequest(input=os.path.join(tmp, "pet.nii"), output=os.path.join(tmp, "labels.nii"),
                                     model=str(model), device=device, organs=",".join(organs or []))
            imageio.write_image(image, request.input)
            return to_argv(request)

        def read(tmp, result):
            labels = imageio.read_image(os.path.join(tmp, "labels.nii"), "engine output")
            return finish(labels) if finish else labels

        run = EngineRun(["segment"], prepare=prepare, finish=read, progress=progress, log=log)
        return run.wait() if wait else run

    def organUptake(self, petVolumeNode, labels, specs, tableNode=None):
        """Organ uptake table (volume ml, SUVmean, SUVmax, SUVpeak) from a label image or a segmentation node; a
        PET loaded from the DICOM database is in SUV by its series' tags."""
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchSlicer.slicer_bridge import pet_volume_in_suv
        from SegmentationModuleLib.uptake import organ_uptake
        if hasattr(labels, "IsA") and labels.IsA("vtkMRMLSegmentationNode"):
            labels, specs = mrml.segmentation_to_labelmap(labels, petVolumeNode)
        rows = organ_uptake(pet_volume_in_suv(petVolumeNode, check=False)[0], labels, specs)
        table = mrml.table_from_rows(rows, tableNode, name=f"{petVolumeNode.GetName()} organ uptake")
        mrml.reference_result(table, petVolumeNode)
        return table


class SegmentationModuleTest(ScriptedLoadableModuleTest):
    """Slicer self-test: segment a small simulated PET with the shipped CPU model; check the uptake table."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_uptake_table_matches_arrays()
        self.test_widget_apply_on_sample_pet()

    def test_uptake_table_matches_arrays(self):
        import numpy as np
        import SimpleITK as sitk
        from PETWorkbenchSlicer import mrml
        arr = np.full((20, 30, 30), 0.5, np.float32)
        arr[5:15, 5:15, 5:15] = 3.0
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((4.0, 4.0, 4.0))
        pet = mrml.image_to_volume(img, name="PET")
        lab = np.zeros(arr.shape, np.int16)
        lab[5:15, 5:15, 5:15] = 14
        limg = sitk.GetImageFromArray(lab)
        limg.CopyInformation(img)
        from PETWorkbenchLib.terminology import organ_specs
        table = SegmentationModuleLogic().organUptake(pet, limg, organ_specs(["liver"]))
        mean = table.GetTable().GetColumnByName("suv_mean").GetValue(0)
        assert abs(mean - 3.0) < 1e-4
        self.delayDisplay("Segmentation uptake test passed")

    def test_widget_apply_on_sample_pet(self):
        from PETWorkbenchSlicer.slicer_bridge import sample_data_path, self_test_widget_apply
        node = slicer.util.loadVolume(sample_data_path("SimulatedPET", "lowdose_pet.nii.gz"))

        def select(widget):
            widget.ui.inputSelector.setCurrentNode(node)
            widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findText("cpu")

        widget = self_test_widget_apply("SegmentationModule", select)
        seg = widget._parameterNode.outputSegmentation
        assert seg is not None and seg.GetSegmentation().GetNumberOfSegments() > 0
        assert seg.GetNodeReference("PETWorkbench.uptakeTable") is not None
        self.delayDisplay("Segmentation widget test passed")
