import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from PETWorkbenchLib import models
from PETWorkbenchLib.errors import InputError, ModelError

GOOD = b"weights-" * 5000
BAD = b"tampered" * 5000


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "good.pt").write_bytes(GOOD)
    (root / "bad.pt").write_bytes(BAD)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _entry(model_id, url, data=GOOD):
    return {"id": model_id, "family": "synthesis", "method": "test", "title": model_id, "version": "1",
            "config": {}, "inputs": [], "units": "SUV", "url": url, "sha256": hashlib.sha256(data).hexdigest(),
            "license": "Apache-2.0", "training": {}, "metrics": {}}


@pytest.fixture
def registry(tmp_path, monkeypatch, server):
    res = tmp_path / "Resources"
    (res / "Models").mkdir(parents=True)
    (res / "Models" / "shipped.pt").write_bytes(GOOD)
    entries = [_entry("good", f"{server}/good.pt"),
               _entry("corrupt", f"{server}/bad.pt"),          # registered hash is that of GOOD
               _entry("offline", "http://127.0.0.1:9/nothing-listens-here.pt"),
               _entry("shipped", "bundled:Models/shipped.pt")]
    (res / "Models.json").write_text(json.dumps({"models": entries}))
    monkeypatch.setenv("PETWORKBENCH_RESOURCES", str(res))
    return res


def _cache():
    return Path(models.models_cache_dir())


def test_download_good_file(registry):
    seen = []
    p = models.ensure("good", progress=lambda f, m: seen.append(f))
    assert p.read_bytes() == GOOD and p.is_relative_to(_cache())
    assert seen and seen[-1] == pytest.approx(1.0)
    assert models.status("good") == "installed"
    assert models.verify("good") == p
    assert models.ensure("good") == p          # second call uses the cache


def test_corrupt_download_rejected_and_nothing_left(registry):
    with pytest.raises(ModelError) as e:
        models.ensure("corrupt")
    msg = str(e.value)
    assert hashlib.sha256(GOOD).hexdigest() in msg and hashlib.sha256(BAD).hexdigest() in msg
    assert not any(_cache().rglob("*")) if _cache().exists() else True
    assert models.status("corrupt") == "missing"


def test_no_network_is_a_clear_error(registry):
    with pytest.raises(ModelError) as e:
        models.ensure("offline")
    assert "Could not download" in str(e.value) and "models install offline" in str(e.value)
    assert not _cache().exists() or not any(_cache().rglob("*"))


def test_offline_install_from_file(registry, tmp_path):
    f = tmp_path / "from-usb.pt"
    f.write_bytes(GOOD)
    p = models.install_from_file("offline", f)
    assert models.status("offline") == "installed" and p.read_bytes() == GOOD
    bad = tmp_path / "wrong.pt"
    bad.write_bytes(BAD)
    with pytest.raises(ModelError):
        models.install_from_file("good", bad)
    assert models.status("good") == "missing"
    assert models.delete("offline") and models.status("offline") == "missing"


def test_corruption_after_install_detected(registry):
    p = models.ensure("good")
    p.write_bytes(BAD)
    with pytest.raises(ModelError, match="corrupt"):
        models.verify("good")


def test_bundled_and_unknown(registry):
    assert models.status("shipped") == "bundled"
    assert models.ensure("shipped").read_bytes() == GOOD
    with pytest.raises(InputError):
        models.delete("shipped")
    with pytest.raises(ModelError, match="Unknown model 'nope'"):
        models.get("nope")


def test_registry_rejects_incomplete_entry(tmp_path):
    p = tmp_path / "Models.json"
    p.write_text(json.dumps({"models": [{"id": "x"}]}))
    with pytest.raises(ModelError, match="lacks field"):
        models.load_registry(p)


def test_checkpoint_roundtrip_and_garbage(tmp_path):
    import torch
    p = models.save_checkpoint(tmp_path / "m.pt", {"channels": 4}, {"w": torch.ones(2)})
    ck = models.load_checkpoint(p)
    assert ck["config"] == {"channels": 4} and torch.equal(ck["state_dict"]["w"], torch.ones(2))
    g = tmp_path / "garbage.pt"
    g.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="Cannot read model weights"):
        models.load_checkpoint(g)


def test_shipped_registry_is_valid():
    """The extension's own Models.json: every entry complete and every bundled file matches its hash."""
    for e in models.registry():
        if e.bundled:
            assert models.status(e) == "bundled", e.id


def test_upsert_replaces_an_entry_and_keeps_its_default_mark(tmp_path):
    import json
    import shutil
    from PETWorkbenchLib.models import default_model, load_registry, resources_dir, upsert_entries
    reg = tmp_path / "Models.json"
    shutil.copy(resources_dir() / "Models.json", reg)
    mid = default_model("synthesis", reg)
    entry = next(e for e in json.loads(reg.read_text())["models"] if e["id"] == mid)
    new = {k: v for k, v in entry.items() if k != "default"}
    new["title"] = "re-measured"
    upsert_entries([new], reg)
    assert default_model("synthesis", reg) == mid and load_registry(reg)[mid].title == "re-measured"
    upsert_entries([{**new, "default": False}], reg)  # an explicit mark wins
    models = json.loads(reg.read_text())["models"]
    assert next(e for e in models if e["id"] == mid)["default"] is False
