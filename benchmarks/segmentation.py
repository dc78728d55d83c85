"""Benchmark of the segmentation family (LDOS): organ Dice / HD95 on held-out 5%-dose cases and inference time.

    python benchmarks/segmentation.py [--quick] [--manifest .cache/simdata/v1/manifest.csv] [--threads 2]

Evaluates the shipped CPU LDOS model and the same-budget segmentation-only baseline on the test split of the
simulated multi-centre set (input ``low_dose_drf20``, 5% dose), the segmentation-only model trained on full dose
on the full-dose images (paper's FDPET reference) and, when its denoiser is present, the Fake-FDPET baseline
(denoise, then segment with the full-dose model). Means are over the organs present in each case's reference
(missing organs are not scored). ``infer_s`` is the time of one whole-volume LDOS segmentation on the CPU.
Only whole-body cases are used (the brain-only centre has no trunk organs). ``--quick`` uses at most 4 test
cases, spread over the centres. Inference mirrors patches (nnU-Net's test-time augmentation) when a model's config
names mirror axes (the shipped ones do not); ``--no-tta`` never mirrors.
``--models`` restricts the evaluation to some of ldos, segonly, fullDose_segonly, fakeFDPET. The last line is one
``key=value`` line: dice_ldos dice_segonly dice_fullDose_segonly hd95_ldos hd95_segonly infer_s dice_paired_wins
hd95_paired_wins (held-out cases where LDOS beats segmentation-only in mean Dice / in mean HD95, "wins/total").
"""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "SegmentationModule"))

MODELS = ROOT / "Resources" / "Models"
CACHE = ROOT / ".cache" / "seg" / "bench"
LDOS = MODELS / "segmentation-ldos-cpu.pt"
SEGONLY = MODELS / "segmentation-segonly-cpu.pt"
SEGONLY_FD = MODELS / "segmentation-segonly-fulldose-cpu.pt"
DENOISER = MODELS / "segmentation-denoiser-cpu.pt"


def _region(row):
    """Body region of a case from the generator's case.json (brain-only centres are not organ-segmentation data)."""
    from SegmentationModuleLib.data import case_path
    info = case_path(row, "labels").parent / "case.json"
    if info.is_file():
        return json.loads(info.read_text()).get("profile", {}).get("region", "whole_body")
    return "whole_body"


def _fmt(v):
    return "nan" if v is None else v if isinstance(v, str) else f"{v:.4f}"


def paired_wins(a, b, key, higher_better=True):
    """"w/n": cases (matched by id) where result ``a``'s per-case mean ``key`` beats ``b``'s."""
    if not a or not b:
        return "nan"
    bm = {c["case_id"]: c["mean"].get(key) for c in b["per_case"]}
    pairs = [(c["mean"].get(key), bm.get(c["case_id"])) for c in a["per_case"]]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None and x == x and y == y]
    wins = sum((x > y) if higher_better else (x < y) for x, y in pairs)
    return f"{wins}/{len(pairs)}"


