"""Model registry (Resources/Models.json), per-user weight cache, checksummed downloads and offline install.

Every model has an entry in ``Resources/Models.json`` (schema: ``Resources/Models.schema.json``). Weights are either
bundled with the extension (``"url": "bundled:Models/<file>"``, verified in place) or downloaded once into the
per-user cache (:func:`PETWorkbenchLib.paths.models_cache_dir`, overridable with ``PETWORKBENCH_MODELS_DIR``), only
over ``https://`` (plain ``http://`` only from this machine's loopback address, for local mirrors and tests).
Downloads stream to a temporary file in the cache folder, are SHA-256 checked and only then renamed into place, so
a failed or corrupt download never leaves a file behind. Sites without internet copy the file with
:func:`install_from_file` (``petworkbench models install ID FILE``). Nothing is downloaded at import time.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, ModelError
from .paths import models_cache_dir, resources_dir

REQUIRED = ("id", "family", "method", "title", "version", "config", "inputs", "units", "url", "sha256",
            "license", "training", "metrics")
BUNDLED = "bundled:"
# entry fields measured on the weights by another tool than the one that (re)writes the entry: kept by
# upsert_entries while the weights (SHA-256) are the same
KEEP_WITH_WEIGHTS = ("lesion_calibration", "postprocessing")
CHUNK = 1 << 17


@dataclass
class ModelEntry:
    id: str
    family: str
    method: str
    title: str
    version: str
    config: dict
    inputs: list
    units: str
    url: str
    sha256: str
    license: str
    training: dict
    metrics: dict
    extra: dict = field(default_factory=dict)

    @property
    def bundled(self):
        return self.url.startswith(BUNDLED)

    @property
    def filename(self):
        return Path(self.url[len(BUNDLED):] if self.bundled else self.url.split("?")[0]).name

    def cached_path(self, cache_dir=None):
        if self.bundled:
            return resources_dir() / self.url[len(BUNDLED):]
        return Path(cache_dir or models_cache_dir()) / self.id / self.filename


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _entry(d, source):
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ModelError(f"Model entry {d.get('id', '?')} in {source} lacks field(s): {', '.join(missing)}")
    known = {k: d[k] for k in REQUIRED}
    return ModelEntry(**known, extra={k: v for k, v in d.items() if k not in REQUIRED})


def load_registry(path=None):
    """Read Models.json and return {id: ModelEntry}."""
    path = Path(path) if path else resources_dir() / "Models.json"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"Cannot read the model registry {path}: {e}") from e
    entries = list(data.get("models", []))
    out = {}
    for d in entries:
        e = _entry(d, path)
        if e.id in out:
            raise ModelError(f"Model id {e.id} is listed twice in the registry")
        out[e.id] = e
    return out


def upsert_entries(entries, path=None):
    """Add or replace (by id) model entries in Models.json, keeping the others and their order. Used by the
    training/benchmark scripts that measure a model, so the registry always carries the measured numbers. A
    replaced entry keeps its ``"default"`` mark unless the new entry sets one, and its measurements made on the
    weights themselves (``KEEP_WITH_WEIGHTS``, e.g. the lesion calibration) while the SHA-256 is unchanged."""
    path = Path(path) if path else resources_dir() / "Models.json"
    data = json.loads(path.read_text())
    models = data.setdefault("models", [])
    index = {m["id"]: i for i, m in enumerate(models)}
    for e in entries:
        _entry(e, path)                                  # validates the fields
        if e["id"] in index:
            old = models[index[e["id"]]]
            if "default" in old and "default" not in e:
                e = {**e, "default": old["default"]}
            if e.get("sha256") and old.get("sha256") == e["sha256"]:
                e = {**{k: old[k] for k in KEEP_WITH_WEIGHTS if k in old}, **e}
            models[index[e["id"]]] = e
        else:
            index[e["id"]] = len(models)
            models.append(e)
    from .imageio import write_json
    return write_json(data, path)


def registry(family=None, path=None):
    """List of registered models, optionally of one family."""
    return [e for e in load_registry(path).values() if family in (None, e.family)]


def default_model(family, path=None):
    """Id of the model marked ``"default": true`` for ``family`` in Models.json: the one place defaults are set."""
    ids = [e.id for e in registry(family, path) if e.extra.get("default")]
    if len(ids) != 1:
        raise ModelError(f"Models.json must mark exactly one default {family} model; it marks "
                         f"{', '.join(ids) if ids else 'none'}")
    return ids[0]


def get(model_id, path=None):
    reg = load_registry(path)
    if model_id not in reg:
        raise ModelError(f"Unknown model '{model_id}'. Registered models: {', '.join(sorted(reg)) or 'none'}")
    return reg[model_id]


def _as_entry(model):
    return model if isinstance(model, ModelEntry) else get(model)


def verify(model, cache_dir=None):
    """Check that the model's file is present and matches its SHA-256. Returns the path; raises ModelError."""
    e = _as_entry(model)
    p = e.cached_path(cache_dir)
    if not p.is_file():
        how = ("the extension install is incomplete" if e.bundled else
               f"download it (petworkbench models download {e.id}) or place it by hand "
               f"(petworkbench models install {e.id} FILE)")
        raise ModelError(f"Weights of model '{e.id}' not found at {p}: {how}")
    digest = sha256_of(p)
    if digest != e.sha256:
        how = ("reinstall the extension (Extension Manager) or restore the file from the source tree" if e.bundled
               else f"delete it (petworkbench models delete {e.id}) and download it again")
        raise ModelError(f"Weights of model '{e.id}' at {p} are damaged (SHA-256 does not match the registry): {how}")
    return p


