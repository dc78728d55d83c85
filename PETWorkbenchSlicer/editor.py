"""What the PETWorkbench Segment Editor effects share: clicks in a slice view -> voxel of the source volume, and a
boolean mask on the source volume's grid -> the labelmap a scripted effect modifies a segment with (parent
transforms of the volume and the segmentation honoured; a non-linear one is refused with a clear message)."""

import os

import numpy as np
import slicer
import vtk

def clone_effect(effect_file):
    """A new scripted effect running ``effect_file`` (what a scripted effect's ``clone()`` returns)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects
    clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
    clonedEffect.setPythonSource(effect_file.replace("\\", "/"))
    return clonedEffect


def effect_icon(effect_file, name="SegmentEditorPETOrgans.png"):
    """The icon ``Resources/Icons/<name>`` of the module holding ``effect_file`` (an empty icon when absent)."""
    import qt
    path = os.path.join(os.path.dirname(os.path.abspath(effect_file)), "..", "Resources", "Icons", name)
    return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()


def linear_transform_between(fromNode, toNode):
    """4x4 from the coordinates of ``fromNode`` (a transform node or None = world) to those of ``toNode``."""
    m = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(fromNode, toNode, m):
        raise ValueError("The PET volume or the segmentation is under a non-linear transform; harden it "
                         "(Data module) before using this effect")
    return m


def world_to_ijk(volumeNode, ras):
    """World RAS -> (continuous) IJK of the volume, through its parent transforms."""
    worldToLocal = linear_transform_between(None, volumeNode.GetParentTransformNode())
    local = worldToLocal.MultiplyPoint(list(ras) + [1.0])
    m = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(m)
    return list(m.MultiplyPoint(local)[:3])


def mask_to_modifier(mask, volumeNode, segmentationNode):
    """Boolean (k, j, i) mask on the volume's grid -> vtkOrientedImageData in the segmentation's coordinates."""
    from vtk.util import numpy_support
    modifier = slicer.vtkOrientedImageData()
    modifier.SetDimensions(mask.shape[2], mask.shape[1], mask.shape[0])
    modifier.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    modifier.GetPointData().GetScalars().DeepCopy(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(mask, np.uint8).ravel(), deep=True))
    ijkToLocal = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToLocal)
    between = linear_transform_between(volumeNode.GetParentTransformNode(), segmentationNode.GetParentTransformNode())
    out = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(between, ijkToLocal, out)
    modifier.SetImageToWorldMatrix(out)
    return modifier


def segment_mask(segmentationNode, segmentId, volumeNode):
    """The segment as a boolean (k, j, i) array on the volume's grid (all False when empty)."""
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
    if arr is None:
        return np.zeros(slicer.util.arrayFromVolume(volumeNode).shape, bool)
    return np.asarray(arr) > 0
