"""Tiny multi-centre data for the synthesis tests (a few small volumes written into tmp_path)."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk

TINY_MODEL = {"arch": "drmc", "n_feats": 8, "res_num": 2, "num_experts": 3, "mlp_ratio": 2, "num_heads": 2,
              "hidden_dim": 4}
TINY_TRAIN = {"patch_size": 12, "batch_size": 2, "lr": 1e-3, "max_steps": 4, "checkpoint_every": 2, "log_every": 1,
              "seed": 3, "num_threads": 1}


def phantom(shape=(14, 16, 16), seed=0, lesion=True):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = (x ** 2 + y ** 2 < 0.8).astype(np.float32) * (1.0 + 0.3 * rng.random())
    les = ((x - 0.2) ** 2 + (y + 0.1) ** 2 + z ** 2 < 0.12).astype(np.int16) if lesion else np.zeros(shape, np.int16)
    full = body + 4.0 * les
    return full.astype(np.float32), les


def write_image(arr, path, spacing=(2.0, 2.0, 2.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return img


@pytest.fixture
def tiny_manifest(tmp_path):
    """manifest.csv with 2 known centres (2 train + 1 test patient each) and 1 unknown centre (1 test)."""
    rows = []
    spec = [("A", True, 0.15, (2.0, 2.0, 2.0)), ("B", True, 0.4, (2.5, 2.5, 2.0)), ("U", False, 0.3, (2.0, 2.0, 2.0))]
    k = 0
    for center, known, noise, sp in spec:
        splits = ["train", "train", "test"] if known else ["test"]
        for j, split in enumerate(splits):
            k += 1
            full, les = phantom(seed=k)
            rng = np.random.default_rng(100 + k)
            low = np.clip(full + noise * rng.standard_normal(full.shape).astype(np.float32), 0, None)
            cid = f"{center}{j}"
            write_image(full, tmp_path / f"{cid}_full.nii.gz", sp)
            write_image(low, tmp_path / f"{cid}_low.nii.gz", sp)
            write_image(les, tmp_path / f"{cid}_les.nii.gz", sp)
            rows.append({"case_id": cid, "patient_id": cid, "center": center, "known": int(known), "tracer": "FDG",
                         "drf": 10, "split": split, "full_dose": f"{cid}_full.nii.gz", "low_dose": f"{cid}_low.nii.gz",
                         "low_dose_drf20": "", "ct": "", "labels": "", "lesions": f"{cid}_les.nii.gz",
                         "spacing_mm": "x".join(map(str, sp)), "units": "SUV"})
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
