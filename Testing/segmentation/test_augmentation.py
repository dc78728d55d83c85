"""nnU-Net's default augmentation (MONAI transforms) in LDOS training: what each part touches, alignment of
image, target and labels, reproducibility, and training with it (resume included)."""

import json

import numpy as np
import pytest
import torch

from SegmentationModuleLib.augment import (NNUNET_DEFAULT, augment_batch, augmentation_config, build_augmentation,
                                           spatial_margin)
from SegmentationModuleLib.data import PatchSampler, random_cases
from PETWorkbenchLib.models import read_torch_file

torch.set_num_threads(1)
OFF = {k: 0.0 for k in NNUNET_DEFAULT if k.startswith("p_")}


def _only(**p):
    return augmentation_config({**OFF, **p})


def _batch(patch=16, seed=0):
    cases = random_cases(1, shape=(40, 40, 40), seed=seed, radius=(4.0, 7.0))
    aug = augmentation_config("nnunet")
    s = PatchSampler(cases, (patch,) * 3, fg_fraction=1.0, seed=seed)
    return s.sample(2, spatial_margin((patch,) * 3, aug))


def test_config_presets_and_errors():
    assert augmentation_config("nnunet") == NNUNET_DEFAULT
    assert augmentation_config(None) is None and augmentation_config("none") is None
    assert augmentation_config({"p_rotation": 0.0})["p_rotation"] == 0.0
    with pytest.raises(ValueError, match="unknown augmentation keys"):
        augmentation_config({"p_rotaton": 0.1})
    assert spatial_margin((48, 48, 48), NNUNET_DEFAULT) == [12, 12, 12]
    assert spatial_margin((48, 48, 48), None) == [0, 0, 0]


def test_margin_patches_are_centred_on_the_same_patch():
    cases = random_cases(1, shape=(30, 30, 30), seed=1)
    a = PatchSampler(cases, (12, 12, 12), seed=5).sample(3)
    b = PatchSampler(cases, (12, 12, 12), seed=5).sample(3, (4, 4, 4))
    assert b[0].shape == (3, 1, 20, 20, 20)
    assert np.array_equal(a[0], b[0][:, :, 4:-4, 4:-4, 4:-4]) and np.array_equal(a[2], b[2][:, 4:-4, 4:-4, 4:-4])


def test_everything_off_is_the_centre_crop():
    x, y, lab = _batch()
    xa, ya, la = augment_batch(build_augmentation(_only(), (16,) * 3), x, y, lab, [0, 1])
    c = slice(4, 20)
    assert np.allclose(xa, x[:, :, c, c, c]) and np.allclose(ya, y[:, :, c, c, c])
    assert np.array_equal(la, lab[:, c, c, c]) and la.dtype == np.int64


def test_mirroring_flips_image_target_and_labels_together():
    x, y, lab = _batch()
    t = build_augmentation(_only(p_mirror=1.0), (16,) * 3)
    xa, ya, la = augment_batch(t, x, y, lab, [0, 1])
    c = slice(4, 20)
    flip = lambda a, ax: np.flip(a, axis=ax)
    assert np.allclose(xa, flip(x[:, :, c, c, c], (2, 3, 4)))
    assert np.allclose(ya, flip(y[:, :, c, c, c], (2, 3, 4)))
    assert np.array_equal(la, flip(lab[:, c, c, c], (1, 2, 3)))


def test_spatial_transforms_keep_image_and_labels_aligned():
    x, y, lab = _batch(seed=2)
    k = np.bincount(lab[lab > 0].ravel()).argmax()
    img = (lab == k)[:, None].astype(np.float32)  # an image that is one organ's mask
    t = build_augmentation(_only(p_rotation=1.0, p_scaling=1.0), (16,) * 3)
    xa, ya, la = augment_batch(t, img, img.copy(), lab, [3, 4])
    c = slice(4, 20)
    assert not np.array_equal(la, lab[:, c, c, c])  # it moved
    moved, mask = xa[:, 0] > 0.5, la == k
    assert mask.sum() > 50 and (moved & mask).sum() / (moved | mask).sum() > 0.85  # and the image with it
    assert np.allclose(xa, ya)
    assert set(np.unique(la)) <= set(np.unique(lab))  # labels stay labels (nearest neighbour)


def test_intensity_mappings_shared_with_the_target_degradations_input_only():
    x, y, lab = _batch(seed=3)
    c = slice(4, 20)
    xb, yb = x[:, :, c, c, c], y[:, :, c, c, c]
    xa, ya, _ = augment_batch(build_augmentation(_only(p_brightness=1.0), (16,) * 3), x, y, lab, [5, 6])
    fx, fy = xa / np.where(xb > 0, xb, 1), ya / np.where(yb > 0, yb, 1)
    for b in range(2):
        f = np.median(fx[b][xb[b] > 0])
        assert 0.75 <= f <= 1.25 and abs(f - 1) > 1e-3
        assert np.allclose(fx[b][xb[b] > 0], f, rtol=1e-4) and np.allclose(fy[b][yb[b] > 0], f, rtol=1e-4)
    for p in ("p_noise", "p_blur", "p_lowres"):
        xa, ya, la = augment_batch(build_augmentation(_only(**{p: 1.0}), (16,) * 3, intensity_std=0.5), x, y, lab,
                                   [7, 8])
        assert not np.allclose(xa, xb), p
        assert np.allclose(ya, yb) and np.array_equal(la, lab[:, c, c, c]), p


