"""Training data: the simulated multi-centre PET set (manifest.csv) resampled to the model spacing, and patches.

manifest.csv columns used: case_id, split, full_dose, low_dose, low_dose_drf20, labels (paths relative to the
manifest), tracer, center. Volumes are resampled once to the config spacing and cached as .npz next to the
``cache_dir`` given (default: ``<manifest dir>/../seg_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.manifest import case_path, read_manifest, select  # noqa: F401 - the engine's names for them

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import SimpleITK as sitk


def file_stamps(row: dict, keys: Iterable[str]) -> list[list[int]]:
    """[[size, mtime_ns], ...] of a case's files: part of cache keys, so a regenerated data set is re-read."""
    return [[st.st_size, st.st_mtime_ns] for st in (os.stat(case_path(row, k)) for k in keys)]


def normalise(suv: np.ndarray, norm: dict) -> np.ndarray:
    """SUV -> network intensity: clip to [0, clip] and divide by scale."""
    return np.clip(suv, 0.0, norm.get("clip", 50.0)) / norm.get("scale", 5.0)


def denormalise(x: np.ndarray, norm: dict) -> np.ndarray:
    return x * norm.get("scale", 5.0)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], is_label: bool = False) -> sitk.Image:
    """The model grid of LDOS: :func:`PETWorkbenchLib.imageio.resample_to_spacing` keeping the origin."""
    from PETWorkbenchLib.imageio import resample_to_spacing as resample
    return resample(image, spacing, label=is_label, keep="origin")


def load_case(row: dict, cfg: dict, cache_dir: str | Path, input_key: str | None = None,
              target_key: str | None = None) -> dict:
    """Dict with arrays x (input, normalised), y (full dose, normalised), label (int), spacing (z, y, x)."""
    import SimpleITK as sitk
    input_key = input_key or cfg.get("input_key", "low_dose_drf20")
    target_key = target_key or cfg.get("target_key", "full_dose")
    spacing = cfg["spacing"]
    stamps = file_stamps(row, (input_key, target_key, "labels"))
    tag = hashlib.sha1(json.dumps([row["case_id"], input_key, target_key, spacing, stamps],
                                  sort_keys=True).encode())
    cache = Path(cache_dir) / f"{row['case_id']}_{tag.hexdigest()[:10]}.npz"
    if cache.is_file():
        d = np.load(cache)
        arrs = {k: d[k] for k in d.files}
    else:
        from PETWorkbenchLib.imageio import read_image, save_npz
        case = row["case_id"]
        xi = resample_to_spacing(read_image(case_path(row, input_key), f"{case} {input_key}",
                                            pixel_type=sitk.sitkFloat32), spacing)
        yi = resample_to_spacing(read_image(case_path(row, target_key), f"{case} {target_key}",
                                            pixel_type=sitk.sitkFloat32), spacing)
        li = resample_to_spacing(read_image(case_path(row, "labels"), f"{case} labels", pixel_type=sitk.sitkUInt8),
                                 spacing, True)
        arrs = dict(x=sitk.GetArrayFromImage(xi).astype(np.float32), y=sitk.GetArrayFromImage(yi).astype(np.float32),
                    label=sitk.GetArrayFromImage(li).astype(np.uint8))
        save_npz(cache, **arrs)
    norm = cfg.get("norm", {})
    return dict(case_id=row["case_id"], x=normalise(arrs["x"], norm).astype(np.float32),
                y=normalise(arrs["y"], norm).astype(np.float32), label=arrs["label"],
                spacing=tuple(reversed([float(s) for s in spacing])))


