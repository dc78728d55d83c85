"""Segmentation metrics per organ: Dice, IoU, HD95 and ASD (mm), and their means.

* An organ absent from the reference is reported ``"status": "missing"`` and is not scored (never a Dice of 0).
* An organ present in the reference but not predicted gets Dice = IoU = 0 and undefined distances (None),
  ``"status": "not_predicted"``; distance means are over the organs where they are defined (their count is given).
* HD95 and ASD: :mod:`PETWorkbenchLib.metrics` (surface = voxels with a face-neighbour outside; HD95 = max of the
  two directed 95th percentiles, as MONAI's ``compute_hausdorff_distance``; ASD = mean of all distances).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import hd95_asd, surface_distances  # noqa: F401 - surface_distances: the engine's name

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    import SimpleITK as sitk


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float | None]:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    inter = np.logical_and(pred, ref).sum()
    ps, rs = pred.sum(), ref.sum()
    dice = 2.0 * inter / (ps + rs) if ps + rs else float("nan")
    union = ps + rs - inter
    iou = inter / union if union else float("nan")
    if ps == 0 or rs == 0:
        return dict(dice=float(dice), iou=float(iou), hd95=None, asd=None)
    hd95, asd = hd95_asd(pred, ref, spacing)
    return dict(dice=float(dice), iou=float(iou), hd95=hd95, asd=asd)


def _as_array(x):
    try:
        import SimpleITK as sitk
        if isinstance(x, sitk.Image):
            return sitk.GetArrayFromImage(x), tuple(reversed(x.GetSpacing()))
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x), None


def evaluate(pred: sitk.Image | np.ndarray, ref: sitk.Image | np.ndarray, specs: Iterable[dict],
             spacing: Sequence[float] | None = None) -> dict:
    """Per-organ metrics and means.

    ``pred``/``ref``: label images (SimpleITK) or arrays (z, y, x) with ``spacing`` (z, y, x) in mm. Images are
    compared in physical space: a prediction holding the reference's voxels in another storage order is reordered
    onto the reference grid, one on another grid is refused
    (:func:`PETWorkbenchLib.imageio.match_grid`). ``specs``: segment specs (value, name). Returns
    ``{"organs": {name: {...}}, "mean": {...}}``.
    """
    try:
        import SimpleITK as sitk
        if isinstance(pred, sitk.Image) and isinstance(ref, sitk.Image):
            from PETWorkbenchLib.imageio import match_grid
            pred = match_grid(pred, ref, "the prediction", "the reference labels")
    except ImportError:  # pragma: no cover
        pass
    pa, psp = _as_array(pred)
    ra, rsp = _as_array(ref)
    if pa.shape != ra.shape:
        raise InputError(f"prediction and reference label maps differ in size: {pa.shape} vs {ra.shape}")
    sp = spacing or psp or rsp
    if sp is None:
        raise InputError("voxel spacing is needed for surface distances (give SimpleITK images or spacing=)")
    if psp and rsp and not np.allclose(psp, rsp, rtol=1e-4):
        raise InputError(f"prediction and reference have different spacing: {psp} vs {rsp}")
    organs = {}
    for s in specs:
        v, name = int(s["value"]), s["name"]
        r = ra == v
        if not r.any():
            organs[name] = {"value": v, "status": "missing"}
            continue
        m = binary_metrics(pa == v, r, sp)
        m.update(value=v, status="ok" if m["hd95"] is not None else "not_predicted")
        organs[name] = m
    return {"organs": organs, "mean": summarize(organs)}


def summarize(organs: dict[str, dict]) -> dict:
    scored = [m for m in organs.values() if m.get("status") != "missing"]
    out = {"n_scored": len(scored), "n_missing": sum(m.get("status") == "missing" for m in organs.values())}
    for k in ("dice", "iou", "hd95", "asd"):
        vals = [m[k] for m in scored if m.get(k) is not None and np.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else None
        if k in ("hd95", "asd"):
            out[f"n_{k}"] = len(vals)
    return out


def aggregate(results: Iterable[dict]) -> dict:
    """Mean over cases of the per-case, per-organ metrics (only where the organ was scored)."""
    names = {}
    for r in results:
        for n, m in r["organs"].items():
            names.setdefault(n, []).append(m)
    organs = {}
    for n, ms in names.items():
        scored = [m for m in ms if m.get("status") != "missing"]
        if not scored:
            organs[n] = {"status": "missing", "n_cases": 0}
            continue
        e = {"status": "ok", "n_cases": len(scored)}
        for k in ("dice", "iou", "hd95", "asd"):
            vals = [m[k] for m in scored if m.get(k) is not None]
            e[k] = float(np.mean(vals)) if vals else None
        organs[n] = e
    return {"organs": organs, "mean": summarize(organs)}
