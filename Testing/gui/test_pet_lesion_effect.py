"""The "PET lesion" Segment Editor effect, driven as the Segment Editor drives it (options frame, clicks in a slice
view with their modifier keys, undo, the lesion table), on a PET phantom with a known lesion."""

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

import slicer_layer
from segment_editor import activate_effect, qMRMLSliceWidget, segment_array

ROOT = Path(__file__).resolve().parents[2]
EFFECT = ROOT / "SegmentEditorPETOrgans" / "SegmentEditorPETOrgansEffects" / "SegmentEditorPETLesionEffect.py"
sys.path.insert(0, str(ROOT / "Testing" / "segmentation"))


@pytest.fixture
def phantom_files(tmp_path):
    from test_pemed import phantom
    img, suv, lesion, liver = phantom()
    pet = tmp_path / "pet.nii.gz"
    sitk.WriteImage(img, str(pet))
    ct = sitk.GetImageFromArray(np.where(suv > 0, 40.0, -1000.0).astype(np.float32))
    ct.CopyInformation(img)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    return dict(pet=pet, ct=tmp_path / "ct.nii.gz", lesion=lesion, liver=liver, img=img)


def _setup(path, with_liver=None, name="PET"):
    scene = slicer_layer.new_scene()
    vol = slicer_layer._state.logics["volumes"].AddArchetypeVolume(str(path), name, 0)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    segmentation = seg.GetSegmentation()
    other = segmentation.AddEmptySegment("other", "other")
    sid = segmentation.AddEmptySegment("lesion", "lesion")
    import slicer
    block = np.zeros(slicer.util.arrayFromVolume(vol).shape, np.uint8)
    block[2:5, 2:6, 2:6] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(block, seg, other, vol)
    if with_liver is not None:
        lid = segmentation.AddEmptySegment("liver", "liver")
        slicer.util.updateSegmentBinaryLabelmapFromArray(with_liver.astype(np.uint8), seg, lid, vol)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetAndObserveSegmentationNode(seg)
    editor_node.SetAndObserveSourceVolumeNode(vol)
    editor_node.SetSelectedSegmentID(sid)
    scripted, effect, editor = activate_effect(str(EFFECT), editor_node)
    return dict(scene=scene, vol=vol, seg=seg, sid=sid, other=other, effect=effect, editor=editor,
                editor_node=editor_node, view=qMRMLSliceWidget(scene))


def _ras(vol, ijk):
    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    return list(m.MultiplyPoint(list(ijk) + [1.0])[:3])


def _click(s, ijk, event=vtk.vtkCommand.LeftButtonPressEvent, ctrl=False):
    ras = _ras(s["vol"], ijk)
    s["view"].jump_to(ras)
    xy = s["view"].ras_to_xy(ras)
    interactor = vtk.vtkRenderWindowInteractor()
    interactor.SetEventPosition(*xy)
    interactor.SetControlKey(1 if ctrl else 0)
    return s["effect"].processInteractionEvents(interactor, event, s["view"])


def _seg(s, sid=None):
    return segment_array(s["seg"], sid or s["sid"], s["vol"]) > 0


def _choose(effect, method):
    combo = effect.methodComboBox
    combo.setCurrentIndex([combo.itemData(i) for i in range(combo.count)].index(method))


CENTRE = (19.5, 19.5, 11.5)


def test_click_delineates_the_lesion_changes_nothing_else_and_undo_restores(slicer_app, phantom_files):
    # Guards: a click must set the selected segment to the lesion, leave the other segments alone, and be one
    # Segment Editor undo step.
    s = _setup(phantom_files["pet"])
    assert not s["effect"].icon().isNull()               # the module's icon, found from the effect's file
    _choose(s["effect"], "41pct")
    other_before = _seg(s, s["other"]).copy()
    assert _click(s, CENTRE) is True
    assert np.array_equal(_seg(s), phantom_files["lesion"]), s["effect"].statusLabel.text
    assert np.array_equal(_seg(s, s["other"]), other_before)
    s["editor"].undo()
    assert not _seg(s).any() and np.array_equal(_seg(s, s["other"]), other_before)
    # after the editor's undo the effect continues from the segment as it is: a new click works again
    assert _click(s, CENTRE) is True and np.array_equal(_seg(s), phantom_files["lesion"])


