"""Tests of the LDOS segmentation engine (SegmentationModuleLib). Tiny data: the whole file runs in seconds."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError, ModelError
from SegmentationModuleLib import evaluate, organ_specs, organ_uptake, region_at_click, resolve_organs
from SegmentationModuleLib.augment import misalign_labels, warp_labels
from SegmentationModuleLib.data import PatchSampler, random_cases
from SegmentationModuleLib.losses import (deep_supervision_weights, denoising_loss, ldos_loss, phi_schedule,
                                          segmentation_loss, soft_dice_loss)
from SegmentationModuleLib.model import LDOSNet
from SegmentationModuleLib.organs import terminology_path
from PETWorkbenchLib.models import read_torch_file

torch.set_num_threads(1)

TINY = {"task": "ldos", "spacing": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16], "batch_size": 2, "epochs": 2,
        "iterations_per_epoch": 2, "optimizer": {"name": "adamw", "lr": 3e-3},
        "misalignment": {"p": 0.5, "max_shift_mm": 4.0, "max_deform_mm": 2.0}, "norm": {"clip": 50, "scale": 5},
        "inference": {"overlap": 0.25, "sw_batch_size": 2},
        "network": {"in_channels": 1, "n_classes": 19, "features": [4, 8], "strides": [1, 2],
                    "n_blocks": [1, 1], "n_conv_decoder": 1}}

EXPECTED = ["spleen", "colon", "urinary_bladder", "sacrum", "vertebrae", "heart", "aorta", "clavicula", "femur",
            "hip", "autochthon", "kidney", "brain", "liver", "stomach", "pancreas", "lung", "esophagus"]


# ---------------------------------------------------------------- terminology
def test_terminology_has_the_18_paper_organs_with_snomed_codes():
    assert terminology_path().name == "PETWorkbenchOrgans.term.json"
    organs = organ_specs()
    assert [o["name"] for o in organs] == EXPECTED
    assert [o["value"] for o in organs] == list(range(1, 19))
    codes = set()
    for o in organs:
        t = o["terminology"]
        assert t["category"] == {"codingScheme": "SCT", "codeValue": "123037004", "codeMeaning": "Anatomical Structure"}
        assert t["type"]["codingScheme"] == "SCT" and t["type"]["codeValue"].isdigit() and t["type"]["codeMeaning"]
        assert f"SCT^{t['type']['codeValue']}^{t['type']['codeMeaning']}" in t["slicerTerminologyEntry"]
        assert len(o["color"]) == 3 and all(0 <= c <= 1 for c in o["color"])
        codes.add(t["type"]["codeValue"])
    assert len(codes) == 18
    by = {o["name"]: o["terminology"]["type"]["codeValue"] for o in organs}
    assert by["liver"] == "10200004" and by["spleen"] == "78961009" and by["lung"] == "39607008"


def test_resolve_organs_names_values_and_errors():
    assert resolve_organs(["liver", 1, "Urinary bladder", "3"]) == [1, 3, 14]
    assert len(organ_specs()) == 18 and [s["name"] for s in organ_specs(["lung"])] == ["lung"]
    with pytest.raises(InputError, match="Unknown organ 'livr'"):
        resolve_organs(["livr"])
    with pytest.raises(InputError, match="Unknown organ label value 42"):
        resolve_organs([42])


# ---------------------------------------------------------------- network and losses
def test_shared_encoder_two_decoders_same_architecture_and_deep_supervision():
    net = LDOSNet(n_classes=5, features=[4, 8, 16], strides=[1, 2, 2], n_blocks=[1, 2, 2])
    seg_shapes = [tuple(p.shape) for p in net.seg_decoder.parameters()]
    den_shapes = [tuple(p.shape) for p in net.den_decoder.parameters()]
    # same architecture except the output heads (C classes vs 1 channel)
    assert len(seg_shapes) == len(den_shapes)
    # weight + bias of the 2 heads (one per decoder stage)
    assert sum(a != b for a, b in zip(seg_shapes, den_shapes)) == 2 * 2
    net.train()
    out = net(torch.randn(2, 1, 16, 16, 16))
    assert [o.shape[2:] for o in out["seg"]] == [(16, 16, 16), (8, 8, 8)]  # one output per decoder stage
    assert out["seg"][0].shape[1] == 5 and out["den"][0].shape[1] == 1
    # both losses reach the shared encoder
    ldos_loss(out, torch.randint(0, 5, (2, 16, 16, 16)), torch.rand(2, 1, 16, 16, 16))[0].backward()
    g_enc = net.encoder.stem[0].weight.grad.abs().sum()
    assert g_enc > 0 and net.den_decoder.heads[-1].weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 16, 16, 16))
    assert out["seg"].shape == (1, 5, 16, 16, 16)
    segonly = LDOSNet(n_classes=5, features=[4, 8, 16], strides=[1, 2, 2], n_blocks=[1, 2, 2], denoise=False)
    assert not segonly.has_denoiser and "den" not in segonly(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="n_blocks"):
        LDOSNet(features=[4, 8], strides=[1, 2], n_blocks=[1, 2, 3])


def test_deep_supervision_weights_and_phi_schedule():
    w = deep_supervision_weights(4)
    assert math.isclose(sum(w), 1.0) and w[-1] == 0 and math.isclose(w[0], 2 * w[1]) and math.isclose(w[1], 2 * w[2])
    assert phi_schedule(0) == 1.0 and math.isclose(phi_schedule(500), math.exp(-1.0))
    assert phi_schedule(100) > phi_schedule(200)


def test_total_loss_is_phi_Lg_plus_lambda_Ls():
    torch.manual_seed(0)
    seg = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 4, 4, 4, 4)]
    den = [torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 4, 4, 4)]
    lab, fd = torch.randint(0, 4, (2, 8, 8, 8)), torch.rand(2, 1, 8, 8, 8)
    total, parts = ldos_loss({"seg": seg, "den": den}, lab, fd, epoch=250)
    ls, lg = segmentation_loss(seg, lab), denoising_loss(den, fd)
    assert math.isclose(float(total), float(math.exp(-0.5) * lg + ls), rel_tol=1e-5)
    # deep supervision weights 1, 1/2 -> normalised (2/3, 1/3) with the lowest scale 0 -> (1, 0)
    assert math.isclose(float(lg), float((den[0] - fd).abs().mean()), rel_tol=1e-5)
    seg_only, p = ldos_loss({"seg": seg}, lab)
    assert math.isclose(float(seg_only), float(ls), rel_tol=1e-6) and "L_g" not in p


def test_dice_loss_is_low_for_a_perfect_prediction_and_high_for_a_wrong_one():
    lab = torch.randint(0, 3, (1, 6, 6, 6))
    good = torch.nn.functional.one_hot(lab, 3).permute(0, 4, 1, 2, 3).float() * 30
    bad = torch.roll(good, 1, dims=1)
    assert float(soft_dice_loss(good, lab)) < 1e-3 and float(soft_dice_loss(bad, lab)) > 0.9


# ---------------------------------------------------------------- misalignment augmentation
def test_misalignment_translation_moves_labels_and_keeps_values():
    lab = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    lab[0, 4:8, 4:8, 4:8] = 7
    disp = torch.zeros(1, 3, 12, 12, 12)
    assert torch.equal(warp_labels(lab, disp), lab)
    disp[:, 2] = 2.0  # pull from x + 2 voxels -> the cube moves by -2 in x
    moved = warp_labels(lab, disp)
    assert torch.equal(moved[0, 4:8, 4:8, 2:6], lab[0, 4:8, 4:8, 4:8]) and moved.sum() == lab.sum()
    g = torch.Generator().manual_seed(1)
    aug = misalign_labels(lab.repeat(4, 1, 1, 1), (4.0, 4.0, 4.0), p=1.0, max_shift_mm=8.0, generator=g)
    assert set(aug.unique().tolist()) <= {0, 7} and not torch.equal(aug, lab.repeat(4, 1, 1, 1))
    assert torch.equal(misalign_labels(lab, (4.0, 4.0, 4.0), p=0.0), lab)


# ---------------------------------------------------------------- metrics
def _img(arr, spacing=(2.0, 1.0, 3.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    return im


def test_metrics_known_values_missing_and_not_predicted():
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[5:15, 5:15, 5:15] = 14  # liver
    ref[2:4, 2:4, 2:4] = 1      # spleen, not predicted
    pred = np.zeros_like(ref)
    pred[5:15, 5:15, 7:17] = 14  # shifted by 2 voxels in x (spacing x = 2 mm)
    pred[17:19, 17:19, 17:19] = 3  # bladder predicted but not in the reference
    res = evaluate(_img(pred), _img(ref), organ_specs())
    liver = res["organs"]["liver"]
    assert math.isclose(liver["dice"], 2 * 800 / 2000) and math.isclose(liver["iou"], 800 / 1200)
    assert math.isclose(liver["hd95"], 4.0)  # 2 voxels * 2 mm
    assert 0 < liver["asd"] <= 4.0
    assert res["organs"]["spleen"]["status"] == "not_predicted" and res["organs"]["spleen"]["dice"] == 0
    assert res["organs"]["urinary_bladder"]["status"] == "missing" and "dice" not in res["organs"]["urinary_bladder"]
    assert res["mean"]["n_scored"] == 2 and res["mean"]["n_missing"] == 16
    assert math.isclose(res["mean"]["dice"], (0.8 + 0) / 2) and math.isclose(res["mean"]["hd95"], 4.0)
    ident = evaluate(_img(ref), _img(ref), organ_specs())
    assert ident["mean"]["dice"] == 1.0 and ident["mean"]["hd95"] == 0.0
    with pytest.raises(InputError, match="differ in size"):
        evaluate(ref[:10], ref, organ_specs(), spacing=(1, 1, 1))


# ---------------------------------------------------------------- uptake
def test_organ_uptake_matches_direct_array_computation():
    rng = np.random.default_rng(3)
    pet = rng.uniform(0.2, 1.0, (30, 30, 30))   # background below the liver's uptake
    lab = np.zeros(pet.shape, np.uint8)
    lab[5:25, 5:25, 5:25] = 14
    pet[lab == 14] = 2.0
    pet[15, 15, 15] = 40.0  # hot spot inside the liver
    lab[0:2, 0:2, 0:2] = 1  # spleen of 8 voxels * 8 mm^3 < 1 ml -> no SUVpeak
    sp = (2.0, 2.0, 2.0)
    rows = {r["name"]: r for r in organ_uptake(_img(pet, sp), _img(lab, sp), organ_specs())}
    assert set(rows) == {"liver", "spleen"}
    m = lab == 14
    assert math.isclose(rows["liver"]["volume_ml"], m.sum() * 8 / 1000)
    assert math.isclose(rows["liver"]["suv_mean"], pet[m].mean()) and rows["liver"]["suv_max"] == 40.0
    # SUVpeak: best 1 cm^3 sphere (radius 6.2 mm = voxels within 3.1 2-mm voxels) holds the hot spot
    zz, yy, xx = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    sphere = ((zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2) * 4 <= 6.2035 ** 2
    assert sphere.sum() == 123  # voxel centres inside the sphere
    assert math.isclose(rows["liver"]["suv_peak"], pet[sphere].mean(), rel_tol=1e-9)
    assert math.isclose(rows["liver"]["suv_peak"], (122 * 2.0 + 40.0) / 123, rel_tol=1e-9)
    assert rows["liver"]["suv_mean"] < rows["liver"]["suv_peak"] < rows["liver"]["suv_max"]
    assert rows["spleen"]["suv_peak"] is None
    with pytest.raises(InputError, match="differ in spacing"):
        organ_uptake(_img(pet, sp), _img(lab, (2.0, 2.0, 3.0)), organ_specs())


# ---------------------------------------------------------------- click to mask
def test_region_at_click_returns_the_clicked_component_only():
    lab = np.zeros((10, 12, 14), np.uint8)   # (k, j, i)
    lab[2:4, 2:4, 2:4] = 12                  # left kidney
    lab[6:8, 6:8, 9:12] = 12                 # right kidney, separate component
    lab[2:4, 6:9, 2:4] = 14                  # liver
    m = region_at_click(lab, None, (10, 7, 6))  # ijk = (x, y, z) inside the right kidney
    assert m.sum() == 12 and m[6:8, 6:8, 9:12].all() and not m[2:4, 2:4, 2:4].any()
    assert region_at_click(lab, 12, (2, 2, 2)).sum() == 8
    assert not region_at_click(lab, 12, (3, 7, 3)).any()   # click on the liver while asking for kidney
    assert not region_at_click(lab, None, (0, 0, 0)).any()  # background
    assert region_at_click(lab, 14, (3, 7, 3)).sum() == 12
    with pytest.raises(InputError, match="outside the volume"):
        region_at_click(lab, None, (14, 0, 0))
    with pytest.raises(InputError, match="3-D"):
        region_at_click(lab[0], None, (0, 0, 0))


# ---------------------------------------------------------------- training, resume, inference
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from SegmentationModuleLib.train import train
    out = tmp_path_factory.mktemp("ldos")
    cases = random_cases(2, shape=(20, 20, 20), seed=0)
    s = train(TINY, out, cases=cases, device="cpu", log=lambda *a: None)
    return out, s, cases


def test_foreground_patches_draw_the_organ_class_first_as_nnunet():
    # one large organ (class 1) and one tiny organ (class 2) at opposite corners; every patch is forced foreground
    lab = np.zeros((40, 40, 40), np.int16)
    lab[16:40, 16:40, 16:40] = 1
    lab[1:3, 1:3, 1:3] = 2
    case = {"x": np.zeros(lab.shape, np.float32), "y": np.zeros(lab.shape, np.float32), "label": lab}
    sampler = PatchSampler([case], (8, 8, 8), fg_fraction=1.0, seed=0)
    assert sorted(sampler.fg[0]) == [1, 2] and len(sampler.fg[0][2]) == 8
    _, _, labels = sampler.sample(400)
    has_tiny = np.mean([(p == 2).any() for p in labels])
    has_large = np.mean([(p == 1).any() for p in labels])
    # voxel-uniform sampling would pick the tiny organ with probability 8 / 13832 (< 0.1 %)
    assert 0.35 < has_tiny < 0.65 and 0.35 < has_large < 0.65


def test_training_writes_checkpoints_and_resumes(trained):
    from SegmentationModuleLib.train import train
    out, s, cases = trained
    assert s["iterations"] == 4 and s["stopped"] == "finished" and (out / "model.pt").is_file()
    latest = read_torch_file(str(out / "checkpoint_latest.pt"), ())
    assert latest["iteration"] == 4 and len(latest["history"]) == 2
    cfg = dict(TINY, epochs=3)
    logs = []
    s2 = train(cfg, out, cases=cases, device="cpu", log=logs.append)
    assert any("resumed" in line and "iteration 4" in line for line in logs)
    assert s2["iterations"] == 6
    ck = torch.load(str(out / "model.pt"), weights_only=True)
    assert ck["config"]["task"] == "ldos" and ck["config"]["network"]["denoise"] is True


def test_segonly_baseline_has_no_denoiser(tmp_path):
    from SegmentationModuleLib.train import train
    cfg = dict(TINY, task="segonly", epochs=1, iterations_per_epoch=1)
    train(cfg, tmp_path, cases=random_cases(1, shape=(16, 16, 16)), device="cpu", log=lambda *a: None)
    ck = torch.load(str(tmp_path / "model.pt"), weights_only=True)
    assert not any(k.startswith("den_decoder") for k in ck["state_dict"])


def test_training_learns_organs_on_tiny_blobs(tmp_path):
    """A few dozen steps on two easy cases must beat chance clearly (the training loop really optimises)."""
    from SegmentationModuleLib.train import train
    from SegmentationModuleLib.infer import load_model
    cases = random_cases(1, shape=(16, 16, 16), n_classes=3, seed=3, radius=(3.5, 5.0))
    cfg = json.loads(json.dumps(TINY))
    cfg.update(epochs=1, iterations_per_epoch=120, misalignment={"p": 0.0}, foreground_oversample=1.0)
    cfg["network"]["n_classes"] = 3
    cfg["optimizer"] = {"name": "sgd", "lr": 2e-2}
    train(cfg, tmp_path, cases=cases, device="cpu", log=lambda *a: None)
    net, _ = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        pred = net(torch.from_numpy(cases[0]["x"])[None, None])["seg"].argmax(1)[0].numpy()
    ref = cases[0]["label"]
    dice = [2 * ((pred == v) & (ref == v)).sum() / ((pred == v).sum() + (ref == v).sum()) for v in (1, 2)]
    assert np.mean(dice) > 0.6, dice


def _pet_image(case, spacing=(4.0, 4.0, 4.0)):
    im = sitk.GetImageFromArray((case["x"] * 5.0).astype(np.float32))
    im.SetSpacing(spacing)
    im.SetOrigin((-10.0, 5.0, 30.0))
    return im


def test_segment_returns_labels_on_the_input_grid_and_checks_input(trained):
    from SegmentationModuleLib import segment
    out, _, cases = trained
    im = _pet_image(cases[0], spacing=(3.0, 4.0, 5.0))  # not the model spacing: resampled and back
    progress = []
    lab, probs = segment(im, out / "model.pt", device="cpu", return_probabilities=True, allow_empty=True,
                         progress=lambda f, m: progress.append(f))
    assert lab.GetSize() == im.GetSize() and lab.GetSpacing() == im.GetSpacing() and lab.GetOrigin() == im.GetOrigin()
    assert probs.GetNumberOfComponentsPerPixel() == 19 and progress[-1] == 1.0
    p = sitk.GetArrayFromImage(probs)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-4)
    sub, _ = segment(im, out / "model.pt", organs=["liver", "spleen"], device="cpu", allow_empty=True)
    assert set(np.unique(sitk.GetArrayFromImage(sub))) <= {0, 1, 14}
    ct = np.full((8, 8, 8), -1000.0, np.float32)
    ct[2:6, 2:6, 2:6] = 40.0  # soft tissue
    with pytest.raises(InputError, match="CT in HU"):
        segment(sitk.GetImageFromArray(ct), out / "model.pt")
    with pytest.raises(InputError, match="Bq/ml"):
        segment(im * 5000.0, out / "model.pt")
    with pytest.raises(InputError, match="No PET volume"):
        segment(None, out / "model.pt")
    with pytest.raises(InputError, match="3-D scalar"):
        segment(sitk.Image(8, 8, sitk.sitkFloat32), out / "model.pt")
    with pytest.raises(ModelError):
        segment(im, {"config": {}, "state_dict": {}})
    with pytest.raises(InputError, match="found none of the requested organs"):
        segment(im * 0.0 + 0.01, out / "model.pt", organs=["brain"], device="cpu")


def test_cancel_stops_segmentation(trained):
    from PETWorkbenchLib.errors import Cancelled
    from SegmentationModuleLib import segment
    out, _, cases = trained
    with pytest.raises(Cancelled):
        segment(_pet_image(cases[0]), out / "model.pt", device="cpu", cancel=lambda: True)


def test_cli_segment_and_evaluate(trained, tmp_path):
    from PETWorkbenchApp.cli import main
    out, _, cases = trained
    pet = tmp_path / "pet.nii.gz"
    sitk.WriteImage(_pet_image(cases[0]), str(pet))
    ref = sitk.GetImageFromArray(cases[0]["label"])
    ref.CopyInformation(_pet_image(cases[0]))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    code = main(["segment", "--input", str(pet), "--model", str(out / "model.pt"), "--output",
                 str(tmp_path / "lab.nii.gz"), "--uptake", str(tmp_path / "u.json"), "--device", "cpu"])
    assert code == 0 and (tmp_path / "lab.nii.gz").is_file()
    code = main(["evaluate", "segmentation", "--pred", str(tmp_path / "ref.nii.gz"), "--ref",
                 str(tmp_path / "ref.nii.gz"), "--output", str(tmp_path / "m.json")])
    assert code == 0 and json.loads((tmp_path / "m.json").read_text())["mean"]["dice"] == 1.0
    assert main(["segment", "--input", str(tmp_path / "nope.nii.gz"), "--output", str(tmp_path / "x.nii.gz")]) == 2


# ---------------------------------------------------------------- DDP
def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker_params, args=(2, str(tmp_path), str(tmp_path / "init")), nprocs=2, join=True)
    p0 = torch.load(str(tmp_path / "p0.pt"))
    p1 = torch.load(str(tmp_path / "p1.pt"))
    for k in p0:
        assert torch.allclose(p0[k], p1[k], atol=1e-6), k
    ck = torch.load(str(tmp_path / "model.pt"), weights_only=True)
    assert ck["training"]["iterations"] == 2
    latest = read_torch_file(str(tmp_path / "checkpoint_latest.pt"), ())
    assert len(latest["sampler_rng"]) == 2


def _ddp_worker_params(rank, world, tmp, init_file):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import SegmentationModuleLib.train as tr
    captured = {}
    orig = tr.build_network

    def capture(cfg):
        net = orig(cfg)
        captured["net"] = net
        return net
    tr.build_network = capture
    cfg = dict(TINY, epochs=1, iterations_per_epoch=2)
    tr.train(cfg, tmp, cases=random_cases(1, shape=(16, 16, 16), seed=rank), device="cpu", log=lambda *a: None)
    torch.save({k: v.detach().clone() for k, v in captured["net"].state_dict().items()},
               os.path.join(tmp, f"p{rank}.pt"))
    dist.destroy_process_group()


def test_denoise_head_and_fake_fdpet_pipeline(trained, tmp_path):
    from SegmentationModuleLib import denoise, segment_fake_fdpet
    from SegmentationModuleLib.train import train
    out, _, cases = trained
    im = _pet_image(cases[0], spacing=(4.0, 4.0, 3.0))
    fd = denoise(im, out / "model.pt", device="cpu")
    a = sitk.GetArrayFromImage(fd)
    assert fd.GetSize() == im.GetSize() and a.min() >= 0 and np.isfinite(a).all()
    # the residual denoiser starts from the input: the estimate stays in the input's SUV range
    assert 0.2 < a.mean() / sitk.GetArrayFromImage(im).mean() < 5
    cfg = dict(TINY, task="segonly", epochs=1, iterations_per_epoch=1)
    train(cfg, tmp_path, cases=cases, device="cpu", log=lambda *a: None)
    with pytest.raises(ModelError, match="no denoising decoder"):
        denoise(im, tmp_path / "model.pt", device="cpu")
    lab, _ = segment_fake_fdpet(im, out / "model.pt", tmp_path / "model.pt", device="cpu", allow_empty=True)
    assert lab.GetSize() == im.GetSize() and lab.GetOrigin() == im.GetOrigin()
    # a denoiser-only model (first stage of Fake-FDPET) has an untrained segmentation decoder: refused
    from SegmentationModuleLib import segment
    den_dir = tmp_path / "den"
    train(dict(TINY, task="denoise", epochs=1, iterations_per_epoch=1), den_dir, cases=cases, device="cpu",
          log=lambda *a: None)
    with pytest.raises(ModelError, match="denoiser"):
        segment(im, den_dir / "model.pt", device="cpu")
    fd2 = denoise(im, den_dir / "model.pt", device="cpu")
    assert fd2.GetSize() == im.GetSize()