def _atomic_copy_verified(e, write_into, cache_dir):
    """Write the weights through a temporary file in the target folder; rename only when the hash matches."""
    dest = e.cached_path(cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{e.filename}.", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            write_into(f, h)
        digest = h.hexdigest()
        if digest != e.sha256:
            raise ModelError(f"Checksum mismatch for model '{e.id}': expected SHA-256 {e.sha256}, got {digest}. "
                             "The file was not installed.")
        os.replace(tmp, dest)
        return dest
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        try:
            dest.parent.rmdir()   # only succeeds if we left it empty
        except OSError:
            pass


def check_url(e):
    """Only https:// is downloaded; http:// only from the loopback address (a local mirror or a test server)."""
    from urllib.parse import urlparse
    u = urlparse(e.url)
    if u.scheme == "https" or (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1")):
        return
    raise ModelError(f"Model '{e.id}' has the URL {e.url!r}; only https:// downloads are allowed. Fix the registry "
                     f"entry, or place the file by hand: petworkbench models install {e.id} FILE")


def download(model, progress=None, cache_dir=None, timeout=30):
    """Download the weights into the per-user cache (streaming, progress, SHA-256, atomic). Returns the path."""
    e = _as_entry(model)
    if e.bundled:
        return verify(e)
    check_url(e)
    import requests

    def write_into(f, h):
        try:
            with requests.get(e.url, stream=True, timeout=timeout) as r:
                r.raise_for_status()
                total = int(r.headers.get("content-length") or 0)
                done = 0
                for block in r.iter_content(CHUNK):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if progress and total:
                        progress(done / total, f"Downloading {e.id}: {done / 1e6:.1f} of {total / 1e6:.1f} MB")
        except requests.RequestException as err:
            raise ModelError(f"Could not download model '{e.id}' from {e.url}: {err}. Without network access, "
                             f"place the file by hand: petworkbench models install {e.id} FILE") from err

    return _atomic_copy_verified(e, write_into, cache_dir)


def install_from_file(model, source, cache_dir=None):
    """Offline install: copy a weights file obtained by other means into the cache, after checking its SHA-256."""
    e = _as_entry(model)
    source = Path(source)
    if not source.is_file():
        raise InputError(f"File to install for model '{e.id}' not found: {source}")
    if e.bundled:
        raise InputError(f"Model '{e.id}' ships with the extension; nothing to install")

    def write_into(f, h):
        with open(source, "rb") as s:
            for block in iter(lambda: s.read(CHUNK), b""):
                f.write(block)
                h.update(block)

    return _atomic_copy_verified(e, write_into, cache_dir)


def ensure(model, progress=None, cache_dir=None, allow_download=True):
    """Path of verified weights, downloading them first if needed and allowed."""
    e = _as_entry(model)
    p = e.cached_path(cache_dir)
    if p.is_file() or e.bundled or not allow_download:
        return verify(e, cache_dir)
    return download(e, progress=progress, cache_dir=cache_dir)


def delete(model, cache_dir=None):
    """Remove a downloaded model from the cache. Returns True if something was removed."""
    e = _as_entry(model)
    if e.bundled:
        raise InputError(f"Model '{e.id}' ships with the extension and cannot be deleted from the cache")
    d = e.cached_path(cache_dir).parent
    if d.is_dir():
        shutil.rmtree(d)
        return True
    return False


def status(model, cache_dir=None):
    """'bundled', 'installed', 'missing' or 'corrupt'."""
    e = _as_entry(model)
    p = e.cached_path(cache_dir)
    if not p.is_file():
        return "missing"
    if sha256_of(p) != e.sha256:
        return "corrupt"
    return "bundled" if e.bundled else "installed"


def read_torch_file(path, keys=("config", "state_dict"), what="weights file", map_location="cpu"):
    """A torch file of tensors and plain data (weights, training checkpoints), refused with one ModelError line
    naming the file when it is empty, truncated or damaged (every record's CRC is checked, so a few flipped bytes
    are caught), holds other objects (``weights_only=True``: nothing in the file can run code), or lacks ``keys``."""
    import pickle
    import warnings
    import zipfile

    import torch
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except FileNotFoundError:
        raise ModelError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ModelError(f"cannot read {what} {path}: {err.strerror or err}") from None
    if not head:
        raise ModelError(f"Cannot read {what} {path}: the file is empty (0 bytes)")
    if head != b"PK\x03\x04":
        raise ModelError(f"Cannot read {what} {path}: not a PyTorch zip archive (damaged, or another kind of file); "
                         "refusing to load it")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise ModelError(f"Cannot read {what} {path}: the file is truncated or damaged") from None
    if bad is not None:
        raise ModelError(f"Cannot read {what} {path}: the file is truncated or damaged (its record "
                         f"{Path(bad).name} fails its checksum)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"Cannot read {what} {path}: it holds objects other than tensors and plain data (such a "
                         "file can run code when loaded); refusing to load it") from None
    except Exception:  # noqa: BLE001 - torch raises many types for damaged files
        raise ModelError(f"Cannot read {what} {path}: the file is truncated or damaged") from None
    missing = [k for k in keys if k not in obj] if isinstance(obj, dict) else list(keys)
    if missing:
        raise ModelError(f"Cannot read {what} {path}: not a PETWorkbench {what} (it has no {', '.join(missing)})")
    return obj


def load_checkpoint(path, map_location="cpu"):
    """Load a weights file written by :func:`save_checkpoint`: dict with 'config' and 'state_dict', read by
    :func:`read_torch_file`, with finite floating-point tensors. Checksum against the registry:
    :func:`load_model_checkpoint`."""
    import torch
    ckpt = read_torch_file(path, ("config", "state_dict"), "model weights", map_location)
    if not isinstance(ckpt["state_dict"], dict):
        raise ModelError(f"{Path(path).name} is not a PETWorkbench weights file (its state_dict is not a dict)")
    bad = [k for k, v in ckpt["state_dict"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"Model weights {Path(path).name} are damaged: tensor {bad[0]} holds NaN or infinite values")
    return ckpt


def save_checkpoint(path, config, state_dict, **extra):
    """Write a checkpoint that :func:`load_checkpoint` reads (plain tensors and JSON-like data only), atomically
    and verified."""
    from .imageio import save_torch
    return save_torch({"config": config, "state_dict": state_dict, **extra}, path)


def registered_entry(model, registry_path=None):
    """The registry entry of ``model``: a registered id, or a weights file (.pt/.pth) whose SHA-256 equals a
    registered model's (whatever its name); None for anything else."""
    if isinstance(model, (str, Path)) and Path(model).suffix in (".pt", ".pth"):
        if not Path(model).is_file():
            return None
        digest = sha256_of(model)
        return next((e for e in load_registry(registry_path).values() if e.sha256 == digest), None)
    if isinstance(model, str):
        return load_registry(registry_path).get(model)
    return None


def registered_entry_for_file(path, registry_path=None):
    """The registry entry whose weights file has this file's name (bundled or cached), or None."""
    name = Path(path).name
    for e in load_registry(registry_path).values():
        if e.filename == name:
            return e
    return None


def load_model_checkpoint(model, progress=None, map_location="cpu"):
    """Registry id or file path -> checkpoint dict. Weights given by id are verified against their registered
    SHA-256; a file named like a registered model's weights must match that entry's checksum too."""
    if isinstance(model, (str, Path)) and Path(model).suffix in (".pt", ".pth") and Path(model).is_file():
        e = registered_entry_for_file(model)
        if e is not None and sha256_of(model) != e.sha256:
            raise ModelError(f"{Path(model).name} is named like the weights of the registered model '{e.id}' but its "
                             "SHA-256 differs: the file is damaged or modified. Use the model id, or rename the file "
                             "if it is your own model")
        return load_checkpoint(model, map_location)
    if isinstance(model, (str, Path)) and Path(model).suffix in (".pt", ".pth") and not Path(model).exists():
        raise ModelError(f"Model weights not found: {model}")
    return load_checkpoint(ensure(model, progress=progress), map_location)
