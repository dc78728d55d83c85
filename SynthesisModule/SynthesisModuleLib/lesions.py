"""Lesion-change report of a synthesis: what the network did to each hot spot of the input.

Hot spots are the connected regions (face connectivity) of the *input* PET above a threshold, at least
``min_volume_ml`` large and, as PERCIST's measurable lesions, with an SUVpeak above the threshold too (so that
clusters of noisy voxels are not listed): PERCIST's liver-based threshold (1.5 x liver SUVmean + 2 x liver SD, Wahl
et al. 2009) when a liver mask is given, else a fixed SUV (2.5 by default). For each hot spot, on the same voxels
of the input and of the output: SUVmax, SUVpeak (PERCIST: the highest mean in a 1 cm^3 sphere centred in the hot
spot) and SUVmean, and their change in %.

Flag rule (stated in every report): a hot spot is flagged (1) when its SUVpeak changed by more than ``k`` (2)
standard errors of the input's SUVpeak, i.e. by more than the input's noise explains, or (2) when its SUVpeak fell
by more than ``tol_pct`` (5 %) and the model's lesion calibration (below) cannot exclude that it lowers the SUVpeak
of lesions of this volume by more than ``tol_pct`` on average (one-sided 95 % confidence bound). SUVpeak is the
measure PERCIST uses for response; SUVmax is not a flag criterion because it is the maximum of noisy voxels, biased
upwards in a noisy input, so a denoiser lowers it legitimately. The standard error comes from the input itself, in a
shell 10-20 mm around the hot spot (other hot spots excluded): the input minus its 10 mm Gaussian smoothing keeps
the noise and removes uptake structure larger than a lesion; the robust SD (1.4826 x MAD) of its 1 cm^3 sphere
means, divided by the median smoothed level, is the noise CoV at the scale of SUVpeak (noise correlation included),
and with noise proportional to the signal as in OSEM PET, SE = CoV x SUVpeak(input). Structure smaller than 10 mm
left in the shell can only raise the SE (conservative: fewer flags); the smoothing also removes some of the noise's
own low frequencies, which lowers it.

Why the second criterion: one noisy input cannot tell a systematic loss from noise removal when the loss is
smaller than the noise (at a 10:1 dose reduction the SUVpeak of a 1 ml hot spot has an SE of about 10 %), yet a
network that lowers every small lesion by 10 % is exactly what a reader must be told. The lesion calibration of a
model (``evaluate.lesion_calibration``, stored in its Models.json entry as ``lesion_calibration``) is the
least-squares line of the SUVpeak change (%) of the true lesions of held-out simulated patients against the log of
their hot-spot volume; the expected change of a hot spot is that line at its volume (held inside the measured
range). The line is estimated from a few lesions (14 for the shipped model), so criterion (2) uses the one-sided 95 %
confidence bound of the line's mean at that volume (Student's t, n - 2 degrees of freedom, from the calibration's
own lesions) rather than the point estimate: a report meant to warn a reader errs towards flagging a fall the
calibration cannot clear (a calibration stored without its lesions: the line itself, and the rule says so). The
bound treats the lesions as independent; several come from the same patient, so it is somewhat narrower than a
bound clustered by case (METHOD.md). A model without a calibration gets criterion (1) only, and the report says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.metrics import PEAK_RADIUS_MM, percist_liver_threshold, sphere_mean

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import SimpleITK as sitk

DEFAULT_THRESHOLD_SUV = 2.5
FLAG_K = 2.0
FLATTEN_TOL_PCT = 5.0
SHELL_MM = (10.0, 20.0)
NOISE_SMOOTH_MM = 10.0
RULE = ("flagged when |SUVpeak(output) - SUVpeak(input)| > {k:g} x SE, SE = SUVpeak(input) x the input's noise "
        "CoV at the 1 cm^3 scale in a 10-20 mm shell around the hot spot (robust SD of the 1 cm^3 sphere means of "
        "the input minus its 10 mm Gaussian smoothing, over the median smoothed level)")
RULE_CALIBRATED = ("; or when SUVpeak fell by more than {tol:g} % and the model's lesion calibration ({n} lesions "
                   "of held-out simulated patients) cannot exclude that it lowers the SUVpeak of lesions of this "
                   "volume by more than {tol:g} % on average (one-sided {conf:g} % confidence bound of its line)")
RULE_CALIBRATED_LINE = ("; or when SUVpeak fell by more than {tol:g} % and the model's lesion calibration ({n} "
                        "lesions of held-out simulated patients; stored without its lesions, so without a confidence "
                        "bound) says it lowers the SUVpeak of lesions of this volume by more than {tol:g} % on "
                        "average")
CALIBRATION_CONFIDENCE = 0.95
REASON_NOISE = "change beyond noise"
REASON_SIZE = "lesions of this size may be flattened by the model"
RULE_UNCALIBRATED = ("; no lesion calibration was given for this model, so its systematic flattening of small "
                     "lesions is not flagged")
COLUMNS = ("id", "volume_ml", "center_lps", "suv_max_in", "suv_max_out", "suv_max_change_pct", "suv_peak_in",
           "suv_peak_out", "suv_peak_change_pct", "suv_mean_in", "suv_mean_out", "suv_mean_change_pct",
           "noise_se_pct", "expected_change_pct", "expected_change_bound_pct", "flagged", "flag_reason")


def _same_grid(a: sitk.Image, b: sitk.Image, what: str) -> None:
    if a.GetSize() != b.GetSize() or not np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4) or \
            not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3) or \
            not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5):
        raise InputError(f"{what} is not on the grid of the input PET (size {b.GetSize()} vs {a.GetSize()}); "
                         "resample it onto the PET first")


def _ball(spacing_zyx, radius_mm):
    r = [max(1, int(np.ceil(radius_mm / s))) for s in spacing_zyx]
    zz, yy, xx = np.meshgrid(*[np.arange(-k, k + 1) * s for k, s in zip(r, spacing_zyx)], indexing="ij")
    return zz ** 2 + yy ** 2 + xx ** 2 <= radius_mm ** 2


def _pct(new, old):
    return float(100.0 * (new - old) / old) if old else float("nan")


def _valid_calibration(cal) -> bool:
    try:
        lo, hi = (float(v) for v in cal["volume_range_ml"])
        return all(np.isfinite([float(cal["a"]), float(cal["b"]), lo, hi])) and 0 < lo <= hi
    except (KeyError, TypeError, ValueError):
        return False


def expected_change(calibration: dict | None, volume_ml: float) -> float:
    """The calibrated mean SUVpeak change (%) of lesions of ``volume_ml``: the calibration's line
    ``a + b ln(volume)``, with the volume held inside the range it was measured on; NaN without a (valid)
    calibration."""
    if not calibration or not _valid_calibration(calibration) or not np.isfinite(volume_ml) or volume_ml <= 0:
        return float("nan")
    lo, hi = calibration["volume_range_ml"]
    v = min(max(float(volume_ml), float(lo)), float(hi))
    return float(calibration["a"] + calibration["b"] * np.log(v))


def fit_log_line(volume_ml: Sequence[float] | np.ndarray, change_pct: Sequence[float] | np.ndarray) -> dict:
    """Least-squares line ``change = a + b ln(volume)`` with what its confidence bound needs: ``a``, ``b``, the
    residual SD ``s`` (n - 2 degrees of freedom), ``n``, the mean and the sum of squared deviations ``sxx`` of
    ``ln(volume)``. The calibration (``evaluate.calibration_from_hot_spots``) and its bound use this one fit."""
    x = np.log(np.asarray(volume_ml, dtype=np.float64))
    c = np.asarray(change_pct, dtype=np.float64)
    X = np.stack([np.ones_like(x), x], 1)
    (a, b), *_ = np.linalg.lstsq(X, c, rcond=None)
    s = float(np.sqrt(((c - a - b * x) ** 2).sum() / (x.size - 2)))
    return {"a": float(a), "b": float(b), "s": s, "n": int(x.size), "x_mean": float(x.mean()),
            "sxx": float(((x - x.mean()) ** 2).sum())}


def _lesion_fit(calibration: dict | None) -> dict | None:
    """:func:`fit_log_line` of a (valid) calibration's own lesions (its ``hot_spots``) when they are at least 3, spread
    in volume and consistent with its stored line (within 0.05 % over the measured range, i.e. at its ends: the two
    lines differ linearly); None otherwise (no confidence bound)."""
    if not calibration or not _valid_calibration(calibration):
        return None
    try:
        pts = calibration["hot_spots"]
        v = np.array([float(h["volume_ml"]) for h in pts], dtype=np.float64)
        c = np.array([float(h["suv_peak_change_pct"]) for h in pts], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if v.size < 3 or not np.all(np.isfinite(v)) or not np.all(v > 0) or not np.all(np.isfinite(c)) \
            or float(np.ptp(np.log(v))) <= 1e-9:
        return None
    fit = fit_log_line(v, c)
    ends = np.log([float(e) for e in calibration["volume_range_ml"]])
    if np.max(np.abs(fit["a"] + fit["b"] * ends - calibration["a"] - calibration["b"] * ends)) > 0.05:
        return None                                # the stored line is not the fit of the stored lesions
    return fit


def _bound(calibration: dict | None, fit: dict | None, volume_ml: float, confidence: float) -> float:
    mean = expected_change(calibration, volume_ml)
    if fit is None or not np.isfinite(mean):
        return float("nan")
    from scipy import stats
    lo, hi = calibration["volume_range_ml"]
    x0 = float(np.log(min(max(float(volume_ml), float(lo)), float(hi))))
    half = float(stats.t.ppf(confidence, fit["n"] - 2)) * fit["s"] * float(
        np.sqrt(1.0 / fit["n"] + (x0 - fit["x_mean"]) ** 2 / fit["sxx"]))
    bound = mean - half
    return bound if np.isfinite(bound) else float("nan")


def expected_change_bound(calibration: dict | None, volume_ml: float,
                          confidence: float = CALIBRATION_CONFIDENCE) -> float:
    """The one-sided lower ``confidence`` bound (%) of the calibrated mean SUVpeak change at ``volume_ml`` (held
    inside the measured range, as :func:`expected_change`): ``a + b x0 - t s sqrt(1/n + (x0 - mean x)^2 / Sxx)``
    with ``x = ln(volume)`` over the calibration's own lesions (its ``hot_spots``), ``s`` their residual SD and
    ``t`` Student's quantile with n - 2 degrees of freedom. NaN without a (valid) calibration or its lesions."""
    return _bound(calibration, _lesion_fit(calibration), volume_ml, confidence)


