"""The "PET organs" Segment Editor effect, driven as the Segment Editor drives it (options frame, compute, clicks
in a slice view, undo), on the sample simulated PET with the shipped model."""

from pathlib import Path

import numpy as np
import pytest
import vtk

import slicer_layer
from guitools import pump
from segment_editor import activate_effect, click, qMRMLSliceWidget

ROOT = Path(__file__).resolve().parents[2]
EFFECT = ROOT / "SegmentEditorPETOrgans" / "SegmentEditorPETOrgansEffects" / "SegmentEditorEffect.py"
SAMPLE_PET = ROOT / "Resources" / "SampleData" / "SimulatedPET" / "lowdose_pet.nii.gz"


def _setup(scene, volume_path=SAMPLE_PET, name="PET"):
    pet = slicer_layer._state.logics["volumes"].AddArchetypeVolume(str(volume_path), name, 0)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(pet)
    sid = seg.GetSegmentation().AddEmptySegment("organ", "organ")
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(seg)
    editor_node.SetAndObserveSourceVolumeNode(pet)
    editor_node.SetSelectedSegmentID(sid)
    scripted, effect, editor = activate_effect(str(EFFECT), editor_node)
    return pet, seg, sid, scripted, effect, editor


@pytest.fixture(scope="module")
def computed(slicer_app):
    scene = slicer_layer.new_scene()
    pet, seg, sid, scripted, effect, editor = _setup(scene)
    effect.computeButton.click()
    pump(lambda: effect._run is None, 300)
    labels = effect._prediction()
    assert labels is not None and labels.any(), effect.statusLabel.text
    return dict(scene=scene, pet=pet, seg=seg, sid=sid, effect=effect, editor=editor, labels=labels)


def _organ_voxel(labels):
    """(k, j, i) in the middle of the largest predicted organ component."""
    from scipy import ndimage
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    organ = values[np.argmax(counts)]
    comp, _ = ndimage.label(labels == organ)
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    inside = comp == np.argmax(sizes)
    dist = ndimage.distance_transform_edt(inside)
    return np.unravel_index(np.argmax(dist), labels.shape), inside


def _world(volume, kji):
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    local = m.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])
    t = volume.GetParentTransformNode()
    if t is not None:
        w = vtk.vtkMatrix4x4()
        t.GetMatrixTransformToWorld(w)
        local = w.MultiplyPoint(local)
    return list(local[:3])


def _segment_voxels(seg, sid):
    import slicer
    data = slicer.vtkOrientedImageData()
    seg.GetBinaryLabelmapRepresentation(sid, data)
    from vtk.util import numpy_support
    s = data.GetPointData().GetScalars()
    return 0 if s is None else int((numpy_support.vtk_to_numpy(s) > 0).sum())


def test_offers_only_segmentation_models(computed):
    # Guards: the effect offered the denoiser-only (Fake-FDPET) model, which cannot segment (nor can PE-MED).
    from PETWorkbenchLib import models
    combo = computed["effect"].modelComboBox
    offered = [combo.itemData(i) for i in range(combo.count)]
    not_organs = [e.id for e in models.registry("segmentation") if e.config.get("task") in ("denoise", "pemed")]
    assert offered and not set(offered) & set(not_organs)


def test_click_adds_organ_and_undo_restores(computed):
    # Guards: the effect's click -> organ -> undo path, which no test ran (the old suite replaced the effect base
    # class and the editor with stand-ins that accept any call).
    effect, seg, sid, pet = computed["effect"], computed["seg"], computed["sid"], computed["pet"]
    kji, inside = _organ_voxel(computed["labels"])
    view = qMRMLSliceWidget(computed["scene"])
    assert _segment_voxels(seg, sid) == 0
    assert click(effect, view, _world(pet, kji)) is True
    added = _segment_voxels(seg, sid)
    assert added == int(inside.sum()), (added, int(inside.sum()), effect.statusLabel.text)
    computed["editor"].undo()
    assert _segment_voxels(seg, sid) == 0


def test_click_honours_parent_transform_of_the_pet(computed):
    # Guards: clicks were mapped with the volume's own RAS->IJK matrix, ignoring its parent transform, and the
    # added region was placed in the volume's untransformed position.
    effect, seg, sid, pet, scene = (computed[k] for k in ("effect", "seg", "sid", "pet", "scene"))
    kji, inside = _organ_voxel(computed["labels"])
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 37.0)
    shift.SetElement(2, 3, -21.0)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    t.SetMatrixTransformToParent(shift)
    pet.SetAndObserveTransformNodeID(t.GetID())
    try:
        view = qMRMLSliceWidget(scene, "Yellow")
        assert click(effect, view, _world(pet, kji)) is True
        assert _segment_voxels(seg, sid) == int(inside.sum()), effect.statusLabel.text
        b = [0.0] * 6
        seg.GetSegmentation().GetSegment(sid).GetBounds(b)
        centre = [(b[0] + b[1]) / 2, (b[2] + b[3]) / 2, (b[4] + b[5]) / 2]
        ks, js, is_ = np.nonzero(inside)
        m = vtk.vtkMatrix4x4()
        pet.GetIJKToRASMatrix(m)
        untransformed = np.array([m.MultiplyPoint([float(i), float(j), float(k), 1.0])[:3]
                                  for k, j, i in ((ks.min(), js.min(), is_.min()), (ks.max(), js.max(), is_.max()))])
        expected = untransformed.mean(axis=0) + np.array([37.0, 0.0, -21.0])
        assert np.allclose(centre, expected, atol=3.0), (centre, expected)
    finally:
        computed["editor"].undo()
        pet.SetAndObserveTransformNodeID(None)


def test_failure_shows_message_and_reenables_panel(slicer_app, errors, tmp_path):
    # Guards: an exception in onCompute (here: a CT given as the source volume) left the panel stuck, no message.
    scene = slicer_layer.new_scene()
    ct = ROOT / "Resources" / "SampleData" / "SimulatedPET" / "lowdose_pet_ct.nii.gz"
    pet, seg, sid, scripted, effect, editor = _setup(scene, ct, "CT")
    effect.computeButton.click()
    pump(lambda: effect._run is None, 60)
    assert errors.records, "no message shown"
    assert effect.computeButton.text == "Compute prediction" and effect.computeButton.enabled
    assert effect.progressBar.isHidden()
    assert _segment_voxels(seg, sid) == 0
