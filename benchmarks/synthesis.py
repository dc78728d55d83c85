"""Benchmark of the synthesis family (DRMC): image quality on the simulated multi-centre set and sparse execution.

    python benchmarks/synthesis.py [--quick] [--manifest .cache/simdata/v1/manifest.csv]

Evaluates the shipped CPU DRMC and the same-budget baseline on held-out patients of the known centres and on the
unknown centres (2 mm grid, PSNR / SSIM / lesion SUVmean, SUVmax bias), then times the full paper configuration
(C=64, M=3, N=5) on one 64^3 patch computing all experts (dense) vs skipping zero-weight experts (sparse).
``--quick`` evaluates 1 case per centre with overlap 0.25 (``--max-cases`` to change). ``--floor`` also evaluates
each case's noise-free reconstruction (the case simulated again from its case.json with expected instead of
Poisson counts): what an ideal denoiser could at best recover, as a reference row ``noise_free``.
The last line is one ``key=value`` line.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "SynthesisModule", ROOT / "ReconstructionModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def dense_vs_sparse(repeats=2, seed=0):
    import torch

    from SynthesisModuleLib.model import build_model, count_parameters
    from SynthesisModuleLib.train import load_config
    torch.manual_seed(seed)
    net = build_model(load_config("drmc_paper")["model"]).eval()
    net.fused = False      # zero-weight experts skipped, the others one by one: sparse execution against dense
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(seed))
    times = {}
    outs = {}
    with torch.inference_mode():
        for mode in (False, True, False, True)[: 2 * repeats]:
            net.sparse = mode
            net.routing_log = []
            t = time.perf_counter()
            y = net(x)
            dt = time.perf_counter() - t
            times.setdefault(mode, []).append(dt)
            outs[mode] = y
            active = float(torch.cat(net.routing_log).ne(0).float().mean())
    net.routing_log = None
    maxdiff = float((outs[False] - outs[True]).abs().max())
    return {"dense_s": min(times[False]), "sparse_s": min(times[True]), "maxdiff": maxdiff,
            "active_fraction": active, "params_full": count_parameters(net)}


def noise_free_reference():
    """row -> noise-free reconstruction of a simulated case (reproduce_case; the simulator caches the anatomies)."""
    from ReconstructionModuleLib.simulate import reproduce_case

    def reference(row):
        return reproduce_case(Path(row["full_dose"]).parent, noiseless=True)["images"]["full_dose"]
    return reference


def centres_per_step(config, known=4):
    """Centres whose gradients every optimiser step of a training config averaged (None in the config = all
    known centres)."""
    n = (config.get("train") or {}).get("centers_per_step")
    return known if n in (None, 0) else int(n)


def shipped_centres_per_step(model_id="synthesis-drmc-cpu"):
    """centres_per_step of the shipped model's training record in Resources/Models.json (nan when not recorded)."""
    for e in json.loads((ROOT / "Resources" / "Models.json").read_text())["models"]:
        if e.get("id") == model_id:
            return (e.get("training") or {}).get("centres_per_step", float("nan"))
    return float("nan")


