"""Benchmark of the segmentation family (LDOS): organ Dice / HD95 on held-out 5%-dose cases and inference time.

    python benchmarks/segmentation.py [--quick] [--manifest .cache/simdata/v1/manifest.csv] [--threads 2]

Evaluates the shipped CPU LDOS model and the same-budget segmentation-only baseline on the test split of the
simulated multi-centre set (input ``low_dose_drf20``, 5% dose), the segmentation-only model trained on full dose
on the full-dose images (paper's FDPET reference) and, when its denoiser is present, the Fake-FDPET baseline
(denoise, then segment with the full-dose model). Means are over the organs present in each case's reference
(missing organs are not scored). ``infer_s`` is the time of one whole-volume LDOS segmentation on the CPU.
``--quick`` uses at most 4 test cases. The last line is one ``key=value`` line:
dice_ldos dice_segonly dice_fullDose_segonly hd95_ldos hd95_segonly infer_s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SegmentationModule"))

MODELS = ROOT / "Resources" / "Models"
LDOS = MODELS / "segmentation-ldos-cpu.pt"
SEGONLY = MODELS / "segmentation-segonly-cpu.pt"
SEGONLY_FD = MODELS / "segmentation-segonly-fulldose-cpu.pt"
DENOISER = MODELS / "segmentation-denoiser-cpu.pt"


def _fmt(v):
    return "nan" if v is None else f"{v:.4f}"


def run(manifest, quick=False, threads=2, split="test", out=None):
    import torch
    torch.set_num_threads(threads)
    import SimpleITK as sitk
    from SegmentationModuleLib.cli import evaluate_manifest
    from SegmentationModuleLib.data import case_path, read_manifest, select
    from SegmentationModuleLib.infer import segment

    rows = select(read_manifest(manifest), split=split)
    if quick:
        rows = rows[:4]
    sub = Path(manifest).parent / f".bench_{split}_{len(rows)}.csv"
    import csv
    cols = [c for c in rows[0] if not c.startswith("_")]
    with open(sub, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for r in rows:
            w.writerow({c: r[c] for c in cols})
    results = {}
    plan = [("ldos", LDOS, "low_dose_drf20", None), ("segonly", SEGONLY, "low_dose_drf20", None),
            ("fullDose_segonly", SEGONLY_FD, "full_dose", None),
            ("fakeFDPET", SEGONLY_FD, "low_dose_drf20", DENOISER)]
    for name, model, key, den in plan:
        if not model.is_file() or (den is not None and not den.is_file()):
            print(f"{name}: model not present, skipped", flush=True)
            continue
        t = time.time()
        res = evaluate_manifest(str(model), str(sub), split=split, input_key=key,
                                denoiser=str(den) if den else None, device="cpu")
        results[name] = res
        m = res["mean"]
        print(f"{name}: dice={_fmt(m['dice'])} iou={_fmt(m['iou'])} hd95={_fmt(m['hd95'])} asd={_fmt(m['asd'])} "
              f"cases={len(res['cases'])} ({time.time() - t:.0f} s)", flush=True)
    sub.unlink()
    # per-organ table for the LDOS model
    if "ldos" in results:
        for n, o in results["ldos"]["organs"].items():
            if o.get("status") == "missing":
                print(f"  {n:16s} missing from every reference")
                continue
            so = results.get("segonly", {}).get("organs", {}).get(n, {})
            print(f"  {n:16s} dice ldos={_fmt(o.get('dice'))} segonly={_fmt(so.get('dice'))} "
                  f"hd95 ldos={_fmt(o.get('hd95'))} segonly={_fmt(so.get('hd95'))}")
    infer_s = None
    if LDOS.is_file():
        pet = sitk.ReadImage(str(case_path(rows[0], "low_dose_drf20")), sitk.sitkFloat32)
        t = time.time()
        segment(pet, str(LDOS), device="cpu", allow_empty=True)
        infer_s = time.time() - t
        print(f"one whole volume {pet.GetSize()} at {tuple(round(s, 2) for s in pet.GetSpacing())} mm: "
              f"{infer_s:.1f} s on CPU ({threads} threads)")
    if out:
        slim = {k: {kk: v[kk] for kk in ("mean", "organs", "cases", "seconds_per_case")} for k, v in results.items()}
        slim["infer_s"] = infer_s
        Path(out).write_text(json.dumps(slim, indent=1))

    def g(name, k):
        return results.get(name, {}).get("mean", {}).get(k)

    line = {"dice_ldos": g("ldos", "dice"), "dice_segonly": g("segonly", "dice"),
            "dice_fullDose_segonly": g("fullDose_segonly", "dice"), "hd95_ldos": g("ldos", "hd95"),
            "hd95_segonly": g("segonly", "hd95"), "infer_s": infer_s}
    print(" ".join(f"{k}={_fmt(v)}" for k, v in line.items()))
    return results, line


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(ROOT / ".cache" / "simdata" / "v1" / "manifest.csv"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="", help="write the full metrics (JSON) here")
    a = ap.parse_args()
    if not Path(a.manifest).is_file():
        sys.exit(f"manifest not found: {a.manifest} (run the data generator first)")
    run(a.manifest, a.quick, a.threads, a.split, a.out or None)


if __name__ == "__main__":
    main()