def run(manifest, quick=False, threads=2, split="test", out=None, tta=True, only=None):
    import torch
    torch.set_num_threads(threads)
    import SimpleITK as sitk
    from SegmentationModuleLib.evaluate import evaluate_manifest
    from SegmentationModuleLib.data import case_path, file_stamps, read_manifest, select
    from SegmentationModuleLib.infer import segment

    rows = [r for r in select(read_manifest(manifest), split=split) if _region(r) == "whole_body"]
    if not rows:
        sys.exit(f"no whole-body cases with split '{split}' in {manifest}")
    if quick:  # spread over centres
        by = {}
        for r in rows:
            by.setdefault(r.get("center"), []).append(r)
        rows = [r for i in range(4) for c in sorted(by) for r in by[c][i:i + 1]][:4]
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
        if only and name not in only:
            continue
        if not model.is_file() or (den is not None and not den.is_file()):
            print(f"{name}: model not present, skipped", flush=True)
            continue
        t = time.time()
        # results are cached per (model bytes, denoiser bytes, cases, input): re-running after adding a model
        # only evaluates the new one
        # (and per input/label file stamps, so a regenerated set is re-evaluated)
        stamps = [file_stamps(r, (key, "labels")) for r in rows]
        tag = hashlib.sha256(b"".join([model.read_bytes(), den.read_bytes() if den else b"",
                                       json.dumps([key, [r["case_id"] for r in rows], stamps, tta]).encode()])
                             ).hexdigest()[:16]
        cached = CACHE / f"{name}_{tag}.json"
        if cached.is_file():
            res = json.loads(cached.read_text())
            print(f"{name}: cached result {cached.name}")
        else:
            res = evaluate_manifest(str(model), str(sub), split=split, input_key=key,
                                    denoiser=str(den) if den else None, device="cpu", tta=None if tta else False)
            CACHE.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(res, default=float))
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
        segment(pet, str(LDOS), device="cpu", allow_empty=True, tta=None if tta else False)
        infer_s = time.time() - t
        print(f"one whole volume {pet.GetSize()} at {tuple(round(s, 2) for s in pet.GetSpacing())} mm: "
              f"{infer_s:.1f} s on CPU ({threads} threads)")
    if out:
        slim = {k: {kk: v[kk] for kk in ("mean", "organs", "cases", "seconds_per_case", "per_case")}
                for k, v in results.items()}
        slim["infer_s"] = infer_s
        Path(out).write_text(json.dumps(slim, indent=1))

    def g(name, k):
        return results.get(name, {}).get("mean", {}).get(k)

    line = {"dice_ldos": g("ldos", "dice"), "dice_segonly": g("segonly", "dice"),
            "dice_fullDose_segonly": g("fullDose_segonly", "dice"), "hd95_ldos": g("ldos", "hd95"),
            "hd95_segonly": g("segonly", "hd95"), "infer_s": infer_s,
            "dice_paired_wins": paired_wins(results.get("ldos"), results.get("segonly"), "dice"),
            "hd95_paired_wins": paired_wins(results.get("ldos"), results.get("segonly"), "hd95", False)}
    print(" ".join(f"{k}={_fmt(v)}" for k, v in line.items()))
    return results, line


TITLES = {
    "ldos": ("segmentation-ldos-cpu", LDOS, "LDOS organ segmentation of 5%-dose PET (CPU demo size)",
             "shared residual encoder + segmentation and denoising decoders, phi*L_g + L_s", "low_dose_drf20"),
    "segonly": ("segmentation-segonly-cpu", SEGONLY, "Segmentation-only baseline on 5%-dose PET (CPU demo size)",
                "same network without the denoising decoder, same data and budget as LDOS", "low_dose_drf20"),
    "fullDose_segonly": ("segmentation-segonly-fulldose-cpu", SEGONLY_FD,
                         "Segmentation-only reference on full-dose PET (CPU demo size)",
                         "same network without the denoising decoder, trained on full-dose PET", "full_dose"),
    "denoiser": ("segmentation-denoiser-cpu", DENOISER, "Denoiser of the Fake-FDPET baseline (CPU demo size)",
                 "encoder + denoising decoder only (L_g), first stage of Fake-FDPET", "low_dose_drf20"),
}


