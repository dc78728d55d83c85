"""Synthesis speed on CPU: the paper configuration per 64^3 patch, and the shipped demo model on a whole-body volume.

    python benchmarks/synthesis_speed.py [--threads N] [--quick]

1. Paper configuration (C=64, M=3, N=5, random weights) on one 64^3 patch: the authors' style of execution (every
   expert computed and weighted, ``model.sparse = False``, default memory layout, ``model.token_layout = False``),
   the sparse experts alone, and ours (zero-weight experts skipped, channels-last token layout), all in
   ``torch.inference_mode``, and ours inside ``PETWorkbenchLib.allocator.reuse_freed_memory`` as ``synthesize``
   runs it (freed memory reused instead of faulted in again; ours without it is reported too); best of
   ``--repeats``. The arithmetic is about 277 GFLOP per patch with every expert
   (measured by counting below); the machine's oneDNN peak is measured here with a large float32 matrix product,
   so ``limit_ratio`` = time / (FLOP / peak) says how far from the machine's limit the patch runs.
2. Whole body: four held-out simulated patients of the standard set, each resampled to 2 mm, padded to a common
   in-plane size of at least 200 x 200 and stacked head to foot (padded with air to at least 400 slices); the
   low-dose stack through ``synthesize`` with the earlier execution (default memory layout, overlap 0.5, every
   patch through the network, default heap settings) and with today's (token layout, overlap 0.375, air patches
   skipped, freed memory reused); PSNR of each
   against the full-dose stack (R = its max).
3. Peak resident memory of the process.

Last line: patch_s_paper dense_patch_s_paper wholebody_s_before wholebody_s wholebody_psnr_change peak_rss_gb
(plus limit_ratio, peak_gflops, wholebody_shape, speedup).
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


def paper_patch(repeats=2):
    """Seconds per 64^3 patch of the paper configuration: the authors' execution (default memory layout, every
    expert computed, the default heap settings), ours without the heap setting (channels-last token layout,
    zero-weight experts skipped), and ours as ``synthesize`` runs it (also inside
    ``PETWorkbenchLib.allocator.reuse_freed_memory``, after one pass, as the patches of a volume after the first),
    best of ``repeats``."""
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
    variants = {"dense": (False, False, False), "plain_sparse": (False, True, False),
                "sparse_default_heap": (True, True, False), "sparse": (True, True, True)}
    times = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for k, (layout, sparse, heap) in variants.items():
                net.token_layout, net.sparse = layout, sparse
                with reuse_freed_memory() if heap else contextlib.nullcontext():
                    if heap:
                        net(x)         # the heap grows once per volume; the timed pass is a later patch's
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--model", default="synthesis-drmc-cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="two patients stacked instead of four (timing only)")
    a = ap.parse_args(argv)
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(a.threads)
    from common import standard_manifest
    from PETWorkbenchLib.metrics import psnr
    from SynthesisModuleLib import synthesize
    peak = peak_gflops()
    pp = paper_patch(a.repeats)
    limit_s = pp["gflop"] / peak
    print(f"paper configuration, one 64^3 patch: {pp['gflop']:.0f} GFLOP (dense); authors' execution (dense, "
          f"default layout) {pp['dense_s']:.2f} s, sparse in the default layout {pp['plain_sparse_s']:.2f} s, ours "
          f"(sparse, token layout) {pp['sparse_default_heap_s']:.2f} s with the default heap settings and "
          f"{pp['sparse_s']:.2f} s reusing freed memory (as synthesize); machine peak {peak:.0f} GFLOP/s -> limit "
          f"{limit_s:.2f} s, ours at {pp['sparse_s'] / limit_s:.2f}x the limit", flush=True)
    low, full = wholebody_stack(standard_manifest(a.manifest), 2 if a.quick else 4)
    fa = sitk.GetArrayFromImage(full)
    print(f"whole-body stack {low.GetSize()} at 2 mm", flush=True)
    from SynthesisModuleLib.infer import load_model
    net, _ = load_model(a.model)
    import PETWorkbenchLib.allocator as allocator
    net.token_layout = False            # the earlier execution: default memory layout, overlap 0.5, every patch,
    allocator.ENABLED = False           # the default heap settings
    t = time.perf_counter()
    before, _ = synthesize(low, net, device="cpu", overlap=0.5, skip_air=False)
    t_before = time.perf_counter() - t
    allocator.ENABLED = True
    net.token_layout = True             # today: token layout, the default overlap, air patches skipped, freed memory
    #                                     reused
    t = time.perf_counter()
    after, _ = synthesize(low, net, device="cpu")
    t_after = time.perf_counter() - t
    p_before = psnr(sitk.GetArrayFromImage(before), fa)
    p_after = psnr(sitk.GetArrayFromImage(after), fa)
    print(f"before (overlap 0.5, every patch): {t_before:.1f} s, PSNR {p_before:.3f} dB; now: {t_after:.1f} s, "
          f"PSNR {p_after:.3f} dB; input PSNR {psnr(sitk.GetArrayFromImage(low), fa):.3f} dB", flush=True)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    kv = {"patch_s_paper": pp["sparse_s"], "dense_patch_s_paper": pp["dense_s"], "wholebody_s_before": t_before,
          "wholebody_s": t_after, "wholebody_psnr_change": p_after - p_before, "peak_rss_gb": rss_gb,
          "limit_ratio": pp["sparse_s"] / limit_s, "patch_s_paper_default_heap": pp["sparse_default_heap_s"],
          "peak_gflops": peak, "speedup": t_before / t_after,
          "wholebody_shape": "x".join(str(s) for s in low.GetSize()), "threads": a.threads}
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))


if __name__ == "__main__":
    main()
