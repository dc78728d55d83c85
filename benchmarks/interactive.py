#!/usr/bin/env python
"""Interactive lesion segmentation benchmark: PE-MED against the click-seeded thresholds clinicians use.

    python benchmarks/interactive.py [--quick] [--manifest .cache/simdata/<key>/manifest.csv] [--model FILE]
                                     [--threads 2] [--max-clicks 20]

Data: the held-out (test split) patients of the standard simulated PET set (real CT anatomy, simulated PET with
lesions of known extent; no real patient PET exists here), every whole-body case with lesions, at each dose level
the manifest holds: full dose, the centre's low dose and 5 % dose (``low_dose_drf20``). Each lesion of the
``lesions`` map is one task; the reference is its known extent.

Clicks are simulated as in PE-MED's evaluation (RITM protocol): the first click at the lesion centre (the voxel
farthest from its boundary), every later one at the voxel farthest from the boundary of the larger error region
(missed lesion -> positive click, false region -> negative click; 3D distances in mm). The same clicks policy
drives every method: PE-MED (``lesion.LesionSession``, the shipped model or ``--model``) and the thresholds SUV 2.5,
41 % and 50 % of SUVmax and PERCIST's liver threshold (liver from the case's organ labels), each restricted to the
connected region at the click.

Metrics per method: mean Dice after 1, 3 and 5 clicks; NoC@85 / NoC@90 (clicks until Dice >= 0.85 / 0.90, capped
at ``--max-clicks``, 20; a task that never gets there counts as the cap); MTV error |MTV - MTV_true| / MTV_true
and SUVmean error |SUVmean - SUVmean_true| / SUVmean_true (SUVmean_true: the same image in the true lesion mask)
after 3 and 5 clicks (means; the median MTV error after 3 clicks is printed too: a threshold that leaks into an
organ makes a few huge errors); time per click. ``--quick``: at most 6 test patients and 10 clicks.

The last line is ``key=value``: dice1_pemed dice3_pemed dice5_pemed dice_41pct dice_best_threshold noc85_pemed
noc90_pemed mtv_err_pemed mtv_err_41pct click_ms, where dice_41pct, dice_best_threshold and the MTV errors are
after 3 clicks (the issue's comparison point), the best threshold is the one with the highest Dice after 3 clicks
in this run, and click_ms is PE-MED's mean time per click (including the slice propagation).
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SegmentationModule"))
sys.path.insert(0, str(ROOT / "benchmarks"))

DOSES = ("full_dose", "low_dose", "low_dose_drf20")


def dice(a, b):
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * float((a & b).sum()) / float(s)


def run_task(session_factory, gt, spacing, max_clicks):
    """Simulated clicks on one lesion; returns per-click Dice, masks after 3 and 5 clicks, click seconds."""
    from SegmentationModuleLib.clicks import deepest_point, next_click

    from PETWorkbenchLib.errors import InputError
    s = session_factory()
    dices, seconds, masks = [], [], {}
    z, y, x = deepest_point(gt, spacing)
    click = ((z, y, x), True)
    for n in range(1, max_clicks + 1):
        (cz, cy, cx), pos = click
        try:
            s.add_click((cx, cy, cz), pos)
            seconds.append(s.last_seconds)
        except InputError:
            pass  # e.g. no voxel above a threshold near the click: the mask stays as it was
        d = dice(s.mask, gt)
        dices.append(d)
        if n in (1, 3, 5):
            masks[n] = s.mask.copy()
        nc = next_click(s.mask, gt, spacing)
        if nc is None:
            dices += [d] * (max_clicks - n)
            for k in (3, 5):
                masks.setdefault(k, s.mask.copy())
            break
        click = nc
    return dices, masks, seconds


def noc(dices, thr, cap):
    for i, d in enumerate(dices):
        if d >= thr:
            return i + 1
    return cap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--model", default=None, help="PE-MED model file or id (default: the registered CPU model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-clicks", type=int, default=None)
    ap.add_argument("--patients", type=int, default=None, help="use at most this many held-out patients")
    ap.add_argument("--out", default=str(ROOT / ".cache" / "bench" / "interactive"))
    args = ap.parse_args()
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(args.threads)
    from common import standard_manifest
    from SegmentationModuleLib.data import read_manifest
    from SegmentationModuleLib.lesion import DEFAULT_MODEL, THRESHOLD_METHODS, LesionSession, PEMEDPredictor

    from PETWorkbenchLib.terminology import organ_specs
    manifest = Path(standard_manifest(args.manifest))
    max_clicks = args.max_clicks or (10 if args.quick else 20)
    rows = [r for r in read_manifest(manifest) if r["split"] == "test" and int(r.get("n_lesions") or 0) > 0]
    patients = sorted({r["patient_id"] for r in rows})
    if args.quick or args.patients:
        patients = patients[:args.patients or 6]
    rows = [r for r in rows if r["patient_id"] in patients]
    predictor = PEMEDPredictor(args.model or DEFAULT_MODEL)
    liver_value = next(o["value"] for o in organ_specs() if o["name"] == "liver")
    methods = ("pemed",) + THRESHOLD_METHODS
    results = {m: [] for m in methods}
    t0 = time.time()
    for r in rows:
        base = manifest.parent
        les = sitk.GetArrayFromImage(sitk.ReadImage(str(base / r["lesions"])))
        liver = sitk.GetArrayFromImage(sitk.ReadImage(str(base / r["labels"]))) == liver_value
        for dose in DOSES:
            if not r.get(dose):
                continue
            img = sitk.ReadImage(str(base / r[dose]), sitk.sitkFloat32)
            suv = sitk.GetArrayFromImage(img)
            spacing = img.GetSpacing()[::-1]
            for v in np.unique(les)[1:]:
                gt = les == v
                true_mtv = float(gt.sum())
                true_mean = float(suv[gt].mean())
                for m in methods:
                    def factory(m=m):
                        return LesionSession(img, m, model=predictor, liver_mask=liver)
                    dices, masks, secs = run_task(factory, gt, spacing, max_clicks)
                    res = {"case": r["case_id"], "dose": dose, "lesion": int(v), "voxels": int(true_mtv),
                           "dice": dices, "seconds": secs}
                    for k in (3, 5):
                        mk = masks[k]
                        res[f"mtv_err_{k}"] = abs(float(mk.sum()) - true_mtv) / true_mtv
                        res[f"suvmean_err_{k}"] = (abs(float(suv[mk].mean()) - true_mean) / true_mean
                                                   if mk.any() else 1.0)
                    results[m].append(res)
        print(f"{r['case_id']}: {sum(len(v) for v in results.values())} tasks, {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)

    def summary(m):
        rs = results[m]
        d = np.array([x["dice"] for x in rs])
        secs = [s for x in rs for s in x["seconds"]]
        return {"tasks": len(rs), "dice1": d[:, 0].mean(), "dice3": d[:, 2].mean(), "dice5": d[:, 4].mean(),
                f"dice{max_clicks}": d[:, -1].mean(),
                "noc85": float(np.mean([noc(x, 0.85, max_clicks) for x in d])),
                "noc90": float(np.mean([noc(x, 0.90, max_clicks) for x in d])),
                "mtv_err3": float(np.mean([x["mtv_err_3"] for x in rs])),
                "mtv_err5": float(np.mean([x["mtv_err_5"] for x in rs])),
                "mtv_err3_median": float(np.median([x["mtv_err_3"] for x in rs])),
                "suvmean_err3": float(np.mean([x["suvmean_err_3"] for x in rs])),
                "suvmean_err5": float(np.mean([x["suvmean_err_5"] for x in rs])),
                "click_ms": 1000 * float(np.mean(secs)) if secs else float("nan")}
    table = {m: summary(m) for m in methods}
    per_dose = {m: {dose: float(np.mean([x["dice"][2] for x in results[m] if x["dose"] == dose]))
                    for dose in DOSES} for m in methods}
    cols = list(table["pemed"])
    print(f"\n{len(rows)} held-out cases x doses, {table['pemed']['tasks']} lesion tasks, max {max_clicks} clicks "
          f"(manifest {manifest.parent.name})")
    print("method    " + " ".join(f"{c:>13}" for c in cols))
    for m in methods:
        print(f"{m:9} " + " ".join(f"{table[m][c]:13.3f}" for c in cols))
    print("Dice after 3 clicks per dose: " + "; ".join(
        f"{m}: " + ", ".join(f"{d} {v:.3f}" for d, v in per_dose[m].items()) for m in methods))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "interactive.json").write_text(json.dumps({"summary": table, "per_dose_dice3": per_dose,
                                                      "tasks": results}, default=float))
    with open(out / "interactive.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method"] + cols)
        for m in methods:
            w.writerow([m] + [table[m][c] for c in cols])
    best = max(THRESHOLD_METHODS, key=lambda m: table[m]["dice3"])
    print(f"best threshold after 3 clicks: {best}")
    keys = dict(dice1_pemed=table["pemed"]["dice1"], dice3_pemed=table["pemed"]["dice3"],
                dice5_pemed=table["pemed"]["dice5"], dice_41pct=table["41pct"]["dice3"],
                dice_best_threshold=table[best]["dice3"], noc85_pemed=table["pemed"]["noc85"],
                noc90_pemed=table["pemed"]["noc90"], mtv_err_pemed=table["pemed"]["mtv_err3"],
                mtv_err_41pct=table["41pct"]["mtv_err3"], click_ms=table["pemed"]["click_ms"])
    print(" ".join(f"{k}={v:.4f}" for k, v in keys.items()))


if __name__ == "__main__":
    main()