def test_negative_clicks_ctrl_or_right_button(slicer_app, phantom_files):
    s = _setup(phantom_files["pet"])
    _choose(s["effect"], "suv2.5")
    _click(s, CENTRE)
    lesion = _seg(s).copy()
    assert lesion.any()
    # a threshold region holding the positive click cannot be split: a message, the segment unchanged
    assert _click(s, CENTRE, ctrl=True) is True
    assert "cannot split" in s["effect"].statusLabel.text and np.array_equal(_seg(s), lesion)
    assert _click(s, CENTRE, event=vtk.vtkCommand.RightButtonPressEvent) is True
    assert "cannot split" in s["effect"].statusLabel.text and np.array_equal(_seg(s), lesion)


def test_bad_clicks_and_volumes_give_messages_and_leave_the_segment(slicer_app, phantom_files):
    s = _setup(phantom_files["pet"])
    _choose(s["effect"], "41pct")
    assert _click(s, (0, 0, 5)) is True
    assert "outside the body" in s["effect"].statusLabel.text and not _seg(s).any()
    _choose(s["effect"], "percist")
    assert _click(s, CENTRE) is True
    assert "liver" in s["effect"].statusLabel.text and not _seg(s).any()
    ct = _setup(phantom_files["ct"], name="CT")
    _choose(ct["effect"], "41pct")
    assert _click(ct, CENTRE) is True
    assert "CT" in ct["effect"].statusLabel.text and not _seg(ct).any()
    ct["editor_node"].SetAndObserveSourceVolumeNode(None)
    assert _click(ct, CENTRE) is True
    assert "source volume" in ct["effect"].statusLabel.text
    # other events are not the effect's
    assert _click(s, CENTRE, event=vtk.vtkCommand.MouseMoveEvent) is False


def test_percist_with_a_liver_segment_and_the_lesion_table(slicer_app, phantom_files):
    s = _setup(phantom_files["pet"], with_liver=phantom_files["liver"])
    _choose(s["effect"], "percist")
    assert _click(s, CENTRE) is True
    assert np.array_equal(_seg(s), phantom_files["lesion"]), s["effect"].statusLabel.text
    table = s["effect"].onUpdateTable()
    assert table is not None and table.GetName() == "PET lesion measures"
    t = table.GetTable()
    cols = [t.GetColumnName(i) for i in range(t.GetNumberOfColumns())]
    rows = {t.GetValue(r, cols.index("segment")).ToString(): r for r in range(t.GetNumberOfRows())}
    assert set(rows) == {"lesion", "other"}                      # the liver is the reference, not a lesion
    r = rows["lesion"]
    n = int(phantom_files["lesion"].sum())
    assert t.GetValue(r, cols.index("suv_max")).ToDouble() == pytest.approx(8.0)
    assert t.GetValue(r, cols.index("mtv_ml")).ToDouble() == pytest.approx(n * 0.018)
    assert t.GetValue(r, cols.index("reference_region")).ToString() == "liver"


def test_pemed_click_with_the_shipped_model(slicer_app, phantom_files):
    from PETWorkbenchLib import models
    from SegmentationModuleLib.lesion import DEFAULT_MODEL
    if DEFAULT_MODEL not in models.load_registry():
        pytest.fail(f"{DEFAULT_MODEL} is not in Models.json")
    s = _setup(phantom_files["pet"])
    _choose(s["effect"], "pemed")
    assert _click(s, CENTRE) is True
    first = _seg(s).copy()
    assert first.any() and first[11, 19, 19], s["effect"].statusLabel.text
    assert _click(s, (19, 19, 11), ctrl=True) is True
    s["editor"].undo()
    assert np.array_equal(_seg(s), first)
