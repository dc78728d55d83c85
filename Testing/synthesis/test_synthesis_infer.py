"""Inference pipeline, bad input, metrics, interference, evaluation tables, routing plot, CLI."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from synthesis_data import TINY_MODEL, phantom, write_image
from PETWorkbenchLib.errors import Cancelled, InputError, ModelError
from SynthesisModuleLib import infer
from SynthesisModuleLib.data import CenterPatchSampler
from SynthesisModuleLib.evaluate import evaluate
from SynthesisModuleLib.infer import synthesize
from SynthesisModuleLib.metrics import interference, lesion_suv_bias, lesion_suv_errors, psnr, routing_plot, ssim
from SynthesisModuleLib.model import build_model

torch.set_num_threads(1)


def _ckpt(identity=False, seed=0):
    torch.manual_seed(seed)
    net = build_model(TINY_MODEL)
    if identity:
        with torch.no_grad():
            net.tail_conv.weight.zero_()
            net.tail_conv.bias.zero_()
    return {"config": {"name": "tiny", "model": TINY_MODEL, "train": {"patch_size": 12}},
            "state_dict": net.state_dict()}


def _image(spacing=(2.0, 2.0, 2.0), shape=(14, 16, 16)):
    full, _ = phantom(shape)
    img = sitk.GetImageFromArray(full)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 5.0, 30.0))
    return img


def test_identity_network_reproduces_input_on_input_grid():
    img = _image()
    out, summ = synthesize(img, _ckpt(identity=True), device="cpu", overlap=0.25)
    assert out.GetSize() == img.GetSize() and out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(img), atol=1e-5)
    assert summ["routed"] and len(summ["banks"]) == 4 and summ["n_patches"] >= 8
    assert np.allclose(np.sum(summ["top1_fraction"], axis=1), 1.0)


def test_any_grid_goes_through_2mm_and_back_nonnegative():
    img = _image(spacing=(3.1, 3.1, 1.8), shape=(12, 11, 13))
    out, summ = synthesize(img, _ckpt(seed=1), device="cpu", patch=12)
    assert out.GetSize() == img.GetSize() and np.allclose(out.GetSpacing(), img.GetSpacing())
    arr = sitk.GetArrayFromImage(out)
    assert arr.min() >= 0 and np.isfinite(arr).all()
    assert summ["grid_2mm"] == [round(n * sp / 2.0) for n, sp in zip(img.GetSize(), img.GetSpacing())]


def test_the_2mm_round_trip_keeps_a_small_lesion():
    """Only the network's change goes back to the input grid: an identity network returns a 1.3 mm input with a
    4 mm hot sphere unchanged, where resampling the image itself through 2 mm and back flattens the sphere."""
    from PETWorkbenchLib.imageio import resample_like, resample_to_spacing
    z, y, x = np.meshgrid(*[np.arange(24) * 1.3] * 3, indexing="ij")
    arr = np.full((24, 24, 24), 1.0, np.float32)
    arr[(z - 15.3) ** 2 + (y - 14.9) ** 2 + (x - 15.6) ** 2 < 2.0 ** 2] = 8.0
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.3, 1.3, 1.3))
    out, _ = synthesize(img, _ckpt(identity=True), device="cpu", patch=12, overlap=0.25)
    np.testing.assert_allclose(sitk.GetArrayFromImage(out), arr, atol=1e-5)
    trip = sitk.GetArrayFromImage(resample_like(resample_to_spacing(img, (2.0, 2.0, 2.0)), img))
    assert trip.max() < 0.9 * arr.max()  # what resampling the image itself would cost the lesion
    # a network that does change the image: the change is added to the native input (on-grid part unchanged)
    res, _ = synthesize(img, _ckpt(seed=2), device="cpu", patch=12, overlap=0.25)
    assert np.abs(sitk.GetArrayFromImage(res) - arr).max() > 1e-3


def test_bad_inputs_get_clear_messages(monkeypatch):
    ck = _ckpt()
    with pytest.raises(InputError, match="3D"):
        synthesize(sitk.Image(16, 16, sitk.sitkFloat32), ck, device="cpu")
    with pytest.raises(InputError, match="SUV"):
        synthesize(_image(), ck, device="cpu", units="Bq/ml")
    with pytest.raises(InputError, match="empty"):
        synthesize(sitk.Image(16, 16, 16, sitk.sitkFloat32), ck, device="cpu")
    nan = sitk.GetArrayFromImage(_image())
    nan[3, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        synthesize(sitk.GetImageFromArray(nan), ck, device="cpu")
    big = sitk.GetArrayFromImage(_image()) * 30000.0
    with pytest.raises(InputError, match="Bq/ml"):
        synthesize(sitk.GetImageFromArray(big), ck, device="cpu")
    monkeypatch.setattr(infer, "MAX_VOXELS_2MM", 1000)
    with pytest.raises(InputError, match="limit"):
        synthesize(_image(), ck, device="cpu")
    monkeypatch.undo()
    bad = _ckpt()
    bad["config"] = {"model": {**TINY_MODEL, "n_feats": 16, "num_heads": 2}, "train": {}}
    with pytest.raises(ModelError, match="do not match"):
        synthesize(_image(), bad, device="cpu")
    with pytest.raises(ModelError):
        synthesize(_image(), "/nonexistent/weights.pt", device="cpu")
    with pytest.raises(Cancelled):
        synthesize(_image(), ck, device="cpu", cancel=lambda: True)


def test_progress_is_reported_and_bounded():
    seen = []
    synthesize(_image(), _ckpt(), device="cpu", progress=lambda f, m: seen.append(f))
    assert seen and all(0 <= f <= 1 for f in seen) and seen[-1] == 1.0 and seen == sorted(seen)


def test_metrics_definitions():
    rng = np.random.default_rng(0)
    ref, les = phantom((12, 14, 14))
    assert psnr(ref, ref) == math.inf and abs(ssim(ref, ref) - 1) < 1e-9
    c = 0.05
    assert abs(psnr(ref + c, ref) - 20 * np.log10(ref.max() / c)) < 1e-6
    noisy = ref + 0.3 * rng.standard_normal(ref.shape)
    noisier = ref + 0.6 * rng.standard_normal(ref.shape)
    assert ssim(noisier, ref) < ssim(noisy, ref) < 1
    bm, bx, n = lesion_suv_bias(1.1 * ref, ref, les)
    assert n == 1 and abs(bm - 0.1) < 1e-6 and abs(bx - 0.1) < 1e-6
    # the bias is absolute, the diagnostic error keeps the sign (flattened lesions are negative)
    assert lesion_suv_bias(0.9 * ref, ref, les)[:2] == pytest.approx((0.1, 0.1))
    (em, ex), = lesion_suv_errors(0.9 * ref, ref, les)
    assert em == pytest.approx(-0.1) and ex == pytest.approx(-0.1)
    two = les.copy()
    two[0, 7, 2] = 1  # a second, separate lesion inside the body (connected components)
    assert lesion_suv_bias(ref, ref, two)[2] == 2
    with pytest.raises(InputError, match="shape"):
        psnr(ref[:-1], ref)


def test_interference_is_one_for_identical_centres_and_normalised():
    torch.manual_seed(0)
    net = build_model(TINY_MODEL)
    vol, _ = phantom((12, 12, 12))  # volume = patch: every batch of a centre is the same
    low = vol + 0.2 * np.random.default_rng(0).standard_normal(vol.shape).astype(np.float32)
    same = CenterPatchSampler({"A": [(low, vol)], "B": [(low, vol)]}, 12)
    res = interference(net, same, n_batches=2, batch_size=1)
    for g, mat in res["groups"].items():
        mat = np.array(mat)
        assert np.allclose(np.diag(mat), 1.0)
        assert np.allclose(mat, 1.0, atol=1e-6)  # same data: identical gradients
    flipped = CenterPatchSampler({"A": [(low, vol)], "B": [(vol, low)]}, 12)  # opposite residual direction
    mat = np.array(interference(net, flipped, n_batches=2, batch_size=1)["groups"]["block2"])
    assert mat[0, 1] < 1.0


def test_interference_matches_a_finite_difference_evaluation_of_its_definition():
    """Supplement eq. 4-5 evaluated literally: step the block's parameters by -lambda g_j / ||g_j|| for each
    direction batch X_j, measure the loss change at each evaluation batch X_i, average; ratio to the centre's own
    change, averaged over X_i. With a small lambda (float64) it must equal the first-order result."""
    from SynthesisModuleLib.metrics import interference_batches
    from SynthesisModuleLib.model import charbonnier_loss
    torch.manual_seed(1)
    net = build_model({**TINY_MODEL, "tail_init": "default"}).double()
    net.sparse = False
    rng = np.random.default_rng(0)
    vols = {c: [(a + s * rng.standard_normal(a.shape).astype(np.float32), a)
                for a in [phantom((12, 12, 12), seed=k)[0] for k in range(2)]]
            for c, s in (("A", 0.2), ("B", 0.5), ("C", 0.05))}
    sampler = CenterPatchSampler(vols, 8)
    batches = interference_batches(sampler, n_batches=3, batch_size=1, seed=4)
    assert len(batches["A"]["direction"]) == len(batches["A"]["evaluate"]) == 3
    assert not np.array_equal(batches["A"]["direction"][0][0], batches["A"]["evaluate"][0][0])  # independent draws
    got = interference(net, sampler, batches=batches)
    assert got["n_batches"] == 3
    group = [p for n, p in net.named_parameters() if n.startswith("body.1.")]

    def loss(pair):
        with torch.no_grad():
            x, y = (torch.as_tensor(a, dtype=torch.float64) for a in pair)
            return float(charbonnier_loss(net(x), y))

    def unit_grad(pair):
        net.zero_grad(set_to_none=True)
        x, y = (torch.as_tensor(a, dtype=torch.float64) for a in pair)
        charbonnier_loss(net(x), y).backward()
        g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in group]
        norm = torch.sqrt(sum((v ** 2).sum() for v in g))
        return [v / norm for v in g]

    lam = 1e-5
    centres = ["A", "B", "C"]
    units = {c: [unit_grad(b) for b in batches[c]["direction"]] for c in centres}

    def delta(c_i, pair):  # Delta_j L_i(X_i) for every centre j
        base = loss(pair)
        out = {}
        for c_j in centres:
            changes = []
            for u in units[c_j]:
                with torch.no_grad():
                    for p, v in zip(group, u):
                        p.sub_(lam * v)
                changes.append(base - loss(pair))
                with torch.no_grad():
                    for p, v in zip(group, u):
                        p.add_(lam * v)
            out[c_j] = np.mean(changes)
        return out

    fd = np.zeros((3, 3))
    for i, c_i in enumerate(centres):
        ratios = []
        for pair in batches[c_i]["evaluate"]:
            d = delta(c_i, pair)
            ratios.append([d[c_j] / d[c_i] for c_j in centres])
        fd[i] = np.mean(ratios, axis=0)
    mat = np.array(got["groups"]["block2"])
    assert np.allclose(mat, fd, rtol=2e-3, atol=2e-3), (mat, fd)
    assert np.ptp(mat) > 0.05  # not a trivial all-equal matrix


def test_evaluate_tables_unknown_centre_and_routing_png(tiny_manifest, tmp_path):
    s = evaluate({"drmc": _ckpt(identity=True)}, tiny_manifest, out_dir=tmp_path / "ev", device="cpu", patch=12)
    t = s["table"]
    assert set(t) == {"low", "drmc"}
    assert set(t["low"]) == {"A", "B", "U"} and t["low"]["U"]["known"] is False
    # an identity network reproduces the low-dose input: same metrics
    for c in ("A", "B", "U"):
        assert abs(t["low"][c]["psnr"] - t["drmc"][c]["psnr"]) < 1e-3
    assert "known" in s["average"]["low"] and "unknown" in s["average"]["low"]
    png = tmp_path / "ev" / "routing_drmc.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert set(s["routing"]["drmc"]) == {"A", "B", "U"}
    assert (tmp_path / "ev" / "table.md").read_text().count("| drmc |") >= 3
    with pytest.raises(InputError):
        routing_plot({"x": {"routed": False}}, tmp_path / "none.png")


def test_evaluate_reference_rows(tiny_manifest, tmp_path):
    """A reference image (here the full dose itself) is scored like the input: zero lesion bias, top PSNR."""
    import SimpleITK as sitk
    seen = []

    def full_dose(row):
        seen.append(row["case_id"])
        return sitk.ReadImage(row["full_dose"])

    s = evaluate({"drmc": _ckpt(identity=True)}, tiny_manifest, device="cpu", patch=12,
                 references={"perfect": full_dose})
    t = s["table"]
    assert set(t) == {"low", "drmc", "perfect"} and len(seen) == s["n_cases"] == 3
    for c in ("A", "B", "U"):
        assert t["perfect"][c]["b_max"] == 0.0 and t["perfect"][c]["b_mean"] == 0.0
        assert t["perfect"][c]["psnr"] > t["low"][c]["psnr"] + 20
        assert t["low"][c]["b_max"] > 0
    with pytest.raises(InputError, match="already used"):
        evaluate({"drmc": _ckpt(identity=True)}, tiny_manifest, device="cpu", patch=12, references={"low": full_dose})


def test_cli_synthesize_and_train(tiny_manifest, tmp_path):
    from PETWorkbenchApp.cli import main
    torch.save(_ckpt(), tmp_path / "w.pt")
    write_image(phantom()[0], tmp_path / "in.nii.gz")
    rc = main(["synthesize", str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz"), "--model",
               str(tmp_path / "w.pt"), "--device", "cpu", "--routing-json", str(tmp_path / "r.json")])
    assert rc == 0 and (tmp_path / "out.nii.gz").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["routed"]
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": TINY_MODEL, "train": {"patch_size": 12, "batch_size": 1}}))
    rc = main(["train", "synthesis", "--config", str(cfg), "--manifest", str(tiny_manifest), "--out",
               str(tmp_path / "tr"), "--max-steps", "2", "--export", str(tmp_path / "e.pt")])
    assert rc == 0 and (tmp_path / "e.pt").is_file()
    rc = main(["synthesize", str(tmp_path / "in.nii.gz"), str(tmp_path / "o2.nii.gz"), "--model", "x.pt",
               "--units", "Bq/ml"])
    assert rc == 2  # InputError


def test_cli_takes_bq_per_ml_with_weight_and_dose(tmp_path):
    """Bq/ml in, Bq/ml out, the network run on the same SUV as for an SUV input."""
    from PETWorkbenchApp.cli import main
    torch.save(_ckpt(), tmp_path / "w.pt")
    suv = phantom()[0]
    factor = 70.0 * 1000.0 / 350e6                          # SUV per Bq/ml for 70 kg and 350 MBq
    write_image(suv, tmp_path / "suv.nii.gz")
    write_image(suv / factor, tmp_path / "bq.nii.gz")
    common = ["--model", str(tmp_path / "w.pt"), "--device", "cpu"]
    assert main(["synthesize", str(tmp_path / "suv.nii.gz"), str(tmp_path / "o_suv.nii.gz")] + common) == 0
    assert main(["synthesize", str(tmp_path / "bq.nii.gz"), str(tmp_path / "o_bq.nii.gz"), "--units", "Bq/ml",
                 "--weight-kg", "70", "--injected-dose-mbq", "350"] + common) == 0
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o_suv.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o_bq.nii.gz")))
    assert np.allclose(b * factor, a, rtol=1e-4, atol=1e-4 * a.max())
    assert main(["synthesize", str(tmp_path / "bq.nii.gz"), str(tmp_path / "o3.nii.gz")] + common) == 2  # as SUV


def test_air_patches_skip_the_network_and_return_the_input():
    from SynthesisModuleLib.infer import skip_empty
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return x + 1.0
    run = skip_empty(net, 0.02)
    x = torch.zeros(4, 1, 8, 8, 8)
    x[1, 0, 3, 3, 3] = 0.5  # one patch holds tissue
    out = run(x)
    assert calls == [1] and torch.equal(out[[0, 2, 3]], x[[0, 2, 3]]) and torch.allclose(out[1], x[1] + 1)
    calls.clear()
    run(x + 1.0)
    assert calls == [4]  # nothing to skip: one batched call
    # in synthesize(): the body's box through the network, air returned as it is; skip_air=False runs everything
    img = _image(shape=(14, 40, 16))
    arr = sitk.GetArrayFromImage(img)
    arr[:, 20:, :] = 0.0
    img2 = sitk.GetImageFromArray(arr)
    img2.CopyInformation(img)
    a, _ = synthesize(img2, _ckpt(seed=3), device="cpu", patch=12)
    net, _ = infer.load_model(_ckpt(seed=3))
    expect, _ = infer.predict_array(net, arr, 12, empty_level=infer.EMPTY_PATCH_SUV, crop=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(a), np.clip(expect, 0, None), atol=1e-6)
    assert np.abs(sitk.GetArrayFromImage(a)[:, 20:]).max() == 0.0  # air stays air
    b, _ = synthesize(img2, _ckpt(seed=3), device="cpu", patch=12, skip_air=False)
    assert np.abs(sitk.GetArrayFromImage(b)[:, 20:]).max() > 0.0   # the network ran on the air as well


def test_the_windows_cover_only_the_body_box_and_air_outside_it_is_returned():
    calls = []
    net = build_model(TINY_MODEL).eval()

    def counted(x):
        calls.append(x.shape[0])
        return net(x)
    counted.num_banks = net.num_banks
    counted.to = lambda *a, **k: counted
    counted.eval = lambda: counted
    rng = np.random.default_rng(0)
    arr = np.zeros((20, 30, 40), np.float32)
    arr[3:15, 5:21, 10:34] = rng.uniform(0.1, 2.0, (12, 16, 24)).astype(np.float32)   # the body
    arr[0, 29, 0] = 0.01                                                                # air noise below the level
    box = infer.body_box(arr, 0.02)
    assert box == (slice(3, 15), slice(5, 21), slice(10, 34))
    y, _ = infer.predict_array(counted, arr, 8, 0.25, 4, empty_level=0.02, crop=True)
    n_crop = sum(calls)
    calls.clear()
    y_box, _ = infer.predict_array(counted, arr[box], 8, 0.25, 4, empty_level=0.02)
    assert sum(calls) == n_crop          # the same windows as on the box alone
    np.testing.assert_array_equal(y[box], y_box)
    outside = np.ones(arr.shape, bool)
    outside[box] = False
    np.testing.assert_array_equal(y[outside], arr[outside])   # air outside the box returned as it is
    calls.clear()
    infer.predict_array(counted, arr, 8, 0.25, 4, empty_level=0.02)
    assert sum(calls) > n_crop           # without cropping, windows partly in air run as well
    calls.clear()
    # a box thinner than the patch and touching the array's edge; crop without an air level does not crop
    thin = np.zeros((20, 30, 40), np.float32)
    thin[0:3, 25:30, 2:6] = 1.5
    assert infer.body_box(thin, 0.02) == (slice(0, 3), slice(25, 30), slice(2, 6))
    y_thin, _ = infer.predict_array(counted, thin, 8, 0.25, 4, empty_level=0.02, crop=True)
    assert sum(calls) == 1 and y_thin.shape == thin.shape and np.isfinite(y_thin).all()
    outside = np.ones(thin.shape, bool)
    outside[0:3, 25:30, 2:6] = False
    np.testing.assert_array_equal(y_thin[outside], thin[outside])
    calls.clear()
    infer.predict_array(counted, thin, 8, 0.25, 4, crop=True)
    assert sum(calls) == math.prod(math.ceil((s - 8) / 6) + 1 for s in thin.shape)   # every window (stride 6)
    calls.clear()
    air = np.full((10, 10, 10), 0.01, np.float32)
    y_air, _ = infer.predict_array(counted, air, 8, 0.25, 4, empty_level=0.02, crop=True)
    assert calls == [] and np.array_equal(y_air, air)


def test_precision_choice_and_its_errors():
    from PETWorkbenchLib import device as devmod
    assert devmod.inference_precision("cpu") == "float32"
    assert devmod.inference_precision("cpu", "BFloat16") == "bfloat16"
    assert devmod.inference_precision("cpu", torch.bfloat16) == "bfloat16"
    with pytest.raises(InputError, match="half"):
        devmod.inference_precision("cpu", "half")
    with pytest.raises(InputError, match="half"):
        synthesize(_image(), _ckpt(), device="cpu", precision="half")
    assert synthesize(_image(), _ckpt(), device="cpu")[1]["precision"] == "float32"


def test_bfloat16_body_keeps_the_change_added_to_the_input_in_float32():
    net = build_model(TINY_MODEL).eval()
    with torch.no_grad():
        net.tail_conv.weight.normal_(0, 0.3)   # a real predicted change, not the zero-initialised tail
    seen = []
    net.tail_conv.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 12, 12) * 5
    with torch.inference_mode():
        ref = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x)
    # the float32 pass is fused (its convolutions are conv3x3 calls); the bfloat16 pass runs the tail module
    assert seen == [(torch.float32, torch.float32)] and y.dtype == torch.float32
    change, ref_change = y - x, ref - x
    rel = (change - ref_change).norm() / ref_change.norm()
    assert 0 < rel < 0.02          # the body ran in bfloat16 (not bit-equal), close to float32


def test_synthesize_in_bfloat16_is_close_to_float32_and_says_so():
    img = _image()
    a, sa = synthesize(img, _ckpt(seed=2), device="cpu", precision="float32")
    b, sb = synthesize(img, _ckpt(seed=2), device="cpu", precision="bfloat16")
    assert sa["precision"] == "float32" and sb["precision"] == "bfloat16"
    fa, fb = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    assert fb.dtype == np.float32 and not np.array_equal(fa, fb)
    assert np.abs(fb - fa).max() < 0.02 * fa.max()
