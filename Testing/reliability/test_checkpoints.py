"""Training checkpoints (synthesis ``last.pt``, segmentation ``checkpoint_latest.pt``): only tensors and plain data
are read back (a planted pickle runs nothing), damaged files give one clear ModelError, resume still works."""

import pathlib
import pickle

import numpy as np
import pytest
import torch

from PETWorkbenchLib.errors import ModelError, ResourceError
from SegmentationModuleLib.data import random_cases
from SynthesisModuleLib.data import CenterPatchSampler

torch.set_num_threads(1)

SYN_MODEL = {"arch": "drmc", "n_feats": 8, "res_num": 1, "num_experts": 2, "mlp_ratio": 2, "num_heads": 2,
             "hidden_dim": 4}
SYN_TRAIN = {"patch_size": 8, "batch_size": 1, "lr": 1e-3, "max_steps": 2, "checkpoint_every": 1, "log_every": 1,
             "seed": 3, "num_threads": 1}
SEG = {"task": "ldos", "spacing": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16], "batch_size": 1, "epochs": 1,
       "iterations_per_epoch": 2, "optimizer": {"name": "adamw", "lr": 3e-3}, "misalignment": {"p": 0.0},
       "network": {"in_channels": 1, "n_classes": 3, "features": [4, 8], "strides": [1, 2], "n_blocks": [1, 1],
                   "n_conv_decoder": 1}}
PLAIN = (dict, list, tuple, int, float, str, bool, type(None), torch.Tensor)


class _Planted:
    """Unpickling this creates ``marker``: stands for any code a planted checkpoint would run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _plant(path, kind, marker):
    payload = {"config": {"model": SYN_MODEL}, "state_dict": _Planted(marker), "optimizer": {}, "step": 0,
               "model": _Planted(marker), "iteration": 0, "sampler_rng": [], "torch_rng": torch.get_rng_state()}
    if kind == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)


def _damage(path, kind, good):
    data = good.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "cut_header": data[:40],
                      "garbage": np.random.default_rng(0).bytes(4096)}[kind])


def _assert_clear(err, path):
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "weights_only" not in msg
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def _assert_plain(obj):
    assert isinstance(obj, PLAIN), type(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_plain(k)
            _assert_plain(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _assert_plain(v)


def _syn_sampler():
    rng = np.random.default_rng(0)
    vols = {c: [(rng.random((10, 10, 10), dtype=np.float32), rng.random((10, 10, 10), dtype=np.float32))]
            for c in ("A", "B")}
    return CenterPatchSampler(vols, SYN_TRAIN["patch_size"])


def _syn_train(out, max_steps):
    from SynthesisModuleLib.train import train
    return train({"name": "tiny", "model": dict(SYN_MODEL), "train": dict(SYN_TRAIN, max_steps=max_steps)},
                 out_dir=out, sampler=_syn_sampler())


def _seg_train(out, epochs, log=lambda *a: None):
    from SegmentationModuleLib.train import train
    return train(dict(SEG, epochs=epochs), out, cases=random_cases(1, shape=(16, 16, 16), n_classes=3, seed=1),
                 device="cpu", log=log)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Checkpoints the current code wrote: {'syn': last.pt, 'seg': checkpoint_latest.pt}."""
    out = tmp_path_factory.mktemp("written")
    _syn_train(out / "syn", 2)
    _seg_train(out / "seg", 1)
    return {"syn": out / "syn" / "last.pt", "seg": out / "seg" / "checkpoint_latest.pt"}


# ---------------------------------------------------------------- planted pickles run nothing
@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_planted_synthesis_checkpoint_is_refused_on_resume_and_export(tmp_path, kind):
    from SynthesisModuleLib.train import export_weights
    marker = tmp_path / "marker"
    (tmp_path / "run").mkdir()
    ck = tmp_path / "run" / "last.pt"
    _plant(ck, kind, marker)
    with pytest.raises(ModelError, match="refusing to load it") as err:
        _syn_train(tmp_path / "run", 2)
    _assert_clear(err, ck)
    with pytest.raises(ModelError, match="refusing to load it") as err:
        export_weights(ck, tmp_path / "w.pt")
    _assert_clear(err, ck)
    assert not marker.exists() and not (tmp_path / "w.pt").exists()
    assert not (tmp_path / "run" / "train_log_rank0.csv").exists()


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_planted_segmentation_checkpoint_is_refused_on_resume(tmp_path, kind):
    marker = tmp_path / "marker"
    (tmp_path / "run").mkdir()
    ck = tmp_path / "run" / "checkpoint_latest.pt"
    _plant(ck, kind, marker)
    with pytest.raises(ModelError, match="refusing to load it") as err:
        _seg_train(tmp_path / "run", 1)
    _assert_clear(err, ck)
    assert not marker.exists() and not (tmp_path / "run" / "model.pt").exists()