class PatchSampler:
    """Random patches, a fraction forced to contain foreground (nnU-Net oversampling).

    As nnU-Net does, a forced patch first draws one of the organ classes present in the case (uniformly) and then
    a voxel of that class, so small organs (pancreas, aorta, oesophagus) are seen as often as large ones.
    """

    def __init__(self, cases, patch_size, fg_fraction=0.33, seed=0):
        if not cases:
            raise InputError("No training cases")
        self.cases = cases
        self.patch = tuple(int(p) for p in patch_size)
        self.fg_fraction = fg_fraction
        self.rng = np.random.default_rng(seed)
        self.fg = [self._class_locations(self._pad(c["label"])) for c in cases]

    @staticmethod
    def _class_locations(label):
        """{class: (n, 3) voxel indices} for every foreground class present in ``label``."""
        flat = label.ravel()
        idx = np.flatnonzero(flat > 0)
        if not idx.size:
            return {}
        vals = flat[idx]
        order = np.argsort(vals, kind="stable")
        idx, vals = idx[order], vals[order]
        classes, starts = np.unique(vals, return_index=True)
        coords = np.stack(np.unravel_index(idx, label.shape), 1)
        bounds = list(starts[1:]) + [len(idx)]
        return {int(c): coords[a:b] for c, a, b in zip(classes, starts, bounds)}

    def _pad(self, a, value=0):
        pad = [(0, max(0, p - s)) for p, s in zip(self.patch, a.shape)]
        return np.pad(a, pad, constant_values=value) if any(p[1] for p in pad) else a

    def sample(self, batch_size, margin=(0, 0, 0)):
        """(x, y, label) batches of patches; ``margin`` voxels more on each side (zero-padded at the volume's
        border) for spatial augmentation, centred on the same patch (the random draws do not depend on it)."""
        xs, ys, ls = [], [], []
        m = [int(v) for v in margin]
        for b in range(batch_size):
            ci = int(self.rng.integers(len(self.cases)))
            c = self.cases[ci]
            x, y, lab = self._pad(c["x"]), self._pad(c["y"]), self._pad(c["label"])
            shape = np.array(x.shape)
            ps = np.array(self.patch)
            force_fg = b >= batch_size * (1 - self.fg_fraction) and len(self.fg[ci])
            if force_fg:
                per_class = self.fg[ci]  # classes in ascending order (np.unique)
                locs = list(per_class.values())[int(self.rng.integers(len(per_class)))]
                centre = locs[int(self.rng.integers(len(locs)))]
                lo = np.clip(centre - ps // 2 + self.rng.integers(-ps // 4, ps // 4 + 1), 0, shape - ps)
            else:
                lo = np.array([int(self.rng.integers(0, s - p + 1)) for s, p in zip(shape, ps)])
            if any(m):
                pad = [(v, v) for v in m]
                x, y, lab = np.pad(x, pad), np.pad(y, pad), np.pad(lab, pad)
            sl = tuple(slice(int(a), int(a) + int(p) + 2 * v) for a, p, v in zip(lo, ps, m))
            xs.append(x[sl]), ys.append(y[sl]), ls.append(lab[sl])
        return np.stack(xs)[:, None], np.stack(ys)[:, None], np.stack(ls).astype(np.int64)


def random_cases(n: int, shape: tuple[int, int, int] = (32, 32, 32), n_classes: int = 19, seed: int = 0,
                 spacing: tuple[float, float, float] = (4.0, 4.0, 4.0),
                 radius: tuple[float, float] = (2.5, 5.0)) -> list[dict]:
    """Tiny synthetic cases (blobs of organ labels, uptake per organ, Poisson-like noise) for tests."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        lab = np.zeros(shape, np.uint8)
        zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        for v in range(1, n_classes):
            c = rng.uniform(0.2, 0.8, 3) * np.array(shape)
            r = rng.uniform(*radius)
            lab[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r] = v
        uptake = np.concatenate([[0.5], rng.uniform(1.0, 6.0, n_classes - 1)])
        fd = uptake[lab].astype(np.float32)
        ld = (rng.poisson(fd * 4.0) / 4.0).astype(np.float32)
        cases.append(dict(case_id=f"rand{i}", x=ld / 5.0, y=fd / 5.0, label=lab, spacing=spacing))
    return cases
