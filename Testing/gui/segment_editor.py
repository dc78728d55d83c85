"""Stand-ins for the C++ side of the Segment Editor that a scripted effect talks to, on slicer-core's real MRML.

* ``qSlicerSegmentEditorScriptedEffect``: Slicer Modules/Loadable/Segmentations/EditorEffects/
  qSlicerSegmentEditorAbstractEffect.h + qSlicerSegmentEditorScriptedEffect.h. Properties name, title, perSegment,
  requireSegments, showEffectCursorInSliceView/ThreeDView, captureMouseMoveEventsInSliceView/ThreeDView;
  Q_INVOKABLEs used by effects: parameterSetNode(), scene(), addOptionsWidget(QWidget|QLayout),
  addLabeledOptionsWidget(QString, QWidget|QLayout), optionsFrame(), optionsLayout(), saveStateForUndo(),
  modifySelectedSegmentByLabelmap(labelmap, mode[, extent][, bypassMasking]), modifySegmentByLabelmap(node,
  segmentID, labelmap, mode[, bypassMasking]), xyToRas(QPoint, sliceWidget), xyzToRas, rasToXy, xyToIjk,
  parameter/setParameter/integerParameter/doubleParameter, setPythonSource(path), self(). The ModificationMode enum
  is on ``slicer.qSlicerSegmentEditorAbstractEffect``. Modifications go through Slicer's own
  vtkSlicerSegmentationsModuleLogic::SetBinaryLabelmapToSegment (Add -> MERGE_MAX, Set -> REPLACE, Remove ->
  MERGE_MIN of the inverted modifier), as qSlicerSegmentEditorAbstractEffect.cxx does; source-intensity masking
  and overwrite-other-segments options are not modelled.
* ``SegmentEditor``: the undo of qMRMLSegmentEditorWidget (vtkSegmentationHistory: saveStateForUndo -> SaveState,
  undo -> RestorePreviousState).
* ``qMRMLSliceWidget``: className() "qMRMLSliceWidget" and a real vtkMRMLSliceNode whose XYToRAS maps clicks.
"""

import importlib.util
import sys

import vtk
from PySide6 import QtCore, QtGui, QtWidgets

from pythonqt import PythonQtMixin, wrap_class


class qSlicerSegmentEditorAbstractEffect:
    """Enum holder (ModificationMode, ConfirmationResult) as PythonQt exposes it on the class."""
    ModificationModeSet, ModificationModeAdd, ModificationModeRemove, ModificationModeRemoveAll = 0, 1, 2, 3
    NotConfirmed, ConfirmedWithoutDialog, ConfirmedWithDialog = 0, 1, 2


class qMRMLSliceWidget(PythonQtMixin, QtWidgets.QWidget):
    _cpp_name = "qMRMLSliceWidget"

    def __init__(self, scene, layout_name="Red", size=(400, 400)):
        import slicer
        QtWidgets.QWidget.__init__(self)
        self._node = slicer.vtkMRMLSliceNode()
        self._node.SetLayoutName(layout_name)
        self._node.SetName(layout_name)
        scene.AddNode(self._node)
        self._node.SetOrientationToAxial()
        self._node.SetDimensions(size[0], size[1], 1)
        self._node.SetFieldOfView(400.0, 400.0, 1.0)

    def mrmlSliceNode(self):
        return self._node

    def jump_to(self, ras):
        self._node.JumpSliceByCentering(*ras)
        self._node.UpdateMatrices()

    def ras_to_xy(self, ras):
        m = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(self._node.GetXYToRAS(), m)
        xy = m.MultiplyPoint(list(ras) + [1.0])
        return int(round(xy[0])), int(round(xy[1]))


class SegmentEditor:
    """Undo/redo of the segment editor widget for one segmentation node."""

    def __init__(self, segmentationNode):
        import slicer
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetSegmentation(segmentationNode.GetSegmentation())

    def saveStateForUndo(self):
        self.history.SaveState()

    def undo(self):
        if not self.history.IsRestorePreviousStateAvailable():
            raise AssertionError("nothing to undo")
        self.history.RestorePreviousState()