def model_calibration(model: str | Path | dict | None, weights_sha256: str | None = None) -> dict | None:
    """The ``lesion_calibration`` of a registered model, given by id or as a weights file with the registered
    SHA-256 (any name); None for anything else, or when the calibration was measured on other weights (than the
    registered ones, or than ``weights_sha256``: the weights that made the image, when known) or is incomplete."""
    from PETWorkbenchLib.models import registered_entry
    try:
        e = registered_entry(model)
    except Exception:  # noqa: BLE001 - an unreadable registry or file: no calibration, the noise rule still applies
        return None
    cal = e.extra.get("lesion_calibration") if e is not None else None
    if not cal or not _valid_calibration(cal) or cal.get("weights_sha256", e.sha256) != e.sha256:
        return None
    if weights_sha256 is not None and weights_sha256 != e.sha256:
        return None
    return cal


def lesion_change_report(input_pet: sitk.Image, output_pet: sitk.Image, liver_mask: sitk.Image | None = None,
                         threshold_suv: float | None = None, min_volume_ml: float = 0.1, k: float = FLAG_K,
                         max_lesions: int = 200, calibration: dict | None = None,
                         tol_pct: float = FLATTEN_TOL_PCT) -> dict:
    """Hot spots of ``input_pet`` (SUV) with their SUVmax / SUVpeak / SUVmean in the input and in ``output_pet``
    (same grid), the change in %, and a flag when the SUVpeak change exceeds what the input's noise explains or,
    with a ``calibration`` (:func:`model_calibration`), when it fell by more than ``tol_pct`` at a size the
    calibration cannot clear of flattening (see the module docstring). ``liver_mask`` (same grid, non-zero = liver)
    selects PERCIST's threshold; ``threshold_suv`` forces a fixed one. Returns ``{"threshold": {...}, "rule": str,
    "lesions": [row, ...]}``, rows ordered by input SUVpeak (highest first), at most ``max_lesions``."""
    import SimpleITK as sitk
    _same_grid(input_pet, output_pet, "The synthesized PET")
    if calibration is not None and not _valid_calibration(calibration):
        calibration = None                                       # incomplete: the noise criterion only
    fit = _lesion_fit(calibration)                               # once per report: the same for every hot spot
    x = sitk.GetArrayViewFromImage(input_pet)   # views: the report adds about 5 bytes per voxel (labels, mask)
    y = sitk.GetArrayViewFromImage(output_pet)
    sp = tuple(reversed(input_pet.GetSpacing()))
    voxel_ml = float(np.prod(sp)) / 1000.0
    if threshold_suv is not None:
        thr = {"method": "fixed", "suv": float(threshold_suv)}
    elif liver_mask is not None:
        _same_grid(input_pet, liver_mask, "The liver mask")
        liver = sitk.GetArrayViewFromImage(liver_mask) != 0
        core = ndimage.binary_erosion(liver, iterations=1)
        values = np.asarray(x[core if core.sum() >= 10 else liver], dtype=np.float64)
        thr = {"method": "PERCIST liver (1.5 x mean + 2 x SD)", "suv": percist_liver_threshold(values),
               "liver_suv_mean": float(values.mean()), "liver_suv_sd": float(values.std(ddof=1)),
               "liver_voxels": int(values.size)}
        del liver, core
    else:
        thr = {"method": "fixed (no liver given)", "suv": DEFAULT_THRESHOLD_SUV}
    labels, n = ndimage.label(x > thr["suv"])
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = {i for i in range(1, n + 1) if sizes[i] * voxel_ml >= min_volume_ml}
    rows = []
    ball_in, ball_out = _ball(sp, SHELL_MM[0]), _ball(sp, SHELL_MM[1])
    # everything is computed in a box around each hot spot, wide enough that the shell's sphere means and the
    # 10 mm smoothing (3 sigma) equal their whole-volume values
    reach = [int(np.ceil((SHELL_MM[1] + PEAK_RADIUS_MM + 3 * NOISE_SMOOTH_MM) / v)) + 1 for v in sp]
    near = [int(np.ceil(PEAK_RADIUS_MM / v)) + 1 for v in sp]
    for i, sl in enumerate(ndimage.find_objects(labels), 1):
        if i not in keep:
            continue
        # PERCIST's measurable lesion: SUVpeak above the threshold (noise specks are not); checked first in a box
        # just wide enough for the 1 cm^3 sphere, as a whole-body PET can have many specks
        small = tuple(slice(max(0, s.start - r), s.stop + r) for s, r in zip(sl, near))
        if float(sphere_mean(np.asarray(x[small], dtype=np.float64), sp)[labels[small] == i].max()) <= thr["suv"]:
            continue
        box = tuple(slice(max(0, s.start - r), s.stop + r) for s, r in zip(sl, reach))
        lab_b = labels[box]
        region = lab_b == i
        xb, yb = np.asarray(x[box], dtype=np.float64), np.asarray(y[box], dtype=np.float64)
        peak_in = sphere_mean(xb, sp)
        p_in = float(peak_in[region].max())
        peak_out = sphere_mean(yb, sp)
        p_out = float(peak_out[region].max())
        # the input's noise at the 1 cm^3 scale: sphere means of the input minus its 10 mm Gaussian smoothing (the
        # uptake structure larger than a lesion removed), and the smooth level they are relative to
        level = ndimage.gaussian_filter(xb, [NOISE_SMOOTH_MM / v for v in sp])
        noise_peak = sphere_mean(xb - level, sp)
        others = np.isin(lab_b, list(keep)) & ~region
        near_other = ndimage.binary_dilation(others, structure=ball_in) if others.any() else others
        shell = ndimage.binary_dilation(region, structure=ball_out) & \
            ~ndimage.binary_dilation(region, structure=ball_in) & ~near_other
        bg, lv = noise_peak[shell], level[shell]
        med = float(np.median(lv)) if lv.size else 0.0
        cov = (float(1.4826 * np.median(np.abs(bg - np.median(bg))) / med) if bg.size >= 20 and med > 0
               else float("nan"))
        se = cov * p_in
        com = [c + s.start for c, s in zip(ndimage.center_of_mass(region), box)]
        centre = input_pet.TransformContinuousIndexToPhysicalPoint([float(c) for c in reversed(com)])
        row = {"id": 0, "volume_ml": float(region.sum() * voxel_ml),
               "center_lps": [round(float(c), 2) for c in centre],
               "suv_max_in": float(xb[region].max()), "suv_max_out": float(yb[region].max()),
               "suv_peak_in": p_in, "suv_peak_out": p_out,
               "suv_mean_in": float(xb[region].mean()), "suv_mean_out": float(yb[region].mean()),
               "noise_se_pct": float(100.0 * cov) if cov == cov else float("nan")}
        for m in ("suv_max", "suv_peak", "suv_mean"):
            row[f"{m}_change_pct"] = _pct(row[f"{m}_out"], row[f"{m}_in"])
        expected = expected_change(calibration, row["volume_ml"])
        bound = _bound(calibration, fit, row["volume_ml"], CALIBRATION_CONFIDENCE)
        row["expected_change_pct"] = expected if np.isfinite(expected) else None     # JSON null, not NaN
        row["expected_change_bound_pct"] = bound if np.isfinite(bound) else None
        by_noise = bool(se == se and abs(p_out - p_in) > k * se)
        limit = bound if np.isfinite(bound) else expected      # without the calibration's lesions: the line
        by_size = bool(np.isfinite(limit) and row["suv_peak_change_pct"] < -tol_pct and limit < -tol_pct)
        row["flagged"] = by_noise or by_size
        row["flag_reason"] = REASON_NOISE if by_noise else REASON_SIZE if by_size else ""
        rows.append(row)
    rows.sort(key=lambda r: -r["suv_peak_in"])
    rows = rows[:max_lesions]
    for j, r in enumerate(rows, 1):
        r["id"] = j
    if calibration is None:
        rule = RULE.format(k=k) + RULE_UNCALIBRATED
    elif fit is not None:
        rule = RULE.format(k=k) + RULE_CALIBRATED.format(tol=tol_pct, n=fit["n"],
                                                         conf=100 * CALIBRATION_CONFIDENCE)
    else:
        rule = RULE.format(k=k) + RULE_CALIBRATED_LINE.format(tol=tol_pct, n=calibration.get("n_lesions", "?"))
    return {"threshold": thr, "rule": rule, "min_volume_ml": float(min_volume_ml),
            "n_hot_spots": len(rows), "n_flagged": sum(r["flagged"] for r in rows),
            "lesions": [{c: r[c] for c in COLUMNS} for r in rows]}


