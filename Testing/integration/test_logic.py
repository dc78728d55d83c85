"""Module logic classes on a real (headless) MRML scene: nodes -> worker process -> engine -> nodes.

Tiny untrained models keep these fast; the point is the plumbing: geometry kept, results referenced to their
inputs, transforms that Slicer applies the way the engine computed them, and the scene left as it was when a run
fails.
"""

import numpy as np
import pytest
import SimpleITK as sitk


def _pet_image(shape=(24, 28, 28), spacing=(3.0, 3.0, 4.0), seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full(shape, 0.5, np.float32)
    arr[6:18, 8:20, 8:20] = 3.0
    arr = (rng.poisson(arr * 30) / 30).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((-40.0, 25.0, -10.0))
    img.SetDirection(sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix())       # oblique
    return img, arr


def _node_count(scene):
    return scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")


@pytest.fixture(scope="module")
def tiny_synthesis(tmp_path_factory):
    import torch
    from PETWorkbenchLib.models import save_checkpoint
    from SynthesisModuleLib import build_model, load_config
    torch.manual_seed(0)
    cfg = load_config("drmc_cpu")
    cfg["model"].update(n_feats=4, res_num=1, hidden_dim=4, num_heads=1)
    return str(save_checkpoint(tmp_path_factory.mktemp("m") / "syn.pt", cfg, build_model(cfg["model"]).state_dict()))


def test_synthesis_logic_output_on_input_grid(mrml, tiny_synthesis):
    from PETWorkbenchSlicer import mrml as bridge
    from SynthesisModule import SynthesisModuleLogic
    img, arr = _pet_image()
    node = bridge.image_to_volume(img, name="LowDose")
    seen = []
    out = SynthesisModuleLogic().synthesize(node, model=tiny_synthesis, device="cpu", patchSize=16,
                                            progress=lambda f, m: seen.append(f))
    assert out.GetName() == "LowDose DRMC" and out is not node
    assert out.GetNodeReference("PETWorkbench.input") is node
    res = bridge.volume_to_image(out)
    assert np.allclose(res.GetDirection(), img.GetDirection()) and np.allclose(res.GetOrigin(), img.GetOrigin())
    a = sitk.GetArrayFromImage(res)
    assert a.shape == arr.shape and np.isfinite(a).all() and a.min() >= 0
    assert seen and seen[-1] == pytest.approx(1.0)
    assert np.array_equal(sitk.GetArrayFromImage(bridge.volume_to_image(node)), arr), "input must not change"
    table = out.GetNodeReference("PETWorkbench.lesionTable")  # the lesion-change report of the hot block
    assert table is not None and table.GetNumberOfRows() >= 1
    assert table.GetNodeReference("PETWorkbench.input") is out and "SUVpeak" in table.GetAttribute(
        "PETWorkbench.lesionRule")


def test_synthesis_lesion_report_table_and_flagged_points_replace_themselves(mrml, tmp_path):
    import json
    from PETWorkbenchSlicer import mrml as bridge
    from SynthesisModule import SynthesisModuleLogic
    img, _ = _pet_image()
    out = bridge.image_to_volume(img, name="Synth")
    row = {"id": 1, "volume_ml": 2.0, "center_lps": [10.0, -20.0, 30.0], "suv_max_in": 5.0, "suv_max_out": 3.0,
           "suv_max_change_pct": -40.0, "suv_peak_in": 4.0, "suv_peak_out": 3.0, "suv_peak_change_pct": -25.0,
           "suv_mean_in": 3.5, "suv_mean_out": 2.8, "suv_mean_change_pct": -20.0, "noise_se_pct": 5.0,
           "expected_change_pct": -8.0, "expected_change_bound_pct": -9.5, "flagged": True,
           "flag_reason": "change beyond noise"}
    report = {"threshold": {"method": "fixed", "suv": 2.5}, "rule": "flagged when SUVpeak ...", "lesions": [
        row, dict(row, id=2, flagged=False, center_lps=[0.0, 0.0, 0.0])]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    logic = SynthesisModuleLogic()
    for _ in range(2):  # recomputing replaces the nodes, it does not add new ones
        table = logic.lesionReport(out, str(path))
    scene = out.GetScene()
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1
    assert table.GetNumberOfRows() == 2 and out.GetAttribute("PETWorkbench.lesionsFlagged") == "1"
    names = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert "expected_change_bound_pct" in names
    points = out.GetNodeReference("PETWorkbench.lesionMarkups")
    assert points.GetNumberOfControlPoints() == 1  # flagged hot spots only
    ras = [0.0, 0.0, 0.0]
    points.GetNthControlPointPosition(0, ras)
    assert ras == [-10.0, 20.0, 30.0] and points.GetNthControlPointLabel(0).startswith("L1 SUVpeak -25%")


def test_synthesis_logic_bad_inputs_leave_scene_unchanged(mrml, tmp_path):
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.errors import EngineError, InputError
    from SynthesisModule import SynthesisModuleLogic
    scene, _ = mrml
    img, _ = _pet_image()
    node = bridge.image_to_volume(img, name="LowDose")
    before = _node_count(scene)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not weights")
    with pytest.raises(EngineError, match="Cannot read model weights"):
        SynthesisModuleLogic().synthesize(node, model=str(bad), device="cpu")
    nan = sitk.GetArrayFromImage(img)
    nan[0, 0, 0] = np.nan
    nimg = sitk.GetImageFromArray(nan)
    nimg.CopyInformation(img)
    nan_node = bridge.image_to_volume(nimg, name="nan")
    with pytest.raises(InputError, match="NaN"):
        SynthesisModuleLogic().synthesize(nan_node, device="cpu")
    ct = bridge.image_to_volume(sitk.Cast(img, sitk.sitkFloat32) * 0 - 1000, name="ct")
    with pytest.raises(InputError):
        SynthesisModuleLogic().synthesize(ct, device="cpu")
    assert _node_count(scene) == before + 2        # only the two inputs this test added


def test_segmentation_logic_keeps_user_segments_on_failure(mrml, tmp_path):
    """An untrained model predicts nothing: clear message, the user's segmentation is untouched."""
    import torch
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.errors import InputError
    from PETWorkbenchLib.models import save_checkpoint
    from SegmentationModule import SegmentationModuleLogic
    from SegmentationModuleLib.model import build_network
    from SegmentationModuleLib.train import load_config
    torch.manual_seed(0)
    cfg = load_config("ldos_cpu_demo")
    cfg["network"].update(features=[4, 8], strides=[1, 2], n_blocks=[1, 1])
    net = build_network(cfg)
    with torch.no_grad():                      # make the background logit win everywhere: empty prediction
        for p in net.parameters():
            p.zero_()
    model = str(save_checkpoint(tmp_path / "seg.pt", cfg, net.state_dict()))
    img, _ = _pet_image()
    pet = bridge.image_to_volume(img, name="PET")
    lab = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    lab.CopyInformation(img)
    lab[5:10, 5:10, 5:10] = 14
    user_seg, _, _ = bridge.labelmap_to_segmentation(lab, [{"value": 14, "name": "my liver"}],
                                                     referenceVolumeNode=pet)
    n_before = user_seg.GetSegmentation().GetNumberOfSegments()
    with pytest.raises(Exception, match="empty prediction|none of the requested organs"):
        SegmentationModuleLogic().segment(pet, user_seg, model=model, device="cpu")
    assert user_seg.GetSegmentation().GetNumberOfSegments() == n_before
    assert user_seg.GetSegmentation().GetNthSegment(0).GetName() == "my liver"
    with pytest.raises(InputError, match="Unknown organ"):
        SegmentationModuleLogic().segment(pet, organs=["appendix"], model=model)


def test_uptake_table_matches_arrays(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.terminology import organ_specs
    from SegmentationModule import SegmentationModuleLogic
    img, arr = _pet_image()
    pet = bridge.image_to_volume(img, name="PET")
    lab = np.zeros(arr.shape, np.uint8)
    lab[6:18, 8:20, 8:14] = 14
    lab[6:18, 8:20, 14:20] = 1
    limg = sitk.GetImageFromArray(lab)
    limg.CopyInformation(img)
    seg, _, _ = bridge.labelmap_to_segmentation(limg, organ_specs(["liver", "spleen"]), referenceVolumeNode=pet)
    table = SegmentationModuleLogic().organUptake(pet, seg, None)
    t = table.GetTable()
    names = [t.GetColumnByName("name").GetValue(i) for i in range(t.GetNumberOfRows())]
    voxel_ml = np.prod(img.GetSpacing()) / 1000
    for organ, value in (("liver", 14), ("spleen", 1)):
        i = names.index(organ)
        m = lab == value
        assert t.GetColumnByName("suv_mean").GetValue(i) == pytest.approx(arr[m].mean(), rel=1e-5)
        assert t.GetColumnByName("suv_max").GetValue(i) == pytest.approx(arr[m].max(), rel=1e-5)
        assert t.GetColumnByName("volume_ml").GetValue(i) == pytest.approx(m.sum() * voxel_ml, rel=1e-5)


def test_registration_logic_transform_agrees_with_engine(mrml):
    """Slicer moves points through the output node as the engine's field does; hardening the moving volume
    through the node gives the engine's warped image."""
    from PETWorkbenchSlicer import mrml as bridge
    from RegistrationModule import RegistrationModuleLogic
    scene, logics = mrml
    z, y, x = np.mgrid[:24, :32, :32].astype(np.float32)
    blob = lambda cx, cy: np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - 12) ** 2) / 30.0).astype(np.float32)
    f_img, m_img = sitk.GetImageFromArray(blob(15, 16)), sitk.GetImageFromArray(blob(18, 15))
    for im in (f_img, m_img):
        im.SetSpacing((2.0, 2.0, 2.0))
    fixed, moving = bridge.image_to_volume(f_img, name="fixed"), bridge.image_to_volume(m_img, name="moving")
    t = RegistrationModuleLogic().register(fixed, moving, iterations=(40, 20), warpVolume=True, jacobian=True,
                                           device="cpu")
    assert t.GetNodeReference("fixedVolume") is fixed and t.GetNodeReference("movingVolume") is moving
    field = bridge.transform_to_displacement(t, f_img)
    u = sitk.GetArrayFromImage(field)
    # centre of the fixed blob (LPS 30, 32, 24) maps near the moving blob centre (36, 30, 24)
    assert np.allclose(np.array([30, 32, 24]) + u[12, 16, 15], [36, 30, 24], atol=1.5)
    warped = t.GetNodeReference("PETWorkbench.warpedVolume")
    assert warped is not None and t.GetNodeReference("PETWorkbench.jacobianVolume") is not None
    # same warp through Slicer: put the moving volume under the transform and harden it
    moving.SetAndObserveTransformNodeID(t.GetID())
    logics["transforms"].hardenTransform(moving)
    hardened = bridge.volume_to_image(moving)
    engine = bridge.volume_to_image(warped)
    resampled = sitk.Resample(hardened, engine, sitk.Transform(), sitk.sitkLinear, 0.0)
    a, b = sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(engine)
    inner = (slice(3, -3),) * 3
    assert np.abs(a[inner] - b[inner]).max() < 0.05
    fa = sitk.GetArrayFromImage(f_img).ravel()
    before = np.corrcoef(sitk.GetArrayFromImage(m_img).ravel(), fa)[0, 1]
    after = np.corrcoef(b.ravel(), fa)[0, 1]
    assert after > before + 0.05, (before, after)


