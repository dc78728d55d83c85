"""Tiny synthesis configurations and phantoms shared by the synthesis tests (imported by name, so that no
other folder's conftest can shadow them)."""

import numpy as np
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
