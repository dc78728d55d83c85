"""Model weights: only https:// downloads (plain http only from this machine), a few flipped bytes inside a tensor
record are caught, a file named like a registered model's weights must be those weights, damaged bundled weights
advise reinstalling the extension, and no message talks about torch internals ('weights_only')."""

import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from PETWorkbenchLib.errors import ModelError
from reliability_tools import ROOT, assert_one_error_line, cli, write_pet

SYN_ID = "synthesis-drmc-cpu"


def _entry(url):
    from PETWorkbenchLib.models import ModelEntry
    return ModelEntry(id="test-model", family="synthesis", method="m", title="t", version="1", config={}, inputs=[],
                      units="SUV", url=url, sha256="0" * 64, license="-", training={}, metrics={})


@pytest.mark.parametrize("url", ["http://example.org/w.pt", "HTTP://example.org/w.pt", "ftp://example.org/w.pt",
                                 "file:///etc/passwd", "http://localhost.example.org/w.pt", "//example.org/w.pt"])
def test_non_https_url_is_refused_before_any_connection(tmp_path, monkeypatch, url):
    import requests
    from PETWorkbenchLib import models

    def no_network(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(requests, "get", no_network)
    with pytest.raises(ModelError, match="only https://"):
        models.check_url(_entry(url))
    with pytest.raises(ModelError, match="only https://"):
        models.ensure(_entry(url), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["https://example.org/w.pt", "http://127.0.0.1:8000/w.pt", "http://localhost/w.pt"])
def test_https_and_loopback_urls_are_allowed(url):
    from PETWorkbenchLib import models
    models.check_url(_entry(url))


def _flip_inside_largest_tensor(src, dst, n=3):
    """Copy ``src`` flipping ``n`` bytes in the middle of the stored data of its largest tensor record."""
    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    for k in range(n):
        data[start + k] ^= 0x5A
    Path(dst).write_bytes(bytes(data))
    return dst


def test_flipped_bytes_inside_a_tensor_record_are_refused(tmp_path, capfd, tiny_models):
    from PETWorkbenchLib.models import load_checkpoint
    bad = _flip_inside_largest_tensor(tiny_models["synthesis"], tmp_path / "flipped.pt")
    with pytest.raises(ModelError, match="damaged") as err:
        load_checkpoint(bad)
    assert "flipped.pt" in str(err.value)
    low = write_pet(tmp_path / "low.nii.gz")
    code, _, err = cli(capfd, "synthesize", low, tmp_path / "out.nii.gz", "--model", bad, "--device", "cpu")
    assert code == 3, err
    assert "damaged" in assert_one_error_line(err, "flipped.pt")
    assert not (tmp_path / "out.nii.gz").exists()


def test_modified_file_named_like_registered_weights_is_refused(tmp_path, capfd):
    src = ROOT / "Resources" / "Models" / f"{SYN_ID}.pt"
    ck = torch.load(src, map_location="cpu", weights_only=True)
    key = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][key] = ck["state_dict"][key] + 0.01      # a loadable file, but not the registered weights
    (tmp_path / "copy").mkdir()
    modified = tmp_path / "copy" / f"{SYN_ID}.pt"
    torch.save(ck, modified)
    low = write_pet(tmp_path / "low.nii.gz")
    code, _, err = cli(capfd, "synthesize", low, tmp_path / "out.nii.gz", "--model", modified, "--device", "cpu")
    assert code == 3, err
    assert SYN_ID in assert_one_error_line(err, modified.name)
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.fixture
def damaged_bundle(tmp_path, monkeypatch):
    """A Resources folder whose bundled synthesis weights have one flipped byte (the repository is not touched)."""
    res = tmp_path / "Resources"
    (res / "Models").mkdir(parents=True)
    src = ROOT / "Resources"
    for name in ("Models.json", "Models.schema.json"):
        shutil.copy(src / name, res / name)
    for name in ("SampleData", "Terminology", "Icons"):
        if (src / name).exists():
            (res / name).symlink_to(src / name)
    data = bytearray((src / "Models" / f"{SYN_ID}.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (res / "Models" / f"{SYN_ID}.pt").write_bytes(bytes(data))
    monkeypatch.setenv("PETWORKBENCH_RESOURCES", str(res))
    return res / "Models" / f"{SYN_ID}.pt"


def test_damaged_bundled_weights_advise_reinstalling_not_models_delete(tmp_path, capfd, damaged_bundle):
    low = write_pet(tmp_path / "low.nii.gz")
    for argv in (["synthesize", low, tmp_path / "out.nii.gz", "--model", SYN_ID, "--device", "cpu"],
                 ["models", "verify", SYN_ID]):
        code, _, err = cli(capfd, *argv)
        assert code == 3, err
        line = assert_one_error_line(err, SYN_ID)
        assert "models delete" not in line and "delete" not in line
        assert "reinstall" in line
    code, _, err = cli(capfd, "models", "delete", SYN_ID)     # and deleting it is refused, not attempted
    assert code == 2 and damaged_bundle.is_file()


def _weights_variants(tmp_path, good):
    data = Path(good).read_bytes()
    out = {"empty": b"", "truncated": data[: len(data) // 2], "header-only": data[:40],
           "garbage": bytes(range(256)) * 16}
    for name, blob in out.items():
        (tmp_path / f"{name}.pt").write_bytes(blob)
    _flip_inside_largest_tensor(good, tmp_path / "flipped.pt")
    with open(tmp_path / "pickled-object.pt", "wb") as f:
        pickle.dump({"config": {}, "state_dict": {}, "extra": Path("x")}, f)
    torch.save({"config": {}, "state_dict": {}, "obj": Path("x")}, tmp_path / "zip-object.pt")
    return sorted(tmp_path.glob("*.pt"))


def test_weights_errors_are_plain_words(tmp_path, capfd, tiny_models):
    low = write_pet(tmp_path / "low.nii.gz")
    (tmp_path / "w").mkdir()
    seen = {}
    for path in _weights_variants(tmp_path / "w", tiny_models["synthesis"]):
        code, _, err = cli(capfd, "synthesize", low, tmp_path / "out.nii.gz", "--model", path, "--device", "cpu")
        assert code == 3, (path.name, code, err)
        line = assert_one_error_line(err, path.name)
        assert "weights_only" not in line and "Unpickl" not in line and "WeightsUnpickler" not in line, line
        seen[path.stem] = line
    assert "empty" in seen["empty"]
    assert "refusing to load it" in seen["pickled-object"]
    assert "other than tensors" in seen["zip-object"] and "refusing to load it" in seen["zip-object"]
