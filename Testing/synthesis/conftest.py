"""Tiny multi-centre data for the synthesis tests (a few small volumes written into tmp_path)."""

import csv

import numpy as np
import pytest

from synthesis_data import TINY_MODEL, TINY_TRAIN, phantom, write_image  # noqa: F401 - fixtures use them


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