CSV_COLUMNS = [col for c in COLUMNS for col in ([f"center_{a}_mm" for a in "lps"] if c == "center_lps" else [c])]


def report_rows(report: dict) -> list[dict]:
    """The report's lesions as flat rows (CSV, columns :data:`CSV_COLUMNS`): the centre as three columns, numbers
    rounded."""
    out = []
    for r in report["lesions"]:
        row = {}
        for c in COLUMNS:
            if c == "center_lps":
                row.update({f"center_{a}_mm": v for a, v in zip("lps", r[c])})
            elif isinstance(r.get(c), float):
                row[c] = round(r[c], 4)
            else:
                row[c] = r.get(c)              # a column an older report does not have: empty
        out.append(row)
    return out


def liver_from_labels(label_image: sitk.Image, like: sitk.Image, min_voxels: int = 1) -> sitk.Image | None:
    """Liver mask on the grid of ``like`` from an organ label map (the liver value of the organ terminology), or
    None when fewer than ``min_voxels`` liver voxels fall on that grid."""
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import resample_like
    from PETWorkbenchLib.terminology import organ_specs
    value = next(o["value"] for o in organ_specs() if o["name"] == "liver")
    mask = sitk.Equal(resample_like(label_image, like, label=True), value)
    return mask if int(sitk.GetArrayViewFromImage(mask).sum()) >= min_voxels else None