def test_same_seed_same_augmentation():
    x, y, lab = _batch(seed=4)
    t = build_augmentation(augmentation_config("nnunet"), (16,) * 3, 0.3)
    a = augment_batch(t, x, y, lab, [11, 12])
    b = augment_batch(t, x, y, lab, [11, 12])
    d = augment_batch(t, x, y, lab, [13, 14])
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, d))


def test_training_with_augmentation_resumes_exactly(tmp_path):
    from test_segmentation import TINY
    from SegmentationModuleLib.train import train
    cfg = json.loads(json.dumps(TINY))
    cfg.update(augmentation="nnunet", epochs=2, iterations_per_epoch=2)
    cases = random_cases(2, shape=(24, 24, 24), seed=0)
    from PETWorkbenchLib.errors import Cancelled
    train(cfg, tmp_path / "a", cases=cases, device="cpu", log=lambda *a: None)
    calls = []

    def cancel_in_second_epoch():
        calls.append(1)
        return len(calls) > 2  # checked after each iteration: epoch 1 (iteration 2) saved, 3 interrupted
    with pytest.raises(Cancelled):
        train(cfg, tmp_path / "b", cases=cases, device="cpu", log=lambda *a: None, cancel=cancel_in_second_epoch)
    assert read_torch_file(tmp_path / "b" / "checkpoint_latest.pt", ())["iteration"] == 2
    train(cfg, tmp_path / "b", cases=cases, device="cpu", log=lambda *a: None)
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_mirror_tta_is_the_mean_over_the_eight_mirror_images():
    from SegmentationModuleLib.infer import mirror_axes, mirrored_predictor
    from SegmentationModuleLib.model import LDOSNet
    torch.manual_seed(0)
    net = LDOSNet(features=(4, 8), strides=(1, 2), n_blocks=(1, 1), n_classes=3).eval()
    predict = lambda p: (net(p, heads=("seg",))["seg"],)
    x = torch.rand(1, 1, 8, 8, 8)
    got = mirrored_predictor(predict, (0, 1, 2))(x)[0]
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        ref = sum(predict(x.flip(f) if f else x)[0].flip(f) if f else predict(x)[0] for f in flips) / 8
        assert torch.allclose(got, ref, atol=1e-6)
        assert not torch.allclose(got, predict(x)[0], atol=1e-4)  # it is not the plain prediction
        # a mirror-symmetric input gives a mirror-symmetric averaged output
        sym = x + x.flip(2)
        out = mirrored_predictor(predict, (0,))(sym)[0]
        assert torch.allclose(out, out.flip(2), atol=1e-6)
    assert mirror_axes({}) == () and mirror_axes({"inference": {"mirror_axes": [0, 1, 2]}}, tta=False) == ()
    assert mirror_axes({"inference": {"mirror_axes": [2]}}) == (2,)


def test_a_later_stage_starts_from_given_weights(tmp_path):
    from test_segmentation import TINY
    from PETWorkbenchLib.errors import ModelError
    from SegmentationModuleLib.train import train
    cases = random_cases(1, shape=(16, 16, 16))
    train(dict(TINY, epochs=1), tmp_path / "a", cases=cases, device="cpu", log=lambda *a: None)
    w = tmp_path / "a" / "model.pt"
    train(dict(TINY, epochs=0), tmp_path / "b", cases=cases, device="cpu", log=lambda *a: None, init=w)
    a = torch.load(w, weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b["state_dict"][k]) for k in a) and b["training"]["init"] == str(w)
    other = json.loads(json.dumps(TINY))
    other["network"]["features"] = [4, 4]
    with pytest.raises(ModelError, match="another network config"):
        train(other, tmp_path / "c", cases=cases, device="cpu", log=lambda *a: None, init=w)


def test_a_later_stage_continues_the_phi_decay(tmp_path):
    from test_segmentation import TINY
    from SegmentationModuleLib.train import train
    cfg = dict(TINY, epochs=1, phi_epoch_offset=500)
    s = train(cfg, tmp_path, cases=random_cases(1, shape=(16, 16, 16)), device="cpu", log=lambda *a: None)
    assert s["last"]["phi"] == pytest.approx(np.exp(-0.002 * 500), rel=1e-6)  # phi(500) = e^-1, not phi(0) = 1
