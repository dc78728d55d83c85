"""MRML bridge on a real (headless) MRML scene: volumes, segmentations, grid transforms, tables."""

import numpy as np
import pytest
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError


def _oblique_image(shape=(12, 16, 20)):
    rng = np.random.default_rng(0)
    arr = rng.random(shape).astype(np.float32) * 10
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.5, 4.0))
    img.SetOrigin((-30.0, 12.5, 100.0))
    rot = sitk.VersorTransform((0.3, 0.2, 1.0), 0.4)          # oblique: 0.4 rad about a tilted axis
    img.SetDirection(rot.GetMatrix())
    return img, arr


def _ras_of_index(node, ijk):
    import vtk
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array(m.MultiplyPoint(list(ijk) + [1.0])[:3])


def test_volume_roundtrip_keeps_ras_of_voxels(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    img, arr = _oblique_image()
    node = bridge.image_to_volume(img, name="PET")
    for ijk in [(0, 0, 0), (19, 0, 0), (3, 7, 11), (19, 15, 11)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(_ras_of_index(node, ijk), lps * [-1, -1, 1], atol=1e-6)
    back = bridge.volume_to_image(node)
    assert np.allclose(back.GetSpacing(), img.GetSpacing())
    assert np.allclose(back.GetOrigin(), img.GetOrigin())
    assert np.allclose(back.GetDirection(), img.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)


def test_volume_parent_linear_transform_included(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    scene, _ = mrml
    img, _ = _oblique_image()
    node = bridge.image_to_volume(img)
    t = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    import vtk
    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 10.0)                                   # +10 mm towards R
    t.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(t.GetID())
    back = bridge.volume_to_image(node)
    assert np.allclose(np.array(back.GetOrigin()) - img.GetOrigin(), [-10.0, 0, 0])   # R+10 = L-10


def test_volume_bad_inputs(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    scene, _ = mrml
    with pytest.raises(InputError, match="No volume"):
        bridge.volume_to_image(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty"):
        bridge.volume_to_image(empty)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    with pytest.raises(InputError, match="vtkMRMLSegmentationNode"):
        bridge.volume_to_image(seg)
    img, _ = _oblique_image()
    node = bridge.image_to_volume(img)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        bridge.volume_to_image(node)


SPECS = [
    {"value": 3, "name": "liver", "color": [0.86, 0.55, 0.39],
     "terminology": {"category": {"codingScheme": "SCT", "codeValue": "123037004",
                                  "codeMeaning": "Anatomical Structure"},
                     "type": {"codingScheme": "SCT", "codeValue": "10200004", "codeMeaning": "Liver"}}},
    {"value": 1, "name": "spleen", "color": [0.62, 0.36, 0.45]},
    {"value": 7, "name": "kidney", "color": [0.72, 0.3, 0.2]},
    {"value": 9, "name": "brain", "color": [0.9, 0.8, 0.7]},          # absent from the label map
]


def _labels(ref):
    lab = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.int16)
    lab[2:6, 3:9, 4:10] = 3
    lab[7:10, 2:5, 2:6] = 1
    lab[8:11, 10:14, 12:18] = 7
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(ref)
    return out, lab


def test_segmentation_roundtrip_names_values_terminology(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    img, _ = _oblique_image()
    vol = bridge.image_to_volume(img, name="PET")
    lab_img, lab = _labels(img)
    seg, ids, missing = bridge.labelmap_to_segmentation(lab_img, SPECS, referenceVolumeNode=vol)
    assert missing == [9]
    segm = seg.GetSegmentation()
    assert segm.GetNumberOfSegments() == 3
    by_name = {segm.GetSegment(i).GetName(): segm.GetSegment(i) for i in segm.GetSegmentIDs()}
    assert set(by_name) == {"liver", "spleen", "kidney"}
    assert by_name["liver"].GetLabelValue() == 3 and by_name["kidney"].GetLabelValue() == 7
    assert np.allclose(by_name["spleen"].GetColor(), [0.62, 0.36, 0.45])
    assert "10200004" in by_name["liver"].GetTerminology() and "Liver" in by_name["liver"].GetTerminology()
    back, specs = bridge.segmentation_to_labelmap(seg, vol)
    assert np.array_equal(sitk.GetArrayFromImage(back), lab)
    assert {s["name"]: s["value"] for s in specs} == {"liver": 3, "spleen": 1, "kidney": 7}


def test_existing_segments_untouched_unless_overwrite(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    img, _ = _oblique_image()
    vol = bridge.image_to_volume(img)
    lab_img, lab = _labels(img)
    seg, _, _ = bridge.labelmap_to_segmentation(lab_img, SPECS[:1], referenceVolumeNode=vol)
    import slicer
    first_id = seg.GetSegmentation().GetSegmentIDs()[0]
    before = slicer.util.arrayFromSegmentBinaryLabelmap(seg, first_id, vol).copy()
    shifted = np.roll(lab, 1, axis=0)
    sh_img = sitk.GetImageFromArray(shifted)
    sh_img.CopyInformation(img)
    bridge.labelmap_to_segmentation(sh_img, SPECS[:1], segmentationNode=seg)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, first_id, vol), before)
    bridge.labelmap_to_segmentation(sh_img, SPECS[:1], segmentationNode=seg, overwrite=True)
    segm = seg.GetSegmentation()
    assert segm.GetNumberOfSegments() == 1
    only = segm.GetSegmentIDs()[0]
    assert np.array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg, only, vol), (shifted == 3).astype(np.uint8))


def _smooth_field(ref, amplitude=6.0):
    """Smooth non-uniform displacement (LPS mm) on the grid of ref."""
    size = ref.GetSize()
    k, j, i = np.meshgrid(*(np.linspace(0, np.pi, n) for n in size[::-1]), indexing="ij")
    u = np.stack([amplitude * np.sin(i) * np.cos(k),
                  -0.5 * amplitude * np.sin(j),
                  0.3 * amplitude * np.cos(i) * np.sin(j)], -1)
    f = sitk.GetImageFromArray(u, isVector=True)
    f.CopyInformation(ref)
    return f, u


def test_grid_transform_moves_points_like_slicer(mrml):
    """x_m = x_f + u(x_f) from the engine field equals Slicer's from-parent transform of the node."""
    from PETWorkbenchSlicer import mrml as bridge
    img, _ = _oblique_image((10, 12, 14))
    field, u = _smooth_field(img)
    node = bridge.displacement_to_transform(field, name="warp")
    assert node.IsA("vtkMRMLGridTransformNode")
    for idx in [(2, 3, 4), (7, 9, 5), (0, 0, 0), (13, 11, 9)]:
        x_f_lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        x_m_lps = x_f_lps + u[idx[2], idx[1], idx[0]]
        slicer_ras = bridge.transform_points_ras(node, (x_f_lps * [-1, -1, 1])[None])[0]
        assert np.allclose(slicer_ras, x_m_lps * [-1, -1, 1], atol=1e-4)
    # and ITK agrees: a DisplacementFieldTransform built from the same field maps the point the same way
    t = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    p = img.TransformIndexToPhysicalPoint((7, 9, 5))
    assert np.allclose(t.TransformPoint(p), np.array(p) + u[5, 9, 7], atol=1e-4)
    back = bridge.transform_to_displacement(node, img)
    assert np.allclose(sitk.GetArrayFromImage(back), u, atol=1e-4)


def test_grid_transform_references_and_hardening(mrml):
    """Resampling the moving volume through the node (Slicer harden) matches ITK resampling with the field."""
    from PETWorkbenchSlicer import mrml as bridge
    scene, logics = mrml
    arr = np.zeros((20, 24, 28), np.float32)
    arr[6:14, 8:16, 9:19] = 100.0
    moving_img = sitk.GetImageFromArray(arr)
    moving_img.SetSpacing((2.0, 2.0, 3.0))
    fixed = bridge.image_to_volume(moving_img, name="fixed")
    moving = bridge.image_to_volume(moving_img, name="moving")
    u = np.zeros(arr.shape + (3,))
    u[..., 0] = 4.0                                   # x_m = x_f + 4 mm (L)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(moving_img)
    node = bridge.displacement_to_transform(field, fixedNode=fixed, movingNode=moving)
    assert node.GetNodeReference("fixedVolume") is fixed and node.GetNodeReference("movingVolume") is moving
    moving.SetAndObserveTransformNodeID(node.GetID())
    logics["transforms"].hardenTransform(moving)
    hardened = bridge.volume_to_image(moving)
    itk = sitk.Resample(moving_img, hardened, sitk.DisplacementFieldTransform(
        sitk.Cast(field, sitk.sitkVectorFloat64)), sitk.sitkLinear, 0.0)
    a, b = sitk.GetArrayFromImage(hardened), sitk.GetArrayFromImage(itk)
    com = lambda x: (np.array(np.nonzero(x > 50)).mean(1))
    assert np.allclose(com(a), com(b), atol=0.6)
    # physically, the object moved by -4 mm along L (warped(x) = moving(x + 4 mm L))
    phys = lambda im, c: np.array(im.TransformContinuousIndexToPhysicalPoint([float(v) for v in c[::-1]]))
    shift = phys(hardened, com(a)) - phys(moving_img, com(arr))
    assert np.allclose(shift, [-4.0, 0.0, 0.0], atol=0.6)


def test_table_from_rows(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    rows = [{"organ": "liver", "SUVmean": 2.1, "SUVpeak": None}, {"organ": "spleen", "SUVmean": 1.8, "SUVpeak": 2.5}]
    t = bridge.table_from_rows(rows, name="uptake")
    tab = t.GetTable()
    assert tab.GetNumberOfRows() == 2 and tab.GetNumberOfColumns() == 3
    assert tab.GetColumnByName("organ").GetValue(1) == "spleen"
    assert tab.GetColumnByName("SUVmean").GetValue(0) == pytest.approx(2.1)
    assert np.isnan(tab.GetColumnByName("SUVpeak").GetValue(0))