class qSlicerSegmentEditorScriptedEffect(PythonQtMixin, QtCore.QObject):
    _cpp_name = "qSlicerSegmentEditorScriptedEffect"

    def __init__(self, parent=None):
        QtCore.QObject.__init__(self, parent)
        self._self = None
        self._paramNode = None
        self._editor = None
        self._frame = wrap_class(QtWidgets.QFrame)()
        self._layout = wrap_class(QtWidgets.QFormLayout)(self._frame)
        self._params = {}

    def _prop(key, default, t):
        return QtCore.Property(t, lambda s: getattr(s, "_" + key, default), lambda s, v: setattr(s, "_" + key, v))

    name = _prop("name", "", str)
    title = _prop("title", "", str)
    perSegment = _prop("perSegment", True, bool)
    requireSegments = _prop("requireSegments", True, bool)
    showEffectCursorInSliceView = _prop("showEffectCursorInSliceView", True, bool)
    showEffectCursorInThreeDView = _prop("showEffectCursorInThreeDView", False, bool)
    captureMouseMoveEventsInSliceView = _prop("captureMouseMoveEventsInSliceView", False, bool)
    captureMouseMoveEventsInThreeDView = _prop("captureMouseMoveEventsInThreeDView", False, bool)
    del _prop

    # -- scripted-effect plumbing (qSlicerSegmentEditorScriptedEffect::setPythonSource)
    def setPythonSource(self, path):
        spec = importlib.util.spec_from_file_location("PETWorkbenchEffectUnderTest", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        self._self = mod.SegmentEditorEffect(self)
        return True

    def self(self):
        return self._self

    def _attach(self, parameterSetNode, editor):
        self._paramNode, self._editor = parameterSetNode, editor

    # -- parameters and options
    def parameterSetNode(self):
        return self._paramNode

    def setParameterSetNode(self, node):
        self._paramNode = node

    def scene(self):
        return self._paramNode.GetScene() if self._paramNode else None

    def optionsFrame(self):
        return self._frame

    def optionsLayout(self):
        return self._layout

    def addOptionsWidget(self, w):
        if isinstance(w, QtWidgets.QLayout):
            self._layout.addRow(w)
        elif isinstance(w, QtWidgets.QWidget):
            self._layout.addRow(w)
        else:
            raise TypeError(f"addOptionsWidget takes a QWidget or QLayout, got {type(w).__name__}")

    def addLabeledOptionsWidget(self, label, w):
        if not isinstance(label, str) or not isinstance(w, (QtWidgets.QWidget, QtWidgets.QLayout)):
            raise TypeError("addLabeledOptionsWidget(QString, QWidget|QLayout)")
        self._layout.addRow(label, w)
        return self._layout.labelForField(w)

    def _key(self, name):
        return f"{self.name}.{name}"

    def parameter(self, name):
        return self._paramNode.GetAttribute(self._key(name)) or ""

    def integerParameter(self, name):
        return int(self.parameter(name) or 0)

    def doubleParameter(self, name):
        return float(self.parameter(name) or 0.0)

    def setParameter(self, name, value):
        self._paramNode.SetAttribute(self._key(name), str(value))

    def parameterDefined(self, name):
        return self._paramNode.GetAttribute(self._key(name)) is not None

    # -- editing
    def saveStateForUndo(self):
        self._editor.saveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, *rest):
        node = self._paramNode
        segment_id = node.GetSelectedSegmentID()
        if not segment_id:
            raise RuntimeError("no segment selected")
        extent = next((r for r in rest if isinstance(r, (list, tuple))), None)
        self._modify(node.GetSegmentationNode(), segment_id, labelmap, mode, extent)

    def modifySegmentByLabelmap(self, segmentationNode, segmentID, labelmap, mode, *rest):
        extent = next((r for r in rest if isinstance(r, (list, tuple))), None)
        self._modify(segmentationNode, segmentID, labelmap, mode, extent)

    def _modify(self, segmentationNode, segmentID, labelmap, mode, extent):
        import slicer
        if not isinstance(labelmap, slicer.vtkOrientedImageData):
            raise TypeError("modifier labelmap must be a vtkOrientedImageData")
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        E = qSlicerSegmentEditorAbstractEffect
        if mode == E.ModificationModeSet:
            merge = logic.MODE_REPLACE
        elif mode == E.ModificationModeAdd:
            merge = logic.MODE_MERGE_MAX
        elif mode == E.ModificationModeRemove:
            inverted = slicer.vtkOrientedImageData()
            inverted.DeepCopy(labelmap)
            from vtk.util import numpy_support
            arr = numpy_support.vtk_to_numpy(inverted.GetPointData().GetScalars())
            arr[:] = (arr == 0).astype(arr.dtype)
            labelmap, merge = inverted, logic.MODE_MERGE_MIN
        else:
            raise ValueError(f"modification mode {mode} is not modelled")
        ok = logic.SetBinaryLabelmapToSegment(labelmap, segmentationNode, segmentID, merge,
                                              *(tuple([tuple(extent)]) if extent else ()))
        if not ok:
            raise RuntimeError("SetBinaryLabelmapToSegment failed")

    # -- coordinates (qSlicerSegmentEditorAbstractEffect::xyToRas etc.: the slice node's XYToRAS, world RAS)
    @staticmethod
    def xyzToRas(xyz, sliceWidget):
        m = sliceWidget.mrmlSliceNode().GetXYToRAS()
        r = m.MultiplyPoint([xyz.x(), xyz.y(), xyz.z(), 1.0])
        return QtGui.QVector3D(r[0], r[1], r[2])

    @staticmethod
    def xyToRas(xy, sliceWidget):
        return qSlicerSegmentEditorScriptedEffect.xyzToRas(QtGui.QVector3D(xy.x(), xy.y(), 0.0), sliceWidget)

    @staticmethod
    def rasToXy(ras, sliceWidget):
        m = vtk.vtkMatrix4x4()
        vtk.vtkMatrix4x4.Invert(sliceWidget.mrmlSliceNode().GetXYToRAS(), m)
        xy = m.MultiplyPoint([ras.x(), ras.y(), ras.z(), 1.0])
        return QtCore.QPoint(int(round(xy[0])), int(round(xy[1])))

    @staticmethod
    def xyToIjk(xy, sliceWidget, image, parentTransformNode=None):
        ras = qSlicerSegmentEditorScriptedEffect.xyToRas(xy, sliceWidget)
        world_to_local = vtk.vtkGeneralTransform()
        if parentTransformNode is not None:
            parentTransformNode.GetTransformFromWorld(world_to_local)
        local = world_to_local.TransformPoint([ras.x(), ras.y(), ras.z()])
        m = vtk.vtkMatrix4x4()
        image.GetWorldToImageMatrix(m)
        ijk = m.MultiplyPoint(list(local) + [1.0])
        return QtGui.QVector3D(*(float(round(c)) for c in ijk[:3]))


