"""Benchmark of the synthesis family (DRMC): image quality on the simulated multi-centre set and sparse execution.

    python benchmarks/synthesis.py [--quick] [--manifest .cache/simdata/v1/manifest.csv]

Evaluates the shipped CPU DRMC and the same-budget baseline on held-out patients of the known centres and on the
unknown centres (2 mm grid, PSNR / SSIM / lesion SUVmean, SUVmax bias), then times the full paper configuration
(C=64, M=3, N=5) on one 64^3 patch computing all experts (dense) vs skipping zero-weight experts (sparse).
``--quick`` evaluates at most 2 cases per centre with overlap 0.25. The last line is one ``key=value`` line.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "SynthesisModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def dense_vs_sparse(repeats=2, seed=0):
    import torch

    from SynthesisModuleLib.model import build_model, count_parameters
    from SynthesisModuleLib.train import load_config
    torch.manual_seed(seed)
    net = build_model(load_config("drmc_paper")["model"]).eval()
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--manifest", default=str(ROOT / ".cache" / "simdata" / "v1" / "manifest.csv"))
    ap.add_argument("--drmc", default=str(ROOT / "Resources" / "Models" / "synthesis-drmc-cpu.pt"))
    ap.add_argument("--baseline", default=str(ROOT / "Resources" / "Models" / "synthesis-baseline-cpu.pt"))
    ap.add_argument("--out", default=str(ROOT / ".cache" / "synthesis" / "benchmark"))
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from SynthesisModuleLib.evaluate import evaluate

    t0 = time.time()
    ev = evaluate({"drmc": a.drmc, "baseline": a.baseline}, a.manifest, out_dir=a.out, device="cpu",
                  sw_batch_size=4, overlap=0.25 if a.quick else 0.5,
                  max_cases_per_center=2 if a.quick else None, tracers=["FDG"])
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
        "psnr_drmc_unknown": avg["drmc"].get("unknown", {}).get("psnr", float("nan")),
        "psnr_low_unknown": avg["low"].get("unknown", {}).get("psnr", float("nan")),
        "dense_sparse_maxdiff": ds["maxdiff"],
        "sparse_speedup": ds["dense_s"] / ds["sparse_s"],
        "params_full": ds["params_full"],
    }
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
