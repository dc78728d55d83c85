"""Device choice, units, sliding-window inference and the command line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from PETWorkbenchLib.errors import Cancelled, InputError


def test_device_choice(monkeypatch):
    from PETWorkbenchLib.device import choose_device
    import torch
    monkeypatch.delenv("PETWORKBENCH_FORCE_CPU", raising=False)
    assert choose_device("cpu").name == "cpu"
    auto = choose_device("auto")
    assert auto.reason.startswith("auto")
    if not torch.cuda.is_available():
        assert auto.name in ("cpu", "mps")
        with pytest.raises(InputError, match="CUDA was requested"):
            choose_device("cuda")
    with pytest.raises(InputError, match="Unknown device 'tpu'"):
        choose_device("tpu")
    monkeypatch.setenv("PETWORKBENCH_FORCE_CPU", "1")
    c = choose_device("cuda")
    assert c.name == "cpu" and "forced" in c.reason


def test_units_and_pet_range():
    from PETWorkbenchLib import units
    bq = np.array([5000.0, 10000.0])
    suv = units.to_suv(bq, "Bq/ml", weight_kg=70, injected_dose_bq=350e6)
    assert np.allclose(suv, bq * 70000 / 350e6)
    assert np.allclose(units.from_suv(suv, "BQML", 70, 350e6), bq)
    with pytest.raises(InputError, match="weight"):
        units.to_suv(bq, "Bq/ml", weight_kg=0, injected_dose_bq=1)
    with pytest.raises(InputError, match="Unknown PET units"):
        units.normalise_units("HU")
    with pytest.raises(InputError, match="CT in HU"):
        units.check_pet_range(np.array([-1000.0, 50.0]))
    with pytest.raises(InputError, match="Bq/ml"):
        units.check_pet_range(np.array([0.0, 25000.0]))
    with pytest.raises(InputError, match="empty"):
        units.check_pet_range(np.array([]))
    with pytest.raises(InputError, match="NaN"):
        units.check_pet_range(np.array([1.0, np.nan]))


def test_sliding_window_blends_bounds_batch_and_reports():
    import torch
    from PETWorkbenchLib.inference import sliding_window
    img = torch.rand(1, 1, 40, 36, 30)
    seen_batches, progress = [], []

    def predictor(x):
        seen_batches.append(x.shape[0])
        return x * 2.0

    out = sliding_window(predictor, img, (16, 16, 16), overlap=0.5, sw_batch_size=3,
                         progress=lambda f, m: progress.append(f))
    assert out.shape == img.shape and out.device.type == "cpu"
    assert torch.allclose(out, img * 2.0, atol=1e-5)           # gaussian blending of a linear map is exact
    assert max(seen_batches) <= 3 and sum(seen_batches) > 8
    assert progress[-1] == pytest.approx(1.0) and progress == sorted(progress)


def test_sliding_window_blending_width():
    import torch
    from PETWorkbenchLib.inference import sliding_window
    img = torch.zeros(1, 1, 24, 16, 16)
    img[..., :12, :, :] = 1.0        # the two patches along the first axis see different means

    def patch_mean(x):               # each patch's output is its own mean: the blend shows the weights
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).clone()
    outs = {s: sliding_window(patch_mean, img, (16, 16, 16), overlap=0.5, sw_batch_size=1, sigma_scale=s)[0, 0]
            for s in (0.125, 0.25, 4.0)}
    # patches [0, 16) and [8, 24) along the first axis (centres 7.5 and 15.5), their outputs:
    first, second = float(img[..., :16, :, :].mean()), float(img[..., 8:, :, :].mean())
    # half-way between the centres both weights are equal whatever the width
    mid = {s: float(o[11:13, 8, 8].mean()) for s, o in outs.items()}
    assert all(abs(v - (first + second) / 2) < 1e-5 for v in mid.values())
    # nearer the first centre, a wider weight averages the two patches more evenly (towards the plain mean)
    near = {s: float(o[10, 8, 8]) for s, o in outs.items()}
    assert first > near[0.125] > near[0.25] > near[4.0] > second
    assert abs(near[4.0] - (first + second) / 2) < 0.02
    with pytest.raises(InputError, match="sigma_scale"):
        sliding_window(patch_mean, img, (16, 16, 16), sigma_scale=0.0)


def test_sliding_window_cancel_and_bad_input():
    import torch
    from PETWorkbenchLib.inference import sliding_window
    img = torch.rand(1, 1, 32, 32, 32)
    calls = []
    with pytest.raises(Cancelled):
        sliding_window(lambda x: calls.append(1) or x, img, (16, 16, 16), sw_batch_size=1,
                       cancel=lambda: len(calls) >= 2)
    assert len(calls) == 2
    with pytest.raises(InputError, match="spatial dimensions"):
        sliding_window(lambda x: x, torch.rand(1, 32, 32), (16, 16, 16))
    bad = img.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        sliding_window(lambda x: x, bad, (16, 16, 16))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "PETWorkbenchApp.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_info_models_and_errors():
    r = _cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["torch"] and "device" in info and all(v == "ok" for v in info["families"].values())
    r = _cli("models", "list", "--json")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout)["models"], list)
    r = _cli("models", "verify", "no-such-model")
    assert r.returncode == 3 and "Unknown model 'no-such-model'" in r.stderr
    r = _cli("models", "download")
    assert r.returncode == 2 and "needs a model id" in r.stderr
    for cmd in ("synthesize", "segment", "register", "simulate", "batch", "demo"):
        r = _cli(cmd, "--help")
        assert r.returncode == 0 and "usage" in r.stdout.lower(), cmd
