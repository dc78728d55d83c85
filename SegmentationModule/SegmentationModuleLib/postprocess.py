"""nnU-Net's post-processing: keep only the largest connected component, where cases with known labels say it helps.

nnU-Net (``nnunetv2.postprocessing.remove_connected_components.determine_postprocessing``) decides on its
cross-validation predictions, in two steps:

1. the whole foreground (every organ together): voxels outside its largest connected component become background,
   kept when the mean Dice over the organs improves and no organ's mean Dice gets worse;
2. then each organ in turn (in label order, on top of what was kept so far): voxels of that organ outside its largest
   component become background, kept when that organ's mean Dice improves.

Components are fully connected (26 neighbours in 3D), as nnU-Net's (``acvl_utils``, scikit-image's default),
and every component of the largest size is kept when several tie; SimpleITK labels them here. One difference: Dice
is that of :mod:`SegmentationModuleLib.metrics`, where an organ is scored only in the cases whose reference holds it
(nnU-Net scores a prediction of an organ absent from the reference as Dice 0, so removing such islands counts there
and not here; organs absent from every reference are not decided). The predictions of all deciding cases are held
in memory (about 2 bytes per voxel and case). The decision is stored in the model's
configuration (``inference.postprocessing``) and :func:`apply_postprocessing` applies it to every label map that
:func:`SegmentationModuleLib.infer.segment` returns. Organs with two parts in one label (kidneys, lungs, femurs)
lose a part to the largest-component rule, so the Dice check normally rejects them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from PETWorkbenchLib.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

POSTPROCESSING_KEYS = ("largest_foreground", "largest_component")


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest fully connected component of ``mask`` (every component of that size when
    several tie, as nnU-Net's ``acvl_utils``; all False when ``mask`` is empty)."""
    import SimpleITK as sitk
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask.copy()
    comps = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    sizes = np.bincount(comps.ravel())
    sizes[0] = 0                                       # background
    return np.isin(comps, np.flatnonzero(sizes == sizes.max()))


def keep_largest(label_map: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """Copy of ``label_map`` in which the voxels of ``labels`` outside the largest component of their union are
    background (0). Labels are compared as values; the input is not changed."""
    out = np.array(label_map, copy=True)
    mask = np.isin(out, list(labels))
    if not mask.any():
        return out
    # only the bounding box of the mask is labelled (a whole-body volume holds each organ in a small part)
    idx = np.nonzero(mask)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    sub = mask[box]
    drop = sub & ~largest_component(sub)
    region = out[box]
    region[drop] = 0
    return out


def check_postprocessing(pp: dict | None) -> dict:
    """The stored decision, validated: {"largest_foreground": bool, "largest_component": [label values]}."""
    if pp is None:
        return {"largest_foreground": False, "largest_component": []}
    if not isinstance(pp, dict) or set(pp) - set(POSTPROCESSING_KEYS):
        raise InputError(f"post-processing must be a dict with keys {POSTPROCESSING_KEYS}, got {pp!r}")
    fg = pp.get("largest_foreground", False)
    labels = pp.get("largest_component", [])
    if not isinstance(fg, bool) or not isinstance(labels, (list, tuple)) \
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 256 for v in labels):
        raise InputError(f"post-processing: largest_foreground must be true/false and largest_component a list of "
                         f"label values 1-255, got {pp!r}")
    return {"largest_foreground": fg, "largest_component": [int(v) for v in labels]}


def apply_postprocessing(label_map: np.ndarray, pp: dict | None) -> np.ndarray:
    """``label_map`` (uint8 array) with the decision ``pp`` applied: first the whole foreground, then each listed
    label in its order. Returns a new array; None or an empty decision returns a copy."""
    pp = check_postprocessing(pp)
    out = np.array(label_map, copy=True)
    if pp["largest_foreground"]:
        fg = [int(v) for v in np.unique(out) if v != 0]
        out = keep_largest(out, fg)
    for v in pp["largest_component"]:
        out = keep_largest(out, [v])
    return out


def _dice_table(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence[int]) -> np.ndarray:
    """(cases, labels) Dice; NaN where the reference lacks the label (not scored, as the evaluation)."""
    k = 256
    table = np.full((len(preds), len(labels)), np.nan)
    for i, (p, r) in enumerate(zip(preds, refs)):
        conf = np.bincount(p.astype(np.int64).ravel() * k + r.astype(np.int64).ravel(), minlength=k * k)
        conf = conf.reshape(k, k)
        for j, v in enumerate(labels):
            rs, ps, inter = conf[:, v].sum(), conf[v, :].sum(), conf[v, v]
            if rs:
                table[i, j] = 2.0 * inter / (ps + rs)
    return table


def _means(table: np.ndarray) -> np.ndarray:
    scored = ~np.isnan(table).all(0)
    out = np.full(table.shape[1], np.nan)
    out[scored] = np.nanmean(table[:, scored], 0)
    return out


def determine_postprocessing(preds: Sequence[np.ndarray], refs: Sequence[np.ndarray],
                             labels: Sequence[int]) -> tuple[dict, dict]:
    """nnU-Net's decision (module docstring) from predicted and reference label maps of the same cases (arrays
    of equal shape per case). Returns (decision, report) where the report gives the mean Dice per label before and
    after and each step's outcome."""
    if len(preds) != len(refs) or not preds:
        raise InputError("determine_postprocessing needs the same number (> 0) of predictions and references")
    for p, r in zip(preds, refs):
        if np.shape(p) != np.shape(r):
            raise InputError(f"prediction and reference differ in size: {np.shape(p)} vs {np.shape(r)}")
        for a, what in ((p, "prediction"), (r, "reference")):
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() > 255)):
                raise InputError(f"a {what} label map must hold integer labels 0-255")
    labels = [int(v) for v in labels]
    if any(not 0 < v < 256 for v in labels):
        raise InputError(f"label values must be 1-255, got {labels}")
    base = _means(_dice_table(preds, refs, labels))
    steps = []
    current = [np.asarray(p) for p in preds]
    cand = [keep_largest(p, labels) for p in current]
    after = _means(_dice_table(cand, refs, labels))
    fg_ok = bool(np.nanmean(after) > np.nanmean(base)
                 and not np.any(after[~np.isnan(base)] < base[~np.isnan(base)]))
    steps.append({"step": "largest_foreground", "kept": fg_ok, "mean_dice_before": float(np.nanmean(base)),
                  "mean_dice_after": float(np.nanmean(after))})
    cur_means = base
    if fg_ok:
        current, cur_means = cand, after
    kept = []
    for j, v in enumerate(labels):
        if np.isnan(cur_means[j]):
            continue
        cand = [keep_largest(p, [v]) for p in current]
        cand_means = _means(_dice_table(cand, refs, labels))
        ok = bool(cand_means[j] > cur_means[j])
        steps.append({"step": f"largest_component {v}", "label": v, "kept": ok,
                      "dice_before": float(cur_means[j]), "dice_after": float(cand_means[j])})
        if ok:
            kept.append(v)
            current, cur_means = cand, cand_means
    decision = {"largest_foreground": fg_ok, "largest_component": kept}
    report = {"decision": decision, "steps": steps, "n_cases": len(preds),
              "mean_dice_before": {v: float(base[j]) for j, v in enumerate(labels) if not np.isnan(base[j])},
              "mean_dice_after": {v: float(cur_means[j]) for j, v in enumerate(labels) if not np.isnan(cur_means[j])}}
    return decision, report