def activate_effect(effect_path, parameterSetNode):
    """Create, register-and-set-up and activate a scripted effect as the Segment Editor does; returns
    (scriptedEffect, python effect, editor)."""
    scripted = qSlicerSegmentEditorScriptedEffect(None)
    scripted.setPythonSource(effect_path)
    editor = SegmentEditor(parameterSetNode.GetSegmentationNode())
    scripted._attach(parameterSetNode, editor)
    effect = scripted.self()
    effect.setupOptionsFrame()
    if hasattr(effect, "activate"):
        effect.activate()
    return scripted, effect, editor


def click(effect, sliceWidget, ras, event=vtk.vtkCommand.LeftButtonPressEvent):
    """A left click in the slice view at world position ``ras``, delivered as the editor delivers it."""
    sliceWidget.jump_to(ras)
    xy = sliceWidget.ras_to_xy(ras)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetEventPosition(*xy)
    return effect.processInteractionEvents(interactor, event, sliceWidget)


def segment_array(segmentationNode, segmentId, referenceVolumeNode):
    import slicer
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode)


__all__ = ["qSlicerSegmentEditorAbstractEffect", "qSlicerSegmentEditorScriptedEffect", "qMRMLSliceWidget",
           "SegmentEditor", "activate_effect", "click", "segment_array"]
