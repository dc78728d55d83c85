"""Registration metrics: Dice, HD95 over labels, folding %, std(log J), landmark TRE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import hd95_asd

from .result import jacobian_array, jacobian_stats

if TYPE_CHECKING:
    from collections.abc import Sequence


def _arr(img):
    return sitk.GetArrayFromImage(img) if isinstance(img, sitk.Image) else np.asarray(img)


def _check_same_grid(a, b, what):
    if isinstance(a, sitk.Image) and isinstance(b, sitk.Image):
        if a.GetSize() != b.GetSize():
            raise InputError(f"{what}: label maps have different sizes {a.GetSize()} vs {b.GetSize()}")
    elif np.shape(_arr(a)) != np.shape(_arr(b)):
        raise InputError(f"{what}: label maps have different shapes {np.shape(_arr(a))} vs {np.shape(_arr(b))}")


def dice(labels_a: sitk.Image | np.ndarray, labels_b: sitk.Image | np.ndarray, values: Sequence[int] | None = None
         ) -> tuple[dict[int, float], float]:
    """Per-label Dice ``{value: dice}`` and their mean (labels present in either map, 0 = background)."""
    _check_same_grid(labels_a, labels_b, "dice")
    a, b = _arr(labels_a), _arr(labels_b)
    if values is None:
        values = sorted((set(np.unique(a).tolist()) | set(np.unique(b).tolist())) - {0})
    if not values:
        raise InputError("dice: both label maps are empty (only background)")
    out = {}
    for v in values:
        x, y = a == v, b == v
        s = x.sum() + y.sum()
        out[int(v)] = float(2.0 * np.logical_and(x, y).sum() / s) if s else float("nan")
    return out, float(np.nanmean(list(out.values())))


def hd95(labels_a: sitk.Image | np.ndarray, labels_b: sitk.Image | np.ndarray, spacing: Sequence[float] | None = None,
         values: Sequence[int] | None = None) -> tuple[dict[int, float], float]:
    """Per-label HD95 in mm (:func:`PETWorkbenchLib.metrics.hd95_asd`: max of the two directed 95th percentiles),
    and its mean."""
    _check_same_grid(labels_a, labels_b, "hd95")
    if spacing is None:
        spacing = labels_a.GetSpacing() if isinstance(labels_a, sitk.Image) else None
    a, b = _arr(labels_a), _arr(labels_b)
    sp = None if spacing is None else tuple(spacing)[::-1]
    if values is None:
        values = sorted((set(np.unique(a).tolist()) & set(np.unique(b).tolist())) - {0})
    out = {}
    for v in values:
        x, y = a == v, b == v
        if not x.any() or not y.any():
            out[int(v)] = float("nan")
            continue
        out[int(v)] = hd95_asd(x, y, sp)[0]
    vals = [v for v in out.values() if np.isfinite(v)]
    return out, (float(np.mean(vals)) if vals else float("nan"))


def folding(displacement: sitk.Image, mask: sitk.Image | np.ndarray | None = None) -> dict[str, float]:
    """``{"folding_pct", "std_log_j", ...}`` of a displacement field (SimpleITK vector image)."""
    m = _arr(mask) if mask is not None else None
    return jacobian_stats(jacobian_array(displacement), m)


def tre(displacement: sitk.Image, fixed_points: np.ndarray, moving_points: np.ndarray
        ) -> tuple[np.ndarray, float]:
    """Landmark target registration error (mm): ``|x_f + u(x_f) - x_m|`` per pair; returns (errors, mean)."""
    fp = np.asarray(fixed_points, float)
    mp = np.asarray(moving_points, float)
    if fp.shape != mp.shape or fp.ndim != 2 or fp.shape[1] != displacement.GetDimension():
        raise InputError(f"tre: need two (N, {displacement.GetDimension()}) point lists of the same size, got "
                         f"{fp.shape} and {mp.shape}")
    tx = sitk.DisplacementFieldTransform(sitk.Image(sitk.Cast(displacement, sitk.sitkVectorFloat64)))
    mapped = np.array([tx.TransformPoint([float(v) for v in p]) for p in fp])
    err = np.linalg.norm(mapped - mp, axis=1)
    return err, float(err.mean())