def write_models_d(results, infer_s, manifest, command, notes=None):
    """Registry entries (Resources/Models.json) for the weights present, with the metrics measured by this run."""
    from PETWorkbenchLib.models import load_checkpoint, upsert_entries
    entries = []
    for name, (mid, file, title, desc, key) in TITLES.items():
        if not file.is_file():
            continue
        ck = load_checkpoint(file)
        cfg, tr = ck["config"], ck.get("training", {})
        metrics = {"measured_on": f"test split of {Path(manifest).parent.name} simulated set ({key} input)",
                   "command": command}
        res = results.get(name) or (results.get("fakeFDPET") if name == "denoiser" else None)
        if res:
            if name == "denoiser":
                metrics["measured_as"] = "Fake-FDPET pipeline (this denoiser + segmentation-segonly-fulldose-cpu)"
            metrics.update({k: res["mean"][k] for k in ("dice", "iou", "hd95", "asd", "n_scored")})
            metrics["cases"] = res["cases"]
            metrics["per_organ_dice"] = {n: o.get("dice") for n, o in res["organs"].items()
                                         if o.get("status") != "missing"}
            metrics["organs_missing_from_reference"] = [n for n, o in res["organs"].items()
                                                        if o.get("status") == "missing"]
        if name == "ldos" and infer_s is not None:
            metrics["infer_s_one_volume_cpu"] = round(infer_s, 2)
        entries.append({
            "id": mid, "family": "segmentation",
            "method": "LDOS (Ye et al., MICCAI 2025, arXiv 2503.03786)" if name in ("ldos", "denoiser") else
                      "LDOS paper baseline (Ye et al., MICCAI 2025)",
            "title": title, "version": "1.0", "config": cfg,
            "inputs": [{"modality": "PT", "units": "SUV", "spacing_mm": cfg["spacing"],
                        "dose": "5% (DRF 20)" if key == "low_dose_drf20" else "full dose"}],
            "units": "SUV", "url": f"bundled:Models/{file.name}",
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "license": "Apache-2.0",
            "training": {"description": desc, "data": f"train split of the simulated multi-centre pseudo-PET set "
                         f"({tr.get('n_cases')} cases, input {cfg.get('input_key')}, target {cfg.get('target_key')})",
                         "iterations": tr.get("iterations"), "total_iterations": tr.get("total_iterations"),
                         "stopped": tr.get("stopped"), "seconds": tr.get("seconds_total"),
                         "hardware": f"CPU, {tr.get('torch_threads')} thread(s)",
                         "command": f"petworkbench train segmentation --config ldos_cpu_demo --task {cfg['task']} "
                                    f"--input-key {cfg.get('input_key')}"},
            "metrics": metrics,
        })
        if notes and notes.get(name):
            entries[-1]["training"]["stages"] = notes[name]
    path = upsert_entries(entries)
    print(f"updated {len(entries)} entries in {path.relative_to(ROOT)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=None, help="a simulated set's manifest.csv (default: the standard set, "
                    "generated into .cache/simdata/<key> when missing)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="", help="write the full metrics (JSON) here")
    ap.add_argument("--no-tta", action="store_true", help="without mirror test-time augmentation")
    ap.add_argument("--models", default="", help="comma-separated subset of ldos,segonly,fullDose_segonly,fakeFDPET")
    ap.add_argument("--models-dir", default="", help="take the .pt files from here instead of Resources/Models")
    ap.add_argument("--write-models-d", action="store_true",
                    help="update the segmentation entries of Resources/Models.json with the metrics of this run")
    ap.add_argument("--training-note", action="append", default=[], metavar="NAME=TEXT",
                    help="how a model (ldos, segonly, fullDose_segonly, denoiser) was trained, for Models.json")
    a = ap.parse_args()
    if a.models_dir:
        global LDOS, SEGONLY, SEGONLY_FD, DENOISER
        d = Path(a.models_dir)
        LDOS, SEGONLY, SEGONLY_FD, DENOISER = (d / f.name for f in (LDOS, SEGONLY, SEGONLY_FD, DENOISER))
        for k, v in list(TITLES.items()):
            TITLES[k] = v[:1] + (d / v[1].name,) + v[2:]
    from common import standard_manifest
    a.manifest = standard_manifest(a.manifest)
    results, line = run(a.manifest, a.quick, a.threads, a.split, a.out or None, tta=not a.no_tta,
                        only=[m for m in a.models.split(",") if m] or None)
    if a.write_models_d:
        cmd = "python benchmarks/segmentation.py" + (" --quick" if a.quick else "") + f" --split {a.split}"
        notes = dict(n.split("=", 1) for n in a.training_note)
        write_models_d(results, line["infer_s"], a.manifest, cmd, notes)
        print(" ".join(f"{k}={_fmt(v)}" for k, v in line.items()))


if __name__ == "__main__":
    main()
