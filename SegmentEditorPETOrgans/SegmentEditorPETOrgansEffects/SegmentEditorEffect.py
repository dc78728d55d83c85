"""Segment Editor effect "PET organs": click inside an organ on a PET slice; the organ predicted by LDOS under
the click (its connected component) is added to the selected segment, with Segment Editor undo.

The prediction is computed once per source volume (in the worker process, cancellable) and cached; the
click-to-mask step is ``SegmentationModuleLib.region_at_click`` (engine code, tested headless).
"""

import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "PET organs"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._labels = {}          # source volume ID -> (numpy label array, modified time)
        self._run = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "SegmentEditorPETOrgans.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Add organs predicted on the PET (LDOS, no CT needed).<p>"
                "<b>Compute prediction</b> once for the source volume (PET in SUV), then <b>click</b> inside an "
                "organ in a slice view to add it to the selected segment, or <b>Apply to all organs</b> to create "
                "one segment per organ found. Undo works as usual.</html>")

    def setupOptionsFrame(self):
        from PETWorkbenchLib import models
        self.modelComboBox = qt.QComboBox()
        for e in models.registry("segmentation"):
            self.modelComboBox.addItem(e.title, e.id)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)
        self.computeButton = qt.QPushButton("Compute prediction")
        self.computeButton.connect("clicked()", self.onCompute)
        self.allButton = qt.QPushButton("Apply to all organs")
        self.allButton.connect("clicked()", self.onApplyAll)
        self.statusLabel = qt.QLabel("")
        self.progressBar = qt.QProgressBar()
        self.progressBar.setVisible(False)
        for w in (self.computeButton, self.allButton, self.progressBar, self.statusLabel):
            self.scriptedEffect.addOptionsWidget(w)

    # ----------------------------------------------------------------------------------- prediction (worker)
    def _source(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    def _prediction(self):
        node = self._source()
        if node is None:
            return None
        cached = self._labels.get(node.GetID())
        if cached and cached[1] == node.GetImageData().GetMTime():
            return cached[0]
        return None

    def onCompute(self):
        from PETWorkbenchLib.slicer_bridge import ensure_dependencies
        import SegmentationModule
        if self._run is not None:
            self._run.cancel()
            return
        node = self._source()
        if node is None:
            slicer.util.errorDisplay("Select a PET source volume first")
            return
        ensure_dependencies()
        logic = SegmentationModule.SegmentationModuleLogic()
        self.progressBar.setVisible(True)
        self.computeButton.text = "Cancel"

        def progress(fraction, message):
            self.progressBar.setValue(int(100 * fraction))
            self.statusLabel.text = message

        self._run = logic.predictLabels(node, model=self.modelComboBox.currentData, wait=False, progress=progress)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", lambda: self._poll(node))
        self._timer.start()

    def _poll(self, node):
        import SimpleITK as sitk
        if self._run.poll():
            return
        self._timer.stop()
        run, self._run = self._run, None
        self.progressBar.setVisible(False)
        self.computeButton.text = "Compute prediction"
        if run.error is not None:
            self.statusLabel.text = f"Prediction failed: {run.error}"
            return
        self._labels[node.GetID()] = (sitk.GetArrayFromImage(run.value), node.GetImageData().GetMTime())
        self.statusLabel.text = "Prediction ready: click inside an organ"

    # ----------------------------------------------------------------------------------- editing
    def _modify(self, mask, segmentId=None, mode=None):
        """Add the boolean mask (source volume grid) to a segment through the Segment Editor (undoable)."""
        import numpy as np
        from vtk.util import numpy_support
        node = self._source()
        modifier = slicer.vtkOrientedImageData()
        modifier.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
        modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        modifier.GetPointData().GetScalars().DeepCopy(
            numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, np.uint8).ravel(), deep=True))
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        modifier.SetImageToWorldMatrix(m)
        mode = mode if mode is not None else slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeAdd
        if segmentId is None:
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode)
        else:
            self.scriptedEffect.modifySegmentByLabelmap(
                self.scriptedEffect.parameterSetNode().GetSegmentationNode(), segmentId, modifier, mode)

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if eventId != vtk.vtkCommand.LeftButtonPressEvent or viewWidget.className() != "qMRMLSliceWidget":
            return False
        labels = self._prediction()
        if labels is None:
            self.statusLabel.text = "Compute the prediction first"
            return True
        from SegmentationModuleLib import region_at_click
        xy = callerInteractor.GetEventPosition()
        ras = self.xyToRas(xy, viewWidget)
        node = self._source()
        m = vtk.vtkMatrix4x4()
        node.GetRASToIJKMatrix(m)
        ijk = [int(round(c)) for c in m.MultiplyPoint(list(ras) + [1.0])[:3]]
        mask = region_at_click(labels, None, ijk)
        if not mask.any():
            self.statusLabel.text = "No organ predicted under the click"
            return True
        self.scriptedEffect.saveStateForUndo()
        self._modify(mask)
        self.statusLabel.text = f"Added {int(mask.sum())} voxels"
        return True

    def onApplyAll(self):
        labels = self._prediction()
        if labels is None:
            slicer.util.errorDisplay("Compute the prediction first")
            return
        from PETWorkbenchLib import mrml
        from PETWorkbenchLib.terminology import organ_specs
        seg_node = self.scriptedEffect.parameterSetNode().GetSegmentationNode()
        segmentation = seg_node.GetSegmentation()
        self.scriptedEffect.saveStateForUndo()
        for spec in organ_specs():
            mask = labels == spec["value"]
            if not mask.any():
                continue
            sid = segmentation.AddEmptySegment("", spec["name"], spec["color"])
            term = mrml.terminology_string(spec.get("terminology"))
            if term:
                segmentation.GetSegment(sid).SetTerminology(term)
            self._modify(mask, sid)
        self.statusLabel.text = "Added one segment per organ found"