def write_models(ev, a, command):
    """Registry entries (Resources/Models.json) of the two shipped models with the metrics measured by this run."""
    import csv
    import hashlib

    from PETWorkbenchLib.models import load_checkpoint, upsert_entries
    keys = ("psnr", "ssim", "b_mean", "b_max", "e_mean", "n")
    entries = []
    for name, mid, file, title, method in (
            ("drmc", "synthesis-drmc-cpu", Path(a.drmc),
             "DRMC low-dose PET synthesis (CPU demo, simulated 4-centre set)", "DRMC (Yang et al., MICCAI 2023)"),
            ("baseline", "synthesis-baseline-cpu", Path(a.baseline),
             "Generalist Transformer baseline for DRMC (same budget, simulated 4-centre set)",
             "Baseline Transformer of DRMC (Yang et al., MICCAI 2023), 3N base blocks")):
        ck = load_checkpoint(file)
        meta = ck.get("meta", {})
        log_path = Path(a.train_dir) / a.run_name.format(name=name) / "train_log_rank0.csv"
        log = list(csv.DictReader(open(log_path))) if log_path.is_file() else []
        last = log[-5:]
        training = {
            "data": "PETWorkbench simulated multi-centre set v1 "
                    "(ReconstructionModuleLib.simulate.generate_standard_set, seed 0): FDG training patients of the "
                    "known centres C1-C4 (6 each), low-dose = centre DRF (12, 4, 10, 10) OSEM reconstruction, "
                    "target = full-dose reconstruction; SUV; 2 mm isotropic",
            "steps": int(meta.get("step", 0)), "time_s": round(float(meta.get("elapsed_s", 0.0)), 1),
            "hardware": "1 CPU thread (shared 2-core machine)",
            "command": f"petworkbench train synthesis --config {name}_cpu --manifest .cache/simdata/v1/manifest.csv "
                       f"--out .cache/synthesis/{name}_cpu",
            "config_file": f"SynthesisModule/SynthesisModuleLib/configs/{name}_cpu.json",
            "centres_per_step": centres_per_step(ck["config"])}
        if last:
            training["final_loss_mean_last50"] = round(sum(float(r["loss"]) for r in last) / len(last), 6)
            training["identity_loss_mean_last50"] = round(sum(float(r["loss_identity"]) for r in last) / len(last), 6)
        if a.training_note:
            training["stages"] = a.training_note
        entries.append({
            "id": mid, "family": "synthesis", "method": method, "title": title, "version": "1.1",
            "config": ck["config"],
            "inputs": [{"modality": "PT", "units": "SUV", "description": "low-dose PET, any grid; resampled to 2 mm "
                        "internally", "spacing_mm": [2.0, 2.0, 2.0]}],
            "units": "SUV", "url": f"bundled:Models/{file.name}",
            "sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "license": "Apache-2.0",
            "training": training,
            "metrics": {
                "evaluated_on": "held-out FDG patients (split test) of the known centres C1-C4 and the unknown "
                                f"centres C5 (brain, no lesions) and C6, {ev['n_cases']} cases; 2 mm grid; PSNR with "
                                f"R = max(full dose); B = relative |bias| of lesion SUVmean/SUVmax; "
                                f"e_mean = signed relative lesion SUVmean error (negative: uptake under-stated)",
                "command": command,
                "per_center": {c: {k: v[k] for k in keys} for c, v in ev["table"][name].items()},
                "average": ev["average"][name],
                "low_dose_input_per_center": {c: {k: v[k] for k in keys} for c, v in ev["table"]["low"].items()},
                "low_dose_input_average": ev["average"]["low"]},
        })
        if "noise_free" in ev["table"]:
            entries[-1]["metrics"]["noise_free_reconstruction_per_center"] = {
                c: {k: v[k] for k in keys} for c, v in ev["table"]["noise_free"].items()}
    path = upsert_entries(entries)
    print(f"updated {len(entries)} entries in {path.relative_to(ROOT)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--manifest", default=None, help="a simulated set's manifest.csv (default: the standard set, "
                    "generated into .cache/simdata/<key> when missing)")
    ap.add_argument("--drmc", default=str(ROOT / "Resources" / "Models" / "synthesis-drmc-cpu.pt"))
    ap.add_argument("--baseline", default=str(ROOT / "Resources" / "Models" / "synthesis-baseline-cpu.pt"))
    ap.add_argument("--out", default=str(ROOT / ".cache" / "synthesis" / "benchmark"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-cases", type=int, default=None, help="at most this many cases per centre")
    ap.add_argument("--write-models", action="store_true",
                    help="update the synthesis entries of Resources/Models.json with the metrics of this run")
    ap.add_argument("--train-dir", default=str(ROOT / ".cache" / "synthesis"), help="training folders (logs)")
    ap.add_argument("--run-name", default="{name}_cpu", help="training folder of each model in --train-dir")
    ap.add_argument("--training-note", default="", help="how the shipped weights were trained (Models.json)")
    ap.add_argument("--floor", action="store_true",
                    help="also evaluate the noise-free reconstruction of every case (simulated again, ~10 s a case)")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from SynthesisModuleLib.evaluate import evaluate

    from common import standard_manifest
    a.manifest = standard_manifest(a.manifest)
    t0 = time.time()
    ev = evaluate({"drmc": a.drmc, "baseline": a.baseline}, a.manifest, out_dir=a.out, device="cpu",
                  sw_batch_size=4, overlap=0.25 if a.quick else 0.5,
                  max_cases_per_center=a.max_cases or (1 if a.quick else None), tracers=["FDG"],
                  references={"noise_free": noise_free_reference()} if a.floor else None)
    print((Path(a.out) / "table.md").read_text())
    print(f"evaluation: {ev['n_cases']} cases, {time.time() - t0:.0f} s", flush=True)
    avg = ev["average"]
    ds = dense_vs_sparse(repeats=1 if a.quick else 2)
    print(json.dumps(ds))
    kv = {
        "psnr_low": avg["low"]["known"]["psnr"],
        "psnr_drmc": avg["drmc"]["known"]["psnr"],
        "psnr_baseline": avg["baseline"]["known"]["psnr"],
        "ssim_low": avg["low"]["known"]["ssim"],
        "ssim_drmc": avg["drmc"]["known"]["ssim"],
        "suvmax_bias_low": avg["low"]["known"]["b_max"],
        "suvmax_bias_drmc": avg["drmc"]["known"]["b_max"],
        "suvmax_bias_baseline": avg["baseline"]["known"]["b_max"],
        "psnr_drmc_unknown": avg["drmc"].get("unknown", {}).get("psnr", float("nan")),
        "psnr_low_unknown": avg["low"].get("unknown", {}).get("psnr", float("nan")),
        "dense_sparse_maxdiff": ds["maxdiff"],
        "sparse_speedup": ds["dense_s"] / ds["sparse_s"],
        "params_full": ds["params_full"],
    }
    worse = []
    for c, row in sorted(ev["table"]["drmc"].items()):
        low = ev["table"]["low"][c]["b_max"]
        if row["b_max"] == row["b_max"] and low == low:  # lesions scored (not NaN)
            verdict = "worse" if row["b_max"] > low else "better"
            print(f"{c}: lesion SUVmax bias DRMC {row['b_max']:.4f} vs low-dose input {low:.4f} "
                  f"({verdict} by {abs(row['b_max'] - low):.4f})")
            if row["b_max"] > low:
                worse.append(f"{c}:{row['b_max'] - low:+.4f}")
    kv["drmc_bias_worse_than_input"] = ",".join(worse) or "none"
    if a.write_models:
        write_models(ev, a, "python benchmarks/synthesis.py" + (" --quick" if a.quick else "")
                     + (f" --max-cases {a.max_cases}" if a.max_cases else "") + (" --floor" if a.floor else ""))
    kv["centres_per_step"] = shipped_centres_per_step()
    if a.floor:
        kv["suvmax_bias_noise_free"] = avg["noise_free"]["known"]["b_max"]
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
