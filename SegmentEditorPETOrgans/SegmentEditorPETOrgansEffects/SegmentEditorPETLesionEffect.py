"""Segment Editor effect "PET lesion": click on a lesion in a PET slice view; the selected segment becomes the lesion
delineated by PE-MED (interactive network) or by a click-seeded threshold (SUV 2.5, 41 % / 50 % of SUVmax, PERCIST).

Left click adds (positive click), Ctrl + left click or right click removes (negative click). Every click is one
Segment Editor undo step and changes the selected segment only. The click-to-mask work is
``SegmentationModuleLib.lesion.LesionSession`` (engine code, tested headless); *Update lesion table* writes a table
node with SUVmax, SUVpeak, SUVmean, MTV and TLG of every lesion segment, with the liver SUVmean as the reference
region when the segmentation has a segment named "liver".
"""

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

TABLE_NAME = "PET lesion measures"


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "PET lesion"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._session = None           # the LesionSession of (volume, image MTime, segment, method)
        self._key = None
        self._predictors = {}          # model id -> PEMEDPredictor (loaded once)

    def clone(self):
        from PETWorkbenchSlicer.editor import clone_effect
        return clone_effect(__file__)

    def icon(self):
        from PETWorkbenchSlicer.editor import effect_icon
        return effect_icon(__file__)

    def helpText(self):
        return ("<html>Delineate a lesion on PET (source volume in SUV) with clicks.<p>"
                "<b>Left click</b> on the lesion adds, <b>Ctrl + left click</b> or <b>right click</b> removes; each "
                "click refines the selected segment and is one undo step. <b>Method</b>: PE-MED (interactive "
                "network, refines with every click) or a threshold (SUV 2.5, 41 % / 50 % of the lesion's SUVmax, "
                "PERCIST liver threshold: needs a segment named 'liver'). <b>Update lesion table</b> measures "
                "every segment.</html>")

    def setupOptionsFrame(self):
        from SegmentationModuleLib.lesion import METHOD_LABELS, METHODS
        self.methodComboBox = qt.QComboBox()
        for m in METHODS:
            self.methodComboBox.addItem(METHOD_LABELS[m], m)
        self.scriptedEffect.addLabeledOptionsWidget("Method:", self.methodComboBox)
        self.tableButton = qt.QPushButton("Update lesion table")
        self.tableButton.connect("clicked()", self.onUpdateTable)
        self.statusLabel = qt.QLabel("Click on a lesion")
        self.statusLabel.wordWrap = True
        for w in (self.tableButton, self.statusLabel):
            self.scriptedEffect.addOptionsWidget(w)

    # ----------------------------------------------------------------------------------- state
    def _nodes(self):
        p = self.scriptedEffect.parameterSetNode()
        return p.GetSourceVolumeNode(), p.GetSegmentationNode(), p.GetSelectedSegmentID()

    def _liver_mask(self, segNode, volume, exclude=None):
        from PETWorkbenchSlicer.editor import segment_mask
        segmentation = segNode.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(i)
            if sid != exclude and segmentation.GetSegment(sid).GetName().strip().lower() == "liver":
                mask = segment_mask(segNode, sid, volume)
                return mask if mask.any() else None
        return None

    def _session_for(self, volume, segNode, segmentId):
        """The click session of this volume/segment/method, continued from the segment as it is now (after an
        undo or an edit with another effect, the session follows the segment)."""
        from PETWorkbenchSlicer.editor import segment_mask
        from PETWorkbenchSlicer.slicer_bridge import pet_volume_in_suv
        from SegmentationModuleLib.lesion import DEFAULT_MODEL, LesionSession, PEMEDPredictor
        import numpy as np
        method = self.methodComboBox.currentData
        key = (volume.GetID(), volume.GetImageData().GetMTime(), segNode.GetID(), segmentId, method)
        current = segment_mask(segNode, segmentId, volume)
        s = self._session
        if s is not None and self._key == key:
            if np.array_equal(s.mask, current):
                return s
            if s._undo and np.array_equal(s._undo[-1][0], current):   # the Segment Editor undid our last click
                s.undo()
                return s
        image, _, _ = pet_volume_in_suv(volume)
        model = None
        if method == "pemed":
            model = self._predictors.get(DEFAULT_MODEL)
            if model is None:
                model = self._predictors[DEFAULT_MODEL] = PEMEDPredictor(DEFAULT_MODEL)
        liver = self._liver_mask(segNode, volume, exclude=segmentId)
        self._session = LesionSession(image, method, model=model, liver_mask=liver, initial_mask=current)
        self._key = key
        return self._session

    # ----------------------------------------------------------------------------------- clicks
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            positive = not callerInteractor.GetControlKey()
        elif eventId == vtk.vtkCommand.RightButtonPressEvent:
            positive = False
        else:
            return False
        volume, segNode, segmentId = self._nodes()
        if volume is None:
            self.statusLabel.text = "Select a PET source volume (in SUV) first"
            return True
        if not segmentId:
            self.statusLabel.text = "Select a segment first"
            return True
        from PETWorkbenchLib.errors import PETWorkbenchError
        from PETWorkbenchSlicer.editor import mask_to_modifier, world_to_ijk
        try:
            ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)
            ijk = world_to_ijk(volume, ras)
            session = self._session_for(volume, segNode, segmentId)
            before = session.mask
            mask = session.add_click(ijk, positive)
        except (PETWorkbenchError, ValueError) as e:   # bad volume, click off the lesion, missing liver...
            self.statusLabel.text = str(e)
            return True
        try:
            self.scriptedEffect.saveStateForUndo()
            self.scriptedEffect.modifySelectedSegmentByLabelmap(
                mask_to_modifier(mask, volume, segNode), slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        except Exception as e:
            session.undo()
            self.statusLabel.text = f"The segment could not be changed: {e}"
            return True
        change = int(mask.sum()) - int(before.sum())
        self.statusLabel.text = (f"{'Added' if positive else 'Removed'}: segment {int(mask.sum())} voxels "
                                 f"({change:+d}); {session.last_seconds * 1000:.0f} ms")
        return True

    # ----------------------------------------------------------------------------------- lesion table
    def onUpdateTable(self):
        from PETWorkbenchLib.errors import PETWorkbenchError
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchSlicer.editor import segment_mask
        from PETWorkbenchSlicer.slicer_bridge import pet_volume_in_suv
        from SegmentationModuleLib.lesion import lesion_measures
        import SimpleITK as sitk
        volume, segNode, _ = self._nodes()
        if volume is None:
            self.statusLabel.text = "Select a PET source volume (in SUV) first"
            return None
        try:
            image, _, _ = pet_volume_in_suv(volume)
        except PETWorkbenchError as e:
            self.statusLabel.text = str(e)
            return None
        suv = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()[::-1]
        liver = self._liver_mask(segNode, volume)
        rows = []
        segmentation = segNode.GetSegmentation()
        for i in range(segmentation.GetNumberOfSegments()):
            sid = segmentation.GetNthSegmentID(i)
            name = segmentation.GetSegment(sid).GetName()
            if name.strip().lower() == "liver":
                continue
            mask = segment_mask(segNode, sid, volume)
            if not mask.any():
                continue
            rows.append({"segment": name, **lesion_measures(suv, mask, spacing, liver)})
        if not rows:
            self.statusLabel.text = "No non-empty lesion segment to measure"
            return None
        scene = segNode.GetScene()
        table = scene.GetFirstNodeByName(TABLE_NAME)
        table = mrml.table_from_rows(rows, tableNode=table if table is not None and table.IsA("vtkMRMLTableNode")
                                     else None, name=TABLE_NAME, scene=scene)
        mrml.reference_result(table, volume)
        self.statusLabel.text = f"Lesion table: {len(rows)} segment(s)" + ("" if liver is not None else
                                                                          " (no 'liver' segment: no reference)")
        return table
