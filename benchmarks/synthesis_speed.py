"""Synthesis speed on CPU: the paper configuration per 64^3 patch, and the shipped demo model on a whole-body volume.

    python benchmarks/synthesis_speed.py [--threads N] [--quick]

1. Paper configuration (C=64, M=3, N=5, random weights) on one 64^3 patch: the authors' style of execution (every
   expert computed and weighted, ``model.sparse = False``, default memory layout, ``model.token_layout = False``),
   the sparse experts alone, and ours (zero-weight experts skipped, channels-last token layout, fused inference), all in
   ``torch.inference_mode``, and ours inside ``PETWorkbenchLib.allocator.reuse_freed_memory`` as ``synthesize``
   runs it (freed memory reused instead of faulted in again; ours without it is reported too); best of
   ``--repeats``. The arithmetic is about 277 GFLOP per patch with every expert
   (measured by counting below); the machine's oneDNN peak is measured with a large float32 matrix product in each
   of the two patch processes, right after the patches (this shared machine's speed drifts between runs), and the
   higher of the two is taken, so ``limit_ratio`` = time / (FLOP / peak) says how far from the machine's limit the
   patch runs.
2. Whole body: four held-out simulated patients of the standard set, each resampled to 2 mm, padded to a common
   in-plane size of at least 200 x 200 and stacked head to foot (padded with air to at least 400 slices); the
   low-dose stack through ``synthesize`` with the earlier execution (default memory layout, overlap 0.5, Gaussian
   blending sigma 0.125 x patch, every patch through the network, default heap settings, float32) and with
   today's defaults (token layout with fused inference, overlap 0.3 with Gaussian blending sigma 0.25 x patch,
   windows over the body's bounding box, air patches skipped, freed memory reused, float32), and today's with
   ``precision="bfloat16"`` (autocast) for comparison; PSNR of each against the full-dose stack (R = its max).
3. Peak resident memory of each measurement. Each of the five measurements (paper patch with and without the heap
   setting, whole body before, now and now in bfloat16) runs in a fresh process, since glibc's heap settings stay
   once set.

Last line: patch_s_paper dense_patch_s_paper wholebody_s_before wholebody_s wholebody_psnr_change peak_rss_gb
(plus limit_ratio, peak_gflops, wholebody_shape, speedup, wholebody_s_bfloat16, wholebody_psnr_change_bfloat16).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "SynthesisModule", ROOT / "ReconstructionModule", Path(__file__).resolve().parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def peak_gflops(n=2048, repeats=3):
    """float32 matrix-product throughput of this machine (torch / oneDNN), GFLOP/s."""
    import torch
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def patch_flops(net, x):
    """Multiply-adds x 2 of the convolutions and attention products of one forward pass (dense execution)."""
    import torch
    total = [0]

    def conv_hook(m, inp, out):
        k = m.weight[0].numel()  # in/groups x kernel volume
        total[0] += 2 * out.numel() * k

    hooks = [m.register_forward_hook(conv_hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    net.sparse = False
    with torch.inference_mode():
        net(x)
    for h in hooks:
        h.remove()
    c = net.config["n_feats"]
    vox = x[0, 0].numel()
    n_att = net.config["res_num"] * net.config["num_experts"]
    total[0] += n_att * 2 * 2 * vox * c * c // net.config["num_heads"]  # q k^T and attn v per expert
    return total[0]


def paper_patch(repeats=2, heap=False):
    """Seconds per 64^3 patch of the paper configuration, best of ``repeats``. ``heap`` False: the authors'
    execution (default memory layout, every expert computed), the sparse experts in the default layout, and ours
    (channels-last token layout, zero-weight experts skipped), all with glibc's default heap settings; True: ours as
    ``synthesize`` runs it, inside ``PETWorkbenchLib.allocator.reuse_freed_memory``, timed after one pass (as the
    patches of a volume after the first). Each call belongs in a fresh process (the heap settings stay once set)."""
    import contextlib

    import torch
    from PETWorkbenchLib.allocator import reuse_freed_memory
    from SynthesisModuleLib.model import build_model
    from SynthesisModuleLib.train import load_config
    torch.manual_seed(0)
    net = build_model(load_config("drmc_paper")["model"]).eval()
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    net.token_layout = False           # count the paper's arithmetic on its own formulation (conv hooks)
    flops = patch_flops(net, x)
    variants = {"sparse": (True, True)} if heap else {"dense": (False, False), "plain_sparse": (False, True),
                                                     "sparse_default_heap": (True, True)}
    times = {k: [] for k in variants}
    with torch.inference_mode(), reuse_freed_memory() if heap else contextlib.nullcontext():
        for _ in range(repeats):
            for k, (layout, sparse) in variants.items():
                net.token_layout, net.sparse = layout, sparse
                if heap:
                    net(x)             # the heap grows once per volume; the timed pass is a later patch's
                t = time.perf_counter()
                net(x)
                times[k].append(time.perf_counter() - t)
    return {f"{k}_s": min(v) for k, v in times.items()} | {"gflop": flops / 1e9}


def wholebody_stack(manifest, n=4, min_inplane=200, min_slices=400):
    """(low-dose stack, full-dose stack) as SimpleITK images at 2 mm, head to foot."""
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import resample_to_spacing
    from PETWorkbenchLib.manifest import case_path, read_manifest, select
    rows = [r for r in select(read_manifest(manifest), split="test", tracers=["FDG"])
            if r["center"] not in ("C5",)][:n]
    lows, fulls = [], []
    for r in rows:
        lows.append(sitk.GetArrayFromImage(resample_to_spacing(sitk.ReadImage(str(case_path(r, "low_dose")),
                                                                             sitk.sitkFloat32), (2, 2, 2))))
        fulls.append(sitk.GetArrayFromImage(resample_to_spacing(sitk.ReadImage(str(case_path(r, "full_dose")),
                                                                              sitk.sitkFloat32), (2, 2, 2))))
    h = max(min_inplane, max(a.shape[1] for a in lows))
    w = max(min_inplane, max(a.shape[2] for a in lows))

    def pad(a):
        out = np.zeros((a.shape[0], h, w), np.float32)
        y0, x0 = (h - a.shape[1]) // 2, (w - a.shape[2]) // 2
        out[:, y0:y0 + a.shape[1], x0:x0 + a.shape[2]] = a
        return out
    low = np.concatenate([pad(a) for a in lows])
    full = np.concatenate([pad(a) for a in fulls])
    if low.shape[0] < min_slices:  # air below the feet up to the minimum length
        extra = np.zeros((min_slices - low.shape[0],) + low.shape[1:], np.float32)
        low, full = np.concatenate([low, extra]), np.concatenate([full, extra])
    imgs = []
    for a in (low, full):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((2.0, 2.0, 2.0))
        imgs.append(im)
    return imgs[0], imgs[1]


def wholebody(manifest, model, quick, before, precision="float32"):
    """One whole-body synthesis: the earlier execution (``before``: default memory layout, overlap 0.5, blending
    sigma 0.125 x patch, every patch, glibc's default heap settings, float32) or today's (token layout with fused
    inference, the default overlap and blending, windows over the body's box, air patches skipped, freed memory
    reused, ``precision``). Returns seconds, PSNR
    of output and input against the full-dose stack, and the stack's size."""
    import SimpleITK as sitk
    import PETWorkbenchLib.allocator as allocator
    from PETWorkbenchLib.metrics import psnr
    from SynthesisModuleLib import synthesize
    from SynthesisModuleLib.infer import load_model
    low, full = wholebody_stack(manifest, 2 if quick else 4)
    fa = sitk.GetArrayFromImage(full)
    net, _ = load_model(model)
    net.token_layout = not before
    allocator.ENABLED = not before
    kw = ({"overlap": 0.5, "blend_sigma": 0.125, "skip_air": False, "precision": "float32"} if before
          else {"precision": precision})
    t = time.perf_counter()
    out, _ = synthesize(low, net, device="cpu", **kw)
    dt = time.perf_counter() - t
    return {"s": dt, "psnr": psnr(sitk.GetArrayFromImage(out), fa), "psnr_input": psnr(sitk.GetArrayFromImage(low), fa),
            "shape": "x".join(str(v) for v in low.GetSize())}


PHASES = ("paper_default", "paper_heap", "wholebody_before", "wholebody_after", "wholebody_bfloat16")


def run_phase(name, a):
    """One measurement in this (fresh) process; prints one JSON line with its results and peak RSS (GB)."""
    import json

    import torch
    torch.set_num_threads(a.threads)
    if name.startswith("paper"):
        res = paper_patch(a.repeats, heap=name == "paper_heap")
        res["peak_gflops"] = peak_gflops(repeats=5)   # the machine's limit in this process, right after the patch
    else:
        from common import standard_manifest
        res = wholebody(standard_manifest(a.manifest), a.model, a.quick, before=name == "wholebody_before",
                        precision="bfloat16" if name == "wholebody_bfloat16" else "float32")
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print("PHASE " + json.dumps(res), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--model", default="synthesis-drmc-cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="two patients stacked instead of four (timing only)")
    ap.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        return run_phase(a.phase, a)
    import json
    import subprocess
    r = {}
    for phase in PHASES:            # each in a fresh process: glibc's heap state is the process's own
        cmd = [sys.executable, __file__, "--phase", phase, "--threads", str(a.threads), "--model", a.model,
               "--repeats", str(a.repeats)] + (["--manifest", a.manifest] if a.manifest else []) + \
              (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PHASE ")]
        if out.returncode or not lines:
            sys.exit(f"phase {phase} failed: {out.stderr.strip().splitlines()[-1:]}")
        r[phase] = json.loads(lines[-1][6:])
    pd, ph = r["paper_default"], r["paper_heap"]
    peak = max(pd["peak_gflops"], ph["peak_gflops"])     # the higher of the two: the stricter limit
    limit_s = pd["gflop"] / peak
    print(f"paper configuration, one 64^3 patch: {pd['gflop']:.0f} GFLOP (dense); authors' execution (dense, "
          f"default layout) {pd['dense_s']:.2f} s, sparse in the default layout {pd['plain_sparse_s']:.2f} s, ours "
          f"(sparse, token layout) {pd['sparse_default_heap_s']:.2f} s with glibc's default heap settings and "
          f"{ph['sparse_s']:.2f} s reusing freed memory (as synthesize; peak RSS {pd['peak_rss_gb']:.2f} vs "
          f"{ph['peak_rss_gb']:.2f} GB); machine peak {peak:.0f} GFLOP/s -> limit {limit_s:.2f} s, ours at "
          f"{ph['sparse_s'] / limit_s:.2f}x the limit", flush=True)
    b, n, f = r["wholebody_before"], r["wholebody_after"], r["wholebody_bfloat16"]
    print(f"whole-body stack {n['shape']} at 2 mm; before (overlap 0.5, every patch, default heap, float32): "
          f"{b['s']:.1f} s, PSNR {b['psnr']:.4f} dB, peak RSS {b['peak_rss_gb']:.2f} GB; now: "
          f"{n['s']:.1f} s, PSNR {n['psnr']:.4f} dB, peak RSS {n['peak_rss_gb']:.2f} GB; now in bfloat16: "
          f"{f['s']:.1f} s, PSNR {f['psnr']:.4f} dB; input PSNR {n['psnr_input']:.3f} dB", flush=True)
    kv = {"patch_s_paper": ph["sparse_s"], "dense_patch_s_paper": pd["dense_s"], "wholebody_s_before": b["s"],
          "wholebody_s": n["s"], "wholebody_psnr_change": n["psnr"] - b["psnr"], "peak_rss_gb": n["peak_rss_gb"],
          "limit_ratio": ph["sparse_s"] / limit_s, "patch_s_paper_default_heap": pd["sparse_default_heap_s"],
          "peak_rss_gb_paper_patch": ph["peak_rss_gb"], "peak_gflops": peak, "speedup": b["s"] / n["s"],
          "wholebody_shape": n["shape"], "threads": a.threads,
          "wholebody_s_bfloat16": f["s"], "wholebody_psnr_change_bfloat16": f["psnr"] - b["psnr"]}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