def test_registration_logic_bad_inputs(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.errors import InputError
    from RegistrationModule import RegistrationModuleLogic
    scene, _ = mrml
    img, _ = _pet_image()
    a = bridge.image_to_volume(img, name="a")
    lab = bridge.image_to_volume(sitk.Cast(img > 1, sitk.sitkUInt8), name="lab",
                                 className="vtkMRMLLabelMapVolumeNode")
    before = scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
    with pytest.raises(InputError, match="both"):
        RegistrationModuleLogic().register(a, a, fixedLabelsNode=lab)
    with pytest.raises(InputError, match="No volume"):
        RegistrationModuleLogic().register(a, None)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == before


def test_reconstruction_logic_lowdose_keeps_mean_adds_noise(mrml):
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.errors import InputError
    from ReconstructionModule import ReconstructionModuleLogic
    arr = np.zeros((6, 40, 40), np.float32)
    yy, xx = np.mgrid[:40, :40]
    arr[:, (yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2] = 1.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 4.0))
    node = bridge.image_to_volume(img, name="phantom")
    logic = ReconstructionModuleLogic()
    low = logic.simulateLowDose(node, drf=10, seed=1)
    low2 = logic.simulateLowDose(node, drf=10, seed=1)
    out = sitk.GetArrayFromImage(bridge.volume_to_image(low))
    inner = np.zeros_like(arr, bool)
    inner[:, (yy - 20) ** 2 + (xx - 20) ** 2 < 10 ** 2] = True
    assert out.shape == arr.shape and low.GetNodeReference("PETWorkbench.input") is node
    assert abs(out[inner].mean() - 1.0) < 0.1
    assert out[inner].std() > 0.02                                                        # noise was added
    assert np.array_equal(out, sitk.GetArrayFromImage(bridge.volume_to_image(low2)))      # seeded
    with pytest.raises(InputError, match="Dose reduction factor"):
        logic.simulateLowDose(node, drf=0.5)


def test_reconstruction_logic_listmode_file(mrml, shared_data):
    """Real Siemens mMR list-mode -> OSEM volume node; a time window keeps fewer prompts."""
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchLib.errors import InputError
    from ReconstructionModule import ReconstructionModuleLogic
    hdr = shared_data / "stir_mmr_small_listmode" / "PET_ACQ_small.l.hdr.STIR"
    logic = ReconstructionModuleLogic()
    node = logic.reconstruct(str(hdr), iterations=2, subsets=4)
    img = sitk.GetArrayFromImage(bridge.volume_to_image(node))
    assert img.ndim == 3 and np.isfinite(img).all() and img.max() > 0
    assert float(node.GetAttribute("PETWorkbench.prompts")) == 218881
    part = logic.reconstruct(str(hdr), iterations=2, subsets=4, timeWindow=0.3)
    assert 0 < float(part.GetAttribute("PETWorkbench.prompts")) < 218881
    with pytest.raises(InputError, match="not found"):
        logic.reconstruct(str(hdr) + ".missing")