def test_old_checkpoint_with_numpy_objects_is_refused(tmp_path, written):
    from SegmentationModuleLib.train import read_checkpoint as read_seg
    from SynthesisModuleLib.train import export_weights
    for name, src in written.items():
        state = torch.load(src, weights_only=True)
        state["numpy_rng"] = np.random.get_state()
        state["seconds"] = np.float64(1.0)
        ck = tmp_path / name / src.name
        ck.parent.mkdir()
        torch.save(state, ck)
        with pytest.raises(ModelError, match="holds objects other than tensors and plain data") as err:
            _syn_train(ck.parent, 3) if name == "syn" else _seg_train(ck.parent, 2)
        _assert_clear(err, ck)
    with pytest.raises(ModelError, match="refusing to load it"):
        export_weights(tmp_path / "syn" / "last.pt", tmp_path / "w.pt")
    with pytest.raises(ModelError, match="refusing to load it"):
        read_seg(tmp_path / "seg" / "checkpoint_latest.pt")


# ---------------------------------------------------------------- resume from what the code writes
def test_synthesis_resume_continues_the_step_count(tmp_path):
    s1 = _syn_train(tmp_path, 2)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    _assert_plain(ck)
    assert s1["steps"] == 2 and ck["step"] == 2
    s2 = _syn_train(tmp_path, 3)
    assert s2["steps"] == 3 and s2["steps_this_run"] == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "train_log_rank0.csv"]


def test_segmentation_resume_continues_the_iteration_count(tmp_path):
    _seg_train(tmp_path, 1)
    ck = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    _assert_plain(ck)
    assert ck["iteration"] == 2 and ck["torch_rng"].dtype == torch.uint8
    logs = []
    s2 = _seg_train(tmp_path, 2, log=logs.append)
    assert any("resumed" in line and "iteration 2" in line for line in logs)
    assert s2["iterations"] == 4
    assert torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)["iteration"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_latest.pt", "model.pt"]


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _syn_train(tmp_path, 2)
    before = (tmp_path / "last.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ResourceError, match="last.pt"):
        _syn_train(tmp_path, 3)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "train_log_rank0.csv"]
    assert _syn_train(tmp_path, 3)["steps_this_run"] == 1


# ---------------------------------------------------------------- damaged files
@pytest.mark.parametrize("kind,problem", [("empty", "is empty"), ("truncated", "is truncated or damaged"),
                                          ("cut_header", "is truncated or damaged"),
                                          ("garbage", "not a PyTorch zip archive")])
def test_damaged_checkpoints_give_a_clear_model_error(tmp_path, written, kind, problem):
    from SynthesisModuleLib.train import export_weights
    for name, good in written.items():
        ck = tmp_path / name / good.name
        ck.parent.mkdir()
        _damage(ck, kind, good)
        with pytest.raises(ModelError, match=problem) as err:
            _syn_train(ck.parent, 3) if name == "syn" else _seg_train(ck.parent, 2)
        _assert_clear(err, ck)
    with pytest.raises(ModelError, match=problem) as err:
        export_weights(tmp_path / "syn" / "last.pt", tmp_path / "w.pt")
    _assert_clear(err, tmp_path / "syn" / "last.pt")
    assert not (tmp_path / "w.pt").exists()


def test_weights_file_in_place_of_a_training_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "checkpoint_latest.pt"
    torch.save({"config": SEG, "state_dict": {}}, ck)
    with pytest.raises(ModelError, match="not a PETWorkbench training checkpoint .*optimizer") as err:
        _seg_train(tmp_path, 1)
    _assert_clear(err, ck)
