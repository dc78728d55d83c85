"""Segment Editor effect "PET organs": click inside an organ on a PET slice; the organ predicted by LDOS under
the click (its connected component) is added to the selected segment, with Segment Editor undo.

The prediction is computed once per source volume (in the worker process, cancellable) and cached; the
click-to-mask step is ``SegmentationModuleLib.region_at_click`` (engine code, tested headless).
"""

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
        from PETWorkbenchSlicer.editor import clone_effect
        return clone_effect(__file__)

    def icon(self):
        from PETWorkbenchSlicer.editor import effect_icon
        return effect_icon(__file__)

    def helpText(self):
        return ("<html>Add organs predicted on the PET (LDOS, no CT needed).<p>"
                "<b>Compute prediction</b> once for the source volume (PET in SUV), then <b>click</b> inside an "
                "organ in a slice view to add it to the selected segment, or <b>Apply to all organs</b> to create "
                "one segment per organ found. Undo works as usual.</html>")

    def setupOptionsFrame(self):
        from PETWorkbenchLib import models
        self.modelComboBox = qt.QComboBox()
        from SegmentationModuleLib import segments_organs
        for e in models.registry("segmentation"):
            if not segments_organs(e):                 # the Fake-FDPET denoiser and PE-MED give no organs
                continue
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
        if self._run is not None:
            self._run.cancel()
            return
        node = self._source()
        if node is None:
            slicer.util.errorDisplay("Select a PET source volume first")
            return
        try:
            from PETWorkbenchSlicer.slicer_bridge import ensure_dependencies
            import SegmentationModule
            ensure_dependencies()
            logic = SegmentationModule.SegmentationModuleLogic()

            def progress(fraction, message):
                self.progressBar.setValue(int(100 * fraction))
                self.statusLabel.text = message

            self._run = logic.predictLabels(node, model=self.modelComboBox.currentData, wait=False,
                                            progress=progress)
        except Exception as e:                          # bad input, missing model...: say so, panel stays usable
            self._run = None
            self._resetPanel(f"Prediction not started: {e}")
            slicer.util.errorDisplay(f"Cannot compute the organ prediction: {e}")
            return
        self.progressBar.setVisible(True)
        self.computeButton.text = "Cancel"
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", lambda: self._poll(node))
        self._timer.start()

    def _resetPanel(self, message):
        self.progressBar.setVisible(False)
        self.computeButton.text = "Compute prediction"
        self.computeButton.enabled = True
        self.statusLabel.text = message

    def _poll(self, node):
        try:
            if self._run.poll():
                return
        except Exception as e:                          # the worker's output could not be read
            self._run.error = self._run.error or e
        self._timer.stop()
        run, self._run = self._run, None
        if run.error is not None:
            self._resetPanel(f"Prediction failed: {run.error}")
            if type(run.error).__name__ != "Cancelled":
                slicer.util.errorDisplay(f"Organ prediction failed: {run.error}")
            return
        try:
            import SimpleITK as sitk
            self._labels[node.GetID()] = (sitk.GetArrayFromImage(run.value), node.GetImageData().GetMTime())
        except Exception as e:
            self._resetPanel(f"Prediction failed: {e}")
            slicer.util.errorDisplay(f"Organ prediction failed: {e}")
            return
        self._resetPanel("Prediction ready: click inside an organ")

    # ----------------------------------------------------------------------------------- editing
    def _modify(self, mask, segmentId=None, mode=None):
        """Add the boolean mask (source volume grid) to a segment through the Segment Editor (undoable)."""
        from PETWorkbenchSlicer.editor import mask_to_modifier
        modifier = mask_to_modifier(mask, self._source(), self.scriptedEffect.parameterSetNode().GetSegmentationNode())
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
        ras = self.xyToRas(xy, viewWidget)                    # world coordinates
        from PETWorkbenchSlicer.editor import world_to_ijk
        try:                                                  # world -> the volume's own RAS -> IJK
            ijk = [int(round(c)) for c in world_to_ijk(self._source(), ras)]
        except ValueError as e:
            self.statusLabel.text = str(e)
            return True
        if not all(0 <= c < n for c, n in zip(ijk, labels.shape[::-1])):
            self.statusLabel.text = "The click is outside the PET volume"
            return True
        mask = region_at_click(labels, None, ijk)
        if not mask.any():
            self.statusLabel.text = "No organ predicted under the click"
            return True
        try:
            self.scriptedEffect.saveStateForUndo()
            self._modify(mask)
        except ValueError as e:
            self.statusLabel.text = str(e)
            return True
        self.statusLabel.text = f"Added {int(mask.sum())} voxels"
        return True

    def onApplyAll(self):
        labels = self._prediction()
        if labels is None:
            slicer.util.errorDisplay("Compute the prediction first")
            return
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchLib.terminology import organ_specs
        from PETWorkbenchSlicer.mrml import load_into_slicer
        load_into_slicer()                        # so Slicer resolves the segments' terminology entries
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
