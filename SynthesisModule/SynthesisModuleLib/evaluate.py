"""Evaluation on held-out cases of a multi-centre manifest: per-centre tables, routing report, interference."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from PETWorkbenchLib.device import torch_device
from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.imageio import resample_like
from PETWorkbenchLib.progress import Reporter

from . import BLEND_SIGMA, DEFAULT_OVERLAP, DEFAULT_PRECISION
from .data import normalise, read_manifest, select, to_2mm_array
from .infer import EMPTY_PATCH_SUV, load_model, predict_array, routing_summary
from .metrics import lesion_suv_errors, psnr, routing_plot, ssim, suv_bias_from_errors

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch

    from .model import Generator

# b_mean/b_max: the paper's lesion SUVmean/SUVmax bias (relative, absolute); e_mean: signed relative SUVmean error
# (diagnostic: negative = lesion uptake under-stated).
METRICS = ("psnr", "ssim", "b_mean", "b_max", "e_mean")


def load_case_2mm(row: dict, references: dict[str, Callable[[dict], sitk.Image]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """(low SUV, full SUV, lesion mask or None, {reference name: SUV}) on the full-dose image's 2 mm grid.

    ``references``: name -> callable(row) -> SUV image of the case (e.g. its noise-free reconstruction)."""
    full, full_img = to_2mm_array(sitk.ReadImage(row["full_dose"]))

    def on_grid(img):
        img = sitk.Cast(img, sitk.sitkFloat32)
        return np.clip(sitk.GetArrayFromImage(resample_like(img, full_img)).astype(np.float32), 0, None)

    low = on_grid(sitk.ReadImage(row["low_dose"]))
    les = None
    if row.get("lesions"):
        li = sitk.ReadImage(row["lesions"])
        les = sitk.GetArrayFromImage(resample_like(li, full_img, label=True))
    refs = {name: on_grid(fn(row)) for name, fn in (references or {}).items()}
    return low, np.clip(full, 0, None), les, refs


def case_metrics(est: np.ndarray, full: np.ndarray, lesions: np.ndarray | None) -> dict[str, float]:
    out = {"psnr": psnr(est, full), "ssim": ssim(est, full)}
    if lesions is not None and np.any(lesions > 0):
        errors = lesion_suv_errors(est, full, lesions)
        out["b_mean"], out["b_max"], out["n_lesions"] = suv_bias_from_errors(errors)
        out["e_mean"] = float(np.mean([e[0] for e in errors])) if errors else float("nan")
    else:
        out.update(b_mean=float("nan"), b_max=float("nan"), e_mean=float("nan"), n_lesions=0)
    return out


def _nanmean(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else float("nan")


def tables(rows: list[dict]) -> tuple[dict, dict]:
    """method -> center -> metric -> mean; plus method -> {'known': avg, 'unknown': avg} over centre means."""
    per = {}
    for r in rows:
        per.setdefault(r["method"], {}).setdefault(r["center"], []).append(r)
    table, avg = {}, {}
    for meth, centers in per.items():
        table[meth] = {}
        for c, rs in sorted(centers.items()):
            table[meth][c] = {m: round(_nanmean([r[m] for r in rs]), 5) for m in METRICS}
            table[meth][c]["n"] = len(rs)
            table[meth][c]["known"] = rs[0]["known"]
        avg[meth] = {}
        for kind, flag in (("known", True), ("unknown", False)):
            cs = [v for v in table[meth].values() if v["known"] == flag]
            if cs:
                avg[meth][kind] = {m: round(_nanmean([v[m] for v in cs]), 5) for m in METRICS}
    return table, avg


def markdown_table(table: dict, avg: dict) -> str:
    lines = ["| method | centre | known | n | PSNR | SSIM | B_mean | B_max | SUVmean error (signed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for meth, cs in table.items():
        for c, v in cs.items():
            lines.append(f"| {meth} | {c} | {'yes' if v['known'] else 'no'} | {v['n']} | {v['psnr']:.2f} | "
                         f"{v['ssim']:.4f} | {v['b_mean']:.4f} | {v['b_max']:.4f} | {v['e_mean']:+.4f} |")
        for kind, v in avg.get(meth, {}).items():
            lines.append(f"| {meth} | **avg {kind}** | | | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['b_mean']:.4f} | "
                         f"{v['b_max']:.4f} | {v['e_mean']:+.4f} |")
    return "\n".join(lines) + "\n"


def evaluate(models: dict[str, str | Path | dict | Generator], manifest: str | Path,
             out_dir: str | Path | None = None, split: str | Sequence[str] = "test",
             patch: int | Sequence[int] | None = None, overlap: float = 0.5, sw_batch_size: int = 2,
             device: str | torch.device = "auto", max_cases_per_center: int | None = None,
             include_unknown: bool = True, tracers: str | Sequence[str] | None = None,
             progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
             references: dict[str, Callable[[dict], sitk.Image]] | None = None) -> dict:
    """Evaluate ``models`` (name -> weights path / checkpoint dict / Generator) and the low-dose input.

    ``references``: optional name -> callable(row) -> SUV image, evaluated like the input (e.g. the noise-free
    reconstruction of a simulated case: the best a denoiser could recover).

    Known centres: rows with ``split`` (held-out patients). Unknown centres: all their rows (test only).
    Writes per_case.csv, results.json, table.md and routing_<name>.png into ``out_dir`` when given.
    """
    rep = Reporter(progress, cancel)
    all_rows = read_manifest(manifest)
    rows = select(all_rows, split=split, known=True, tracers=tracers)
    if include_unknown:
        rows += select(all_rows, known=False, tracers=tracers)
    if max_cases_per_center:
        kept, count = [], {}
        for r in rows:
            if count.get(r["center"], 0) < int(max_cases_per_center):
                kept.append(r)
                count[r["center"]] = count.get(r["center"], 0) + 1
        rows = kept
    if not rows:
        raise InputError(f"manifest {manifest} has no evaluation rows (split {split!r})")
    clash = set(references or {}) & (set(models) | {"low"})
    if clash:
        raise InputError(f"reference names {sorted(clash)} are already used by the input or a model")
    dev = torch_device(device)
    nets = {name: load_model(m, dev) for name, m in models.items()}
    results, logs = [], {name: {} for name in nets}
    for i, row in enumerate(rows):
        r0 = rep.sub(i / len(rows), (i + 1) / len(rows))
        r0(0.0, f"case {row['case_id']} ({row['center']})")
        low, full, les, refs = load_case_2mm(row, references)
        base = {"case_id": row["case_id"], "center": row["center"], "known": row["known"]}
        results.append({**base, "method": "low", **case_metrics(low, full, les)})
        for name, arr in refs.items():
            results.append({**base, "method": name, **case_metrics(arr, full, les)})
        for k, (name, (net, cfg)) in enumerate(nets.items()):
            scale = float(cfg["train"]["suv_scale"])
            p = patch or cfg["train"]["patch_size"]
            est, log = predict_array(net, normalise(low, scale), p, overlap, sw_batch_size, dev,
                                     progress=r0.sub(k / len(nets), (k + 1) / len(nets)),
                                     empty_level=EMPTY_PATCH_SUV / scale,  # air skipped as in synthesize()
                                     precision="float32", sigma_scale=0.125)
            # float32 and MONAI's blending width on every machine, as the recorded metrics were measured (with the
            # evaluation's overlap, 0.5 by default); synthesize()'s wider blending, optional bfloat16: METHOD.md
            est = np.clip(est * scale, 0.0, None)
            results.append({**base, "method": name, **case_metrics(est, full, les)})
            if log:
                logs[name].setdefault(row["center"], []).extend(log)
    table, avg = tables(results)
    summary = {"n_cases": len(rows), "table": table, "average": avg, "routing": {}}
    for name, (net, _) in nets.items():
        if net.num_banks and logs[name]:
            summary["routing"][name] = {c: routing_summary(lg, net.num_banks) for c, lg in logs[name].items()}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        keys = ["case_id", "center", "known", "method", "psnr", "ssim", "b_mean", "b_max", "e_mean", "n_lesions"]
        with open(out / "per_case.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, keys)
            w.writeheader()
            for r in results:
                w.writerow({k: r[k] for k in keys})
        (out / "table.md").write_text(markdown_table(table, avg))
        for name, summ in summary["routing"].items():
            summary.setdefault("routing_png", {})[name] = routing_plot(
                summ, out / f"routing_{name}.png", title=f"{name}: top-1 expert per layer per centre")
        (out / "results.json").write_text(json.dumps(summary, indent=1))
    rep(1.0, "evaluation done")
    return summary


# volume bins (ml) of the lesion calibration's descriptive table, from the report's smallest hot spot (0.1 ml)
CALIBRATION_BINS_ML = (0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


def calibration_from_hot_spots(found: Sequence[tuple[float, float, str]],
                               bins_ml: Sequence[float] = CALIBRATION_BINS_ML, min_per_bin: int = 3) -> dict:
    """Lesion calibration from (volume ml, SUVpeak change %, case id) of true lesions: the least-squares line
    ``change = a + b ln(volume)`` over all of them (what the report uses, within the measured volume range), its
    residual SD, and a descriptive table by volume bin (bins with at least ``min_per_bin`` lesions)."""
    found = [f for f in found if np.isfinite(f[0]) and f[0] > 0 and np.isfinite(f[1])]
    if len(found) < 5:
        raise InputError(f"a lesion calibration needs at least 5 lesions found as hot spots, got {len(found)}")
    from .lesions import fit_log_line
    vol = np.array([f[0] for f in found], dtype=np.float64)
    ch = np.array([f[1] for f in found], dtype=np.float64)
    fit = fit_log_line(vol, ch)
    edges = list(bins_ml) + [math.inf]
    table = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (vol >= lo) & (vol < hi)
        if sel.sum() >= min_per_bin:
            table.append({"volume_ml": [lo, hi if math.isfinite(hi) else None],
                          "median_volume_ml": round(float(np.median(vol[sel])), 3),
                          "suv_peak_change_pct_mean": round(float(ch[sel].mean()), 2),
                          "suv_peak_change_pct_sd": round(float(ch[sel].std(ddof=1)), 2), "n": int(sel.sum())})
    return {"fit": "suv_peak_change_pct = a + b ln(volume_ml)", "a": round(fit["a"], 3), "b": round(fit["b"], 3),
            "volume_range_ml": [round(float(vol.min()), 3), round(float(vol.max()), 3)],
            "residual_sd_pct": round(fit["s"], 2),
            "n_lesions": len(found), "bins": table,
            "hot_spots": [{"volume_ml": round(float(v), 3), "suv_peak_change_pct": round(float(c), 2), "case_id": k}
                          for v, c, k in found]}


def lesion_calibration(model: str | Path | dict | Generator, manifest: str | Path, split: str = "test",
                       device: str | torch.device = "cpu", progress: Callable[[float, str], None] | None = None,
                       cancel: Callable[[], bool] | None = None) -> dict:
    """What ``model`` does to lesions, by size: every case of ``split`` with lesions (known and unknown centres)
    is synthesized as :func:`~SynthesisModuleLib.infer.synthesize` runs it and given the lesion-change report
    (PERCIST's liver threshold from the case's labels, else the fixed one); the hot spots whose centre lies in a
    true lesion give :func:`calibration_from_hot_spots`. The result is what
    :func:`~SynthesisModuleLib.lesions.lesion_change_report` takes as ``calibration`` (stored in the model's
    Models.json entry as ``lesion_calibration``, with the SHA-256 of the registered weights it was measured on).
    The volume axis is the hot-spot volume above the threshold, so it depends on the threshold rule (recorded)."""
    from PETWorkbenchLib.manifest import case_path

    from .infer import synthesize
    from .lesions import lesion_change_report, liver_from_labels
    rep = Reporter(progress, cancel)
    rows = [r for r in select(read_manifest(manifest), split=split)
            if r.get("lesions") and int(r.get("n_lesions") or 1) > 0]
    if not rows:
        raise InputError(f"manifest {manifest} has no cases with lesions in split {split!r}")
    found = []
    for i, row in enumerate(rows):
        sub = rep.sub(i / len(rows), (i + 1) / len(rows))
        sub(0.0, f"case {row['case_id']}")
        low = sitk.ReadImage(str(case_path(row, "low_dose")), sitk.sitkFloat32)
        les = sitk.ReadImage(str(case_path(row, "lesions")))
        liver = (liver_from_labels(sitk.ReadImage(str(case_path(row, "labels"))), low, min_voxels=10)
                 if row.get("labels") else None)
        syn, _ = synthesize(low, model, device=device, progress=sub.sub(0.0, 0.9))
        report = lesion_change_report(low, syn, liver_mask=liver)
        lab = sitk.GetArrayViewFromImage(resample_like(les, low, label=True))
        for r in report["lesions"]:
            idx = low.TransformPhysicalPointToIndex([float(v) for v in r["center_lps"]])
            if all(0 <= k < n for k, n in zip(idx, low.GetSize())) and lab[idx[2], idx[1], idx[0]] > 0:
                found.append((r["volume_ml"], r["suv_peak_change_pct"], row["case_id"]))
    rep(1.0, "calibration done")
    from PETWorkbenchLib.models import registered_entry
    entry = registered_entry(model)
    return {**calibration_from_hot_spots(found), "n_cases": len(rows), "split": split,
            "weights_sha256": entry.sha256 if entry is not None else None,
            "threshold": "PERCIST liver threshold from the case's labels (else the fixed 2.5 SUV); hot-spot "
                         "volume above it",
            "synthesis": f"synthesize() defaults: overlap {DEFAULT_OVERLAP}, Gaussian blending sigma {BLEND_SIGMA} x "
                         f"patch, {DEFAULT_PRECISION}, the training patch, windows over the body's bounding box, air "
                         f"patches skipped"}
