"""PE-MED (interactive segmentation network), simulated clicks, click-seeded thresholds, lesion sessions and the
lesion measures."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import sphere_mean
from SegmentationModuleLib import lesion as L
from SegmentationModuleLib.clicks import SliceCrop, deepest_point, next_click
from SegmentationModuleLib.pemed import PEMED, disk_maps, normalized_focal_loss, theta_c

TINY = dict(dims=[8, 8, 16, 16], depths=[1, 1, 1, 1], heads=[1, 1, 1, 1], sr_ratios=[2, 1, 1, 1], mlp_ratio=1,
            decoder_dim=8, palm_pool=1, tsip_hidden=4)


def tiny_cfg(crop=32):
    return {"name": "tiny", "task": "pemed", "seed": 0,
            "input": {"crop": crop, "pixel_mm": 3.0, "disk_radius_mm": 6.0},
            "network": dict(TINY),
            "training": {"iterations": 4, "batch_size": 2, "lr": 1e-3, "max_iterations": 2, "checkpoint_every": 2,
                         "p_propagation": 0.5, "p_extra": 0.5},
            "inference": {"max_propagation_mm": 60.0, "min_pixels": 1}}


def phantom(shape=(24, 40, 40), spacing_zyx=(2.0, 3.0, 3.0), lesion_suv=8.0, radius_mm=9.0):
    """Body (SUV 1) with a spherical lesion at the centre and a 'liver' block (SUV 2, noisy)."""
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing_zyx)], indexing="ij")
    c = [(n - 1) * s / 2 for n, s in zip(shape, spacing_zyx)]
    ry, rx = 0.45 * shape[1] * spacing_zyx[1], 0.45 * shape[2] * spacing_zyx[2]
    body = ((y - c[1]) / ry) ** 2 + ((x - c[2]) / rx) ** 2 <= 1
    suv = np.where(body, 1.0, 0.0).astype(np.float32)
    lesion = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius_mm ** 2
    suv[lesion] = lesion_suv
    liver = np.zeros(shape, bool)
    liver[4:20, 5:12, 12:28] = True
    suv[liver] = 2.0 + 0.1 * np.random.default_rng(0).standard_normal(int(liver.sum()))
    img = sitk.GetImageFromArray(suv)
    img.SetSpacing(spacing_zyx[::-1])
    img.SetOrigin((-10.0, 20.0, 5.0))
    return img, suv, lesion, liver


CENTRE_IJK = (19.5, 19.5, 11.5)


# --------------------------------------------------------------------------------------------- network parts
def test_disk_maps_put_positive_and_negative_clicks_in_their_channels():
    m = disk_maps((20, 20), [(5, 5, True), (14, 10, False)], radius=2.0)
    assert m[0, 5, 5] == 1 and m[1, 5, 5] == 0 and m[1, 14, 10] == 1 and m[0, 14, 10] == 0
    assert m[0].sum() == 13 and m[1].sum() == 13          # pixels within 2 px: the 13-pixel disk
    assert m[0, 5, 8] == 0


def test_theta_c_is_softmax_qk_over_dk_times_v():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    expect = torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v
    assert torch.allclose(theta_c(q, k, v), expect)


def test_palm_o_is_the_papers_sum():
    torch.manual_seed(0)
    net = PEMED(**TINY)
    f, e = torch.randn(1, 16, 8), torch.randn(1, 16, 8)
    o = net.palm_o
    expect = f + o.norm_image(theta_c(f, e, e)) + e + o.norm_prompt(theta_c(e, f, f))
    assert torch.allclose(o(f, e, 4, 4), expect)


def test_palm_i_uses_each_prompt_and_tsip_adds_sigmoid_of_previous_output():
    torch.manual_seed(0)
    net = PEMED(**TINY).eval()
    img = torch.rand(1, 1, 32, 32)
    z = torch.zeros_like(img)
    pos = torch.from_numpy(disk_maps((32, 32), [(16, 16, True)], 2)[:1][None])
    with torch.no_grad():
        base = net(img, z, z, z)
        assert not torch.allclose(net(img, pos, z, z), base)      # positive clicks reach the output
        assert not torch.allclose(net(img, z, pos, z), base)      # negative clicks too
        assert not torch.allclose(net(img, z, z, pos), base)      # and the previous mask
        prev = torch.randn(1, 1, 32, 32)
        diff = net(img, z, z, z, prev) - base
        expect = torch.sigmoid(net.tsip(prev)) - torch.sigmoid(net.tsip(torch.zeros_like(prev)))
    assert torch.allclose(diff, expect, atol=1e-6)


def test_normalized_focal_loss_matches_its_definition_and_down_weights_easy_pixels():
    logits = torch.tensor([[[[3.0, -0.2], [0.1, -4.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    p = torch.sigmoid(logits)
    pt = torch.where(target > 0, p, 1 - p)
    a = torch.where(target > 0, 0.5, 0.5)
    beta = (1 - pt) ** 2
    expect = -(a * beta * torch.log(pt)).sum() / beta.sum()
    assert torch.allclose(normalized_focal_loss(logits, target), expect, atol=1e-6)
    # an easy pixel (logit 3, target 1) gets almost no gradient; the hard one (-0.2, target 1) a large one
    x = logits.clone().requires_grad_(True)
    normalized_focal_loss(x, target).backward()
    assert abs(x.grad[0, 0, 0, 0]) < 0.05 * abs(x.grad[0, 0, 0, 1])


# --------------------------------------------------------------------------------------------- clicks
def test_next_click_goes_to_the_centre_of_the_larger_error():
    gt = np.zeros((30, 30), bool)
    gt[5:25, 5:25] = True
    pred = gt.copy()
    pred[10:20, 15:25] = False                         # a missed 10 x 10 block: positive click in its middle
    (r, c), pos = next_click(pred, gt)
    assert pos and 14 <= r <= 15 and 19 <= c <= 20
    pred = gt.copy()
    pred[0:30, 25:30] = True                           # a false 30 x 5 strip: negative click inside it
    (r, c), pos = next_click(pred, gt)
    assert not pos and 25 <= c < 30
    assert next_click(gt, gt) is None
    assert deepest_point(np.zeros((4, 4), bool)) is None


def test_slice_crop_samples_and_pastes_back_on_the_same_grid():
    a = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    crop = SliceCrop((19.5, 24.5), (3.0, 3.0), 16, 3.0)
    s = crop.sample(a)
    assert np.allclose(s, a[12:28, 17:33])            # pixel_mm = spacing: the crop is a sub-array
    back = crop.paste(s, a.shape, order=0)
    assert np.allclose(back[12:28, 17:33], a[12:28, 17:33]) and back[0, 0] == 0
    assert crop.to_crop((19.5, 24.5)) == pytest.approx((7.5, 7.5))


# --------------------------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize("method", ["41pct", "50pct", "suv2.5"])
def test_threshold_methods_recover_a_sharp_sphere(method):
    img, suv, lesion, liver = phantom()
    s = L.LesionSession(img, method)
    m = s.add_click(CENTRE_IJK)
    assert np.array_equal(m, lesion)


def test_percist_threshold_uses_the_liver_and_needs_one():
    img, suv, lesion, liver = phantom()
    with pytest.raises(InputError, match="liver"):
        L.LesionSession(img, "percist")
    s = L.LesionSession(img, "percist", liver_mask=liver)
    expect = 1.5 * suv[liver].mean() + 2 * suv[liver].std(ddof=1)
    assert s.liver_threshold == pytest.approx(expect, rel=1e-5)
    assert np.array_equal(s.add_click(CENTRE_IJK), lesion)


def test_relative_threshold_finds_the_lesion_max_beyond_the_search_radius():
    img, suv, lesion, liver = phantom(radius_mm=18.0)
    suv2 = suv.copy()
    suv2[lesion] = 4.0
    hot = np.zeros_like(lesion)
    hot[18, 20, 20] = True                 # the lesion's SUVmax lies 12 mm above the click
    suv2[hot] = 20.0
    img2 = sitk.GetImageFromArray(suv2)
    img2.CopyInformation(img)
    region, t = L.threshold_region(suv2, (12, 20, 20), (2.0, 3.0, 3.0), "50pct")
    assert t == pytest.approx(10.0) and region.sum() == 1 and region[18, 20, 20]


def test_negative_click_removes_the_part_under_it_and_undo_restores_exactly():
    img, suv, lesion, liver = phantom()
    extra = np.zeros_like(lesion)
    extra[3:6, 15:20, 15:20] = True                    # a part of the segment made before (no click on it)
    s = L.LesionSession(img, "suv2.5", initial_mask=extra)
    m1 = s.add_click(CENTRE_IJK).copy()
    assert np.array_equal(m1, lesion | extra)
    m2 = s.add_click((17, 17, 4), positive=False)
    assert np.array_equal(m2, lesion)
    with pytest.raises(InputError, match="cannot split"):   # the part holding the positive click stays
        s.add_click(CENTRE_IJK, positive=False)
    assert np.array_equal(s.mask, lesion) and len(s.clicks) == 2
    assert np.array_equal(s.undo(), m1) and len(s.clicks) == 1
    assert np.array_equal(s.undo(), extra) and s.clicks == []
    with pytest.raises(InputError, match="Nothing to undo"):
        s.undo()


def test_bad_clicks_and_bad_volumes_get_clear_messages():
    img, suv, lesion, liver = phantom()
    s = L.LesionSession(img, "41pct")
    with pytest.raises(InputError, match="outside the body"):
        s.add_click((0, 0, 5))
    with pytest.raises(InputError, match="outside the volume"):
        s.add_click((60, 1, 1))
    before = s.mask.copy()
    assert np.array_equal(s.mask, before) and s.clicks == []
    empty = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32))
    with pytest.raises(InputError, match="empty"):
        L.LesionSession(empty, "41pct")
    ct = sitk.GetImageFromArray(np.full((8, 8, 8), -1000.0, np.float32) + np.eye(8, dtype=np.float32)[None] * 1500)
    with pytest.raises(InputError, match="CT"):
        L.LesionSession(ct, "41pct")
    nan = sitk.GetArrayFromImage(img)
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        L.LesionSession(sitk.GetImageFromArray(nan), "41pct")
    with pytest.raises(InputError, match="No PET"):
        L.LesionSession(None, "41pct")
    with pytest.raises(InputError, match="Unknown lesion method"):
        L.LesionSession(img, "otsu")


def test_click_parsing_and_physical_to_index():
    img, *_ = phantom()
    assert L.parse_click("1,2,3") == ((1.0, 2.0, 3.0), True)
    assert L.parse_click(" 1.5, -2, 3 :-") == ((1.5, -2.0, 3.0), False)
    for bad in ("1,2", "a,b,c", "1,2,3:x", "1,2,nan"):
        with pytest.raises(InputError):
            L.parse_click(bad)
    p = img.TransformContinuousIndexToPhysicalPoint(CENTRE_IJK)
    assert L.click_to_index(img, p, "lps") == pytest.approx(CENTRE_IJK)
    assert L.click_to_index(img, (-p[0], -p[1], p[2]), "ras") == pytest.approx(CENTRE_IJK)


# --------------------------------------------------------------------------------------------- lesion measures
def test_lesion_measures_of_a_known_sphere():
    img, suv, lesion, liver = phantom()
    sp = (2.0, 3.0, 3.0)
    m = L.lesion_measures(suv, lesion, sp, liver)
    n = int(lesion.sum())
    assert m["suv_max"] == pytest.approx(8.0) and m["suv_mean"] == pytest.approx(8.0)
    assert m["mtv_ml"] == pytest.approx(n * 18.0 / 1000) and m["tlg"] == pytest.approx(8.0 * n * 0.018)
    assert m["suv_peak"] == pytest.approx(float(sphere_mean(suv, sp)[lesion].max()))
    assert m["reference_region"] == "liver" and m["reference_suv_mean"] == pytest.approx(float(suv[liver].mean()))
    assert m["suv_max_to_reference"] == pytest.approx(8.0 / float(suv[liver].mean()))
    with pytest.raises(InputError, match="empty"):
        L.lesion_measures(suv, np.zeros_like(lesion), sp)


# --------------------------------------------------------------------------------------------- PE-MED sessions
class ThresholdingPredictor:
    """A stand-in of PEMEDPredictor.predict_slice (same signature and outputs) that segments the hot region under
    the positive clicks, so the 3D bookkeeping (self-loop, propagation, anchors, undo) can be checked exactly."""

    max_propagation_mm, min_pixels, max_growth = 1000.0, 1, 2.0

    def __init__(self, greedy=False):
        self.calls, self.extents, self.reaches = [], [], []
        self.greedy = greedy          # segment every hot pixel of the slice once there is a positive click

    def pixel_for(self, extent, reach=None):
        self.extents.append(extent)
        self.reaches.append(reach)
        return 1.0

    def predict_slice(self, suv2d, spacing_rc, centre_rc, clicks_rc, prev2d, prev_logits2d=None, pixel_mm=None):
        from scipy import ndimage
        assert pixel_mm == 1.0
        self.calls.append((len(clicks_rc), bool(np.asarray(prev2d).any()), prev_logits2d is not None))
        lab, _ = ndimage.label(suv2d > 4.0)
        if self.greedy and any(p for _, _, p in clicks_rc):
            return np.where(suv2d > 4.0, 5.0, -5.0).astype(np.float32)
        out = np.zeros(suv2d.shape, bool)
        for r, c, p in clicks_rc:
            v = lab[int(round(r)), int(round(c))]
            if v:
                out = out | (lab == v) if p else out & ~(lab == v)
        return np.where(out, 5.0, -5.0).astype(np.float32)


def test_pemed_session_self_loop_then_propagates_through_the_lesion_and_stops():
    img, suv, lesion, liver = phantom()
    pred = ThresholdingPredictor()
    s = L.LesionSession(img, "pemed", model=pred)
    m = s.add_click(CENTRE_IJK)
    assert np.array_equal(m, lesion)                  # carried slice by slice to both ends of the sphere
    assert pred.calls[0] == (1, False, False) and pred.calls[1] == (1, True, True)   # the self-loop's two passes
    n_first = len(pred.calls)
    # a second click on another slice of the lesion re-runs that slice with its previous logits (TSIP)
    m2 = s.add_click((19, 19, 14), positive=False)
    assert pred.calls[n_first][2] is True
    assert not m2[14].any() and not m2[15:].any() and np.array_equal(m2[:14], lesion[:14])
    assert np.array_equal(s.undo(), lesion)


def test_pemed_session_with_a_real_tiny_network(tmp_path):
    from SegmentationModuleLib.pemed import build_pemed
    torch.manual_seed(0)
    cfg = tiny_cfg()
    net = build_pemed(cfg)
    ckpt = {"config": cfg, "state_dict": net.state_dict()}
    img, suv, lesion, liver = phantom()
    s = L.LesionSession(img, "pemed", model=ckpt)
    m = s.add_click(CENTRE_IJK)
    assert m.shape == suv.shape and m.dtype == bool
    s.add_click((19, 19, 12), positive=False)
    assert np.array_equal(s.undo(), m)
    with pytest.raises(Exception, match="not a PE-MED model"):
        L.PEMEDPredictor({"config": {"task": "ldos"}, "state_dict": {}})


def test_zoom_in_picks_finer_crop_pixels_for_small_objects():
    from SegmentationModuleLib.clicks import extent_mm
    from SegmentationModuleLib.pemed import zoom_pixel_mm
    disk = np.add.outer((np.arange(41) - 20) ** 2, (np.arange(41) - 20) ** 2) <= 100   # r = 10 px
    assert extent_mm(disk, (0.5, 0.5)) == pytest.approx(10.0, rel=0.02)                 # r = 5 mm -> 10 mm
    assert extent_mm(np.zeros((4, 4)), (1, 1)) == 0.0
    cfg = tiny_cfg()
    assert zoom_pixel_mm(cfg, 4.0) == 3.0                   # no min_pixel_mm: the model's pixel, as before
    cfg["input"].update(min_pixel_mm=1.0, object_pixels=16)
    assert zoom_pixel_mm(cfg, 32.0) == pytest.approx(2.0)   # 32 mm over 16 pixels
    assert zoom_pixel_mm(cfg, 4.0) == 1.0 and zoom_pixel_mm(cfg, 200.0) == 3.0 and zoom_pixel_mm(cfg, None) == 3.0
    # the session measures the object: a small lesion's hot region at the first click, the propagated mask later
    img, suv, lesion, liver = phantom(radius_mm=6.0)
    pred = ThresholdingPredictor()
    s = L.LesionSession(img, "pemed", model=pred)
    s.add_click(CENTRE_IJK)
    z = int(round(CENTRE_IJK[2]))
    assert pred.extents[0] == pytest.approx(extent_mm(lesion[z], (3.0, 3.0)))
    assert all(e is not None and 0 < e <= pred.extents[0] + 1e-6 for e in pred.extents[2:])
    # a click off the lesion's centre still finds its hot region (taken at the maximum near the click)
    pred2 = ThresholdingPredictor()
    L.LesionSession(img, "pemed", model=pred2).add_click((CENTRE_IJK[0] + 3, CENTRE_IJK[1], CENTRE_IJK[2]))
    assert pred2.extents[0] == pytest.approx(pred.extents[0])


def test_zoom_in_keeps_an_elongated_object_and_spread_clicks_inside_the_crop():
    from SegmentationModuleLib.pemed import zoom_pixel_mm
    cfg = tiny_cfg()
    cfg["input"].update(min_pixel_mm=0.5, object_pixels=16)
    assert zoom_pixel_mm(cfg, 8.0) == 0.5
    assert zoom_pixel_mm(cfg, 8.0, reach=20.0) == pytest.approx(2 * 1.2 * 20.0 / 32)   # 20 mm out, crop 32 px
    assert zoom_pixel_mm(cfg, 8.0, reach=500.0) == 3.0
    # a thin hot bar clicked near one end: the crop must reach its far end
    img, suv, lesion, liver = phantom(radius_mm=0.1)
    bar = np.zeros_like(suv)
    bar[10:13, 19:21, 8:34] = 8.0                       # 2 px (6 mm) wide, 26 px (78 mm) long, in x
    suv2 = np.where(bar > 0, bar, suv)
    img2 = sitk.GetImageFromArray(suv2)
    img2.CopyInformation(img)
    pred = ThresholdingPredictor()
    s = L.LesionSession(img2, "pemed", model=pred)
    s.add_click((10, 19, 11))
    far = (33 - 10) * 3.0                               # mm from the click to the bar's far end
    assert pred.reaches[0] >= far - 1e-6
    cfg["input"]["crop"] = 64
    pixel = zoom_pixel_mm(cfg, pred.extents[0], pred.reaches[0])
    assert pixel * 64 / 2 >= far and pixel < 3.0       # the far end inside the crop, still zoomed in


# --------------------------------------------------------------------------------------------- training
def synthetic_cases(n=2):
    cases = []
    for i in range(n):
        img, suv, lesion, liver = phantom(lesion_suv=6.0 + i)
        cases.append(dict(case_id=f"c{i}", images={"full_dose": suv, "low_dose": suv * 1.1},
                          labels=liver.astype(np.uint8) * 5, lesions=lesion.astype(np.uint8), spacing=(2.0, 3.0, 3.0)))
    return cases


def test_sampler_gives_clicks_inside_the_object_and_propagation_samples():
    from SegmentationModuleLib.pemed_train import ClickSampler
    s = ClickSampler(synthetic_cases(), tiny_cfg(), seed=0)
    kinds = set()
    for _ in range(40):
        img, clicks, prev, target = s.sample_one()
        assert img.shape == target.shape == prev.shape == (32, 32)
        r, c, p = clicks[0]
        assert p
        ref = prev if prev.any() else target
        if ref.any():
            assert ref[int(round(r)), int(round(c))] > 0.5
        kinds.add(bool(prev.any()))
    assert kinds == {True, False}


def test_sampler_zooms_in_on_small_objects_when_the_config_asks():
    from SegmentationModuleLib.pemed_train import ClickSampler
    cfg = tiny_cfg()
    cfg["training"]["p_lesion"] = 1.0
    areas = {}
    for zoom in (False, True):
        if zoom:
            cfg["input"].update(min_pixel_mm=1.0, object_pixels=16)
        s = ClickSampler(synthetic_cases(), cfg, seed=0)
        areas[zoom] = np.mean([s.sample_one()[3].sum() for _ in range(30)])
    # the 18 mm lesion: 6 pixels of 3 mm across without zoom, about 16 (pixels of ~1.1 mm) with it
    assert areas[True] > 3 * areas[False] > 0


def test_training_resumes_exactly(tmp_path):
    from SegmentationModuleLib.pemed_train import train
    torch.set_num_threads(1)
    cases = synthetic_cases()
    train(tiny_cfg(), tmp_path / "a", cases=cases, device="cpu", log=lambda s: None)
    cfg = tiny_cfg()
    cfg["training"]["iterations"] = 4
    r = train(cfg, tmp_path / "b", cases=cases, device="cpu", max_minutes=0.0, log=lambda s: None)
    assert r["stopped"] == "time_limit" and r["iterations"] == 1
    train(cfg, tmp_path / "b", cases=cases, device="cpu", log=lambda s: None)
    from PETWorkbenchLib.models import load_checkpoint
    a = load_checkpoint(tmp_path / "a" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- command line
def test_lesion_command_replays_clicks_and_writes_mask_and_table(tmp_path, capsys):
    import csv
    import json

    from PETWorkbenchApp.cli import main
    img, suv, lesion, liver = phantom()
    pet = tmp_path / "pet.nii.gz"
    sitk.WriteImage(img, str(pet))
    liv = sitk.GetImageFromArray(liver.astype(np.uint8))
    liv.CopyInformation(img)
    sitk.WriteImage(liv, str(tmp_path / "liver.nii.gz"))
    x, y, z = img.TransformContinuousIndexToPhysicalPoint(CENTRE_IJK)
    before = (tmp_path / "pet.nii.gz").read_bytes()
    rc = main(["lesion", "--input", str(pet), f"--click={-x},{-y},{z}", "--click-space", "ras", "--method", "41pct",
               "--liver-mask", str(tmp_path / "liver.nii.gz"), "--output", str(tmp_path / "mask.nii.gz"),
               "--table", str(tmp_path / "t.json"), "--json"])
    assert rc == 0
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.nii.gz")))
    assert np.array_equal(mask > 0, lesion)
    row = json.loads((tmp_path / "t.json").read_text())["lesions"][0]
    assert row["suv_max"] == pytest.approx(8.0) and row["reference_region"] == "liver"
    assert row["mtv_ml"] == pytest.approx(lesion.sum() * 0.018)
    rc = main(["lesion", "--input", str(pet), f"--click={x},{y},{z}:+", f"--click={x},{y},{z}:-",
               "--method", "suv2.5", "--output", str(tmp_path / "mask2.nii.gz")])
    assert rc == 2 and "cannot split" in capsys.readouterr().err
    assert not (tmp_path / "mask2.nii.gz").exists()
    rc = main(["lesion", "--input", str(pet), "--click=0,0,0", "--click-space", "ijk", "--method", "41pct",
               "--output", str(tmp_path / "m3.nii.gz"), "--table", str(tmp_path / "t.csv")])
    assert rc == 2 and "outside the body" in capsys.readouterr().err
    assert not (tmp_path / "m3.nii.gz").exists() and not (tmp_path / "t.csv").exists()
    rc = main(["lesion", "--input", str(pet), f"--click={x},{y},{z}", "--method", "50pct",
               "--output", str(tmp_path / "m4.nii.gz"), "--table", str(tmp_path / "t.csv")])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert rows[0]["method"] == "50pct" and float(rows[0]["suv_max"]) == pytest.approx(8.0)
    # PE-MED with the shipped model (the default of --model)
    rc = main(["lesion", "--input", str(pet), f"--click={x},{y},{z}", "--output", str(tmp_path / "m5.nii.gz"),
               "--table", str(tmp_path / "t5.json")])
    assert rc == 0
    m5 = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "m5.nii.gz"))) > 0
    assert m5[11, 19, 19] and json.loads((tmp_path / "t5.json").read_text())["lesions"][0]["method"] == "pemed"
    assert (tmp_path / "pet.nii.gz").read_bytes() == before


def test_propagation_keeps_the_connected_part_and_stops_at_a_leak():
    # a lesion touching a large hot structure two slices up: the propagation must not run into it
    img, suv, lesion, liver = phantom()
    suv2 = suv.copy()
    suv2[15:, 5:35, 5:35] = np.where(suv2[15:, 5:35, 5:35] > 0, 6.0, 0.0)   # a hot organ above the lesion
    img2 = sitk.GetImageFromArray(suv2)
    img2.CopyInformation(img)
    s = L.LesionSession(img2, "pemed", model=ThresholdingPredictor(greedy=True))
    m = s.add_click(CENTRE_IJK)
    assert not m[15:].any() and np.array_equal(m[:15], lesion[:15])
    # a separate hot spot on the clicked slice is not part of the lesion
    suv3 = suv.copy()
    suv3[11, 30:33, 30:33] = 9.0
    img3 = sitk.GetImageFromArray(suv3)
    img3.CopyInformation(img)
    s = L.LesionSession(img3, "pemed", model=ThresholdingPredictor(greedy=True))
    assert np.array_equal(s.add_click(CENTRE_IJK), lesion)


def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path):
    # the paper-size configuration trains with torchrun: each rank samples its own clicks, DDP averages gradients
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), str(tmp_path / "init")), nprocs=2, join=True)
    p0, p1 = (torch.load(str(tmp_path / f"p{r}.pt"), weights_only=True) for r in (0, 1))
    # every weight is identical; BatchNorm running statistics are each rank's own (DDP broadcasts rank 0's, whose
    # model is the one saved, before each forward)
    assert all(torch.allclose(p0[k], p1[k], atol=1e-6) for k in p0 if not k.endswith(("running_mean", "running_var")))
    from PETWorkbenchLib.models import load_checkpoint
    ck = load_checkpoint(tmp_path / "model.pt")
    assert ck["training"]["world_size"] == 2 and ck["training"]["iterations"] == 2
    latest = torch.load(str(tmp_path / "checkpoint_latest.pt"), weights_only=True)
    assert len(latest["sampler_rng"]) == 2 and latest["sampler_rng"][0] != latest["sampler_rng"][1]


def _ddp_worker(rank, world, tmp, init_file):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import SegmentationModuleLib.pemed_train as pt
    captured = {}
    orig = pt.build_pemed

    def capture(cfg):
        captured["net"] = orig(cfg)
        return captured["net"]
    pt.build_pemed = capture
    cfg = tiny_cfg()
    cfg["training"].update(iterations=2, checkpoint_every=2)
    pt.train(cfg, tmp, cases=synthetic_cases(), device="cpu", log=lambda *a: None)
    torch.save({k: v.detach().clone() for k, v in captured["net"].state_dict().items()},
               os.path.join(tmp, f"p{rank}.pt"))
    dist.destroy_process_group()


def test_inner_distance_in_the_bounding_box_equals_the_whole_image_transform():
    from scipy import ndimage

    from SegmentationModuleLib.clicks import _inner_distance
    rng = np.random.default_rng(1)
    m = ndimage.binary_opening(rng.random((20, 30, 25)) > 0.6)
    m[:, :3] = False
    full = ndimage.distance_transform_edt(np.pad(m, 1), sampling=(2.0, 1.0, 1.5))[1:-1, 1:-1, 1:-1]
    assert np.allclose(_inner_distance(m, (2.0, 1.0, 1.5)), full)


def test_a_later_stage_starts_from_given_weights_of_the_same_network(tmp_path):
    from PETWorkbenchLib.errors import ModelError
    from PETWorkbenchLib.models import load_checkpoint
    from SegmentationModuleLib.pemed_train import train
    torch.set_num_threads(1)
    cases = synthetic_cases()
    train(tiny_cfg(), tmp_path / "a", cases=cases, device="cpu", log=lambda s: None)
    cfg = tiny_cfg()
    cfg["training"]["lr"] = 0.0                       # no update: the stage's weights are the ones it started from
    train(cfg, tmp_path / "b", cases=cases, device="cpu", log=lambda s: None, init=tmp_path / "a" / "model.pt")
    a = load_checkpoint(tmp_path / "a" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "model.pt")
    assert b["training"]["init"] == "model.pt"
    assert all(torch.equal(a[k], b["state_dict"][k]) for k in a if not k.endswith(("running_mean", "running_var",
                                                                                    "num_batches_tracked")))
    other = tiny_cfg()
    other["network"]["decoder_dim"] = 16
    with pytest.raises(ModelError, match="another network config"):
        train(other, tmp_path / "c", cases=cases, device="cpu", log=lambda s: None, init=tmp_path / "a" / "model.pt")
