"""Reconstruction benchmark: adjoint accuracy, OSEM speed against scikit-image (radon/iradon) on the same
geometry and data, the real mMR list-mode counts, and SR4ZCT versus cubic interpolation on the real CT
(3 mm slices made 6 mm thick, compared with the real 3 mm CT).

    python benchmarks/reconstruction.py [--quick] [--threads 1]

The last line printed is ``key=value`` pairs: adjoint_relerr osem_s peer_osem_s speedup listmode_prompts
listmode_delays sr4zct_psnr_db cubic_psnr_db.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", message="Radon transform")

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "ReconstructionModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def phantom(n, nz, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2
    img = np.zeros((nz, n, n), np.float32)
    body = np.hypot((xx - c) / 0.42, (yy - c) / 0.34) < n
    img[:, body] = 1.0
    for _ in range(5):
        cx, cy, r = rng.uniform(0.3 * n, 0.7 * n), rng.uniform(0.35 * n, 0.65 * n), rng.uniform(0.03, 0.07) * n
        img[:, np.hypot(xx - cx, yy - cy) < r] = 4.0
    return img


def bench_adjoint():
    import torch
    from ReconstructionModuleLib.projector import PETSystem
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(8, 96, 96, generator=g, dtype=torch.float64) * 0.01
    s = PETSystem((8, 96, 96), (2.0, 3.0, 3.0), psf_fwhm_mm=(4.0, 5.0, 5.0), mu=mu, n_subsets=6,
                  dtype=torch.float64, norm=torch.rand(1, 1, 1, generator=g, dtype=torch.float64) + 0.5)
    x = torch.rand(s.shape, generator=g, dtype=torch.float64)
    y = torch.rand(s.sino_shape, generator=g, dtype=torch.float64)
    lhs, rhs = float((s.forward(x) * y).sum()), float((x * s.back(y)).sum())
    return abs(lhs - rhs) / abs(lhs)


def bench_osem(n, nz, n_angles, n_iter, n_subsets):
    """Our sparse-matrix OSEM vs the same OSEM written on scikit-image's radon / iradon(filter_name=None)."""
    import torch
    from skimage.transform import iradon, radon

    from ReconstructionModuleLib.lowdose import poisson_sample
    from ReconstructionModuleLib.osem import osem
    from ReconstructionModuleLib.projector import ParallelProjector, PETSystem
    if n % 2 == 0:
        n += 1  # odd size: both libraries put the rotation centre on the same pixel
    img = phantom(n, nz)
    theta = np.arange(n_angles) * 180.0 / n_angles
    proj = ParallelProjector(n, n, 1.0, n_angles=n_angles, n_bins=n, n_subsets=n_subsets)
    clean = proj.forward(torch.from_numpy(img)).numpy().clip(0, None)  # (nz, views, bins)
    y = poisson_sample(clean * (2e5 / clean[0].sum()), seed=1)

    def to_skimage(sino):  # skimage's view v is our view -v: (views, bins) -> (bins, views)
        return np.stack([sino[0]] + [sino[n_angles - v][::-1] for v in range(1, n_angles)], 1)
    # same geometry check: skimage's radon of the phantom equals our projection up to interpolation
    geo_corr = float(np.corrcoef(radon(img[0], theta=theta, circle=True).ravel(),
                                 to_skimage(clean[0]).ravel())[0, 1])
    y_sk = np.stack([to_skimage(y[z]) for z in range(nz)])
    # ours
    t0 = time.time()
    proj = ParallelProjector(n, n, 1.0, n_angles=n_angles, n_bins=n, n_subsets=n_subsets)
    s = PETSystem((nz, n, n), (1.0, 1.0, 1.0), projector=proj)
    x = osem(s, torch.from_numpy(y), n_iter=n_iter).numpy()
    t_ours = time.time() - t0
    # peer: same OSEM update with skimage operators (iradon without filter = back projection)
    t0 = time.time()
    subsets = [np.arange(k, n_angles, n_subsets) for k in range(n_subsets)]
    xp = np.ones((nz, n, n))
    circle = np.hypot(*(np.mgrid[0:n, 0:n] - (n - 1) / 2)) <= n / 2
    sens = [np.stack([iradon(np.ones((n, len(v))), theta=theta[v], filter_name=None, circle=True)
                      for _ in range(1)])[0] for v in subsets]
    for _ in range(n_iter):
        for k, v in enumerate(subsets):
            for z in range(nz):
                f = radon(xp[z], theta=theta[v], circle=True)
                ratio = np.where(f > 1e-9, y_sk[z][:, v] / np.maximum(f, 1e-9), 0.0)
                b = iradon(ratio, theta=theta[v], filter_name=None, circle=True)
                xp[z] = np.where(circle & (sens[k] > 1e-9), xp[z] * b / np.maximum(sens[k], 1e-9), 0.0)
    t_peer = time.time() - t0
    hot = img[0] == 4.0
    bg = (img[0] == 1.0)
    cr = lambda a: float(a[:, hot].mean() / a[:, bg].mean())
    return dict(osem_s=t_ours, peer_osem_s=t_peer, contrast_ours=cr(x), contrast_peer=cr(xp),
                contrast_true=cr(img), image_corr=float(np.corrcoef(x.ravel(), xp.ravel())[0, 1]),
                geometry_corr=geo_corr,
                osem_size=f"{nz}x{n}x{n}, {n_angles} views, {n_iter} it x {n_subsets} subsets")


def bench_listmode():
    from ReconstructionModuleLib.listmode import read_listmode, reconstruct_listmode
    from ReconstructionModuleLib.simulate import shared_data_dir
    hdr = shared_data_dir() / "stir_mmr_small_listmode" / "PET_ACQ_small.l.hdr.STIR"
    lm = read_listmode(hdr)
    t0 = time.time()
    reconstruct_listmode(lm, n_iter=2)
    return dict(listmode_prompts=int(lm["prompts"].size), listmode_delays=int(lm["delays"].size),
                listmode_time_tags=lm["n_time_tags"], listmode_recon_s=time.time() - t0)


def bench_sr4zct(quick):
    import SimpleITK as sitk

    from ReconstructionModuleLib.simulate import shared_data_dir
    from ReconstructionModuleLib.sr4zct import cubic_upsample, psnr, sr4zct_array, thick_slice_volume
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data_dir() / "totalsegmentator_example_ct" /
                                                   "example_ct.nii.gz"))).astype(np.float32)
    ct = np.clip(ct, -1024.0, 2000.0)
    r = 3.0
    thick, centres = thick_slice_volume(ct, r, 2 * r, 0.0)  # 6 mm slices, no overlap
    cub = cubic_upsample(thick, centres, ct.shape[0], r)
    t0 = time.time()
    out, info = sr4zct_array(thick, r, 2 * r, 0.0, epochs=60 if quick else 200, network="cnn", depth=5,
                             lr=2e-3, batch=8, patch=48, seed=0, max_seconds=240 if quick else 3600)
    n = min(out.shape[0], ct.shape[0])
    dr = 3024.0  # HU range of the clipped CT
    m = slice(1, n - 1)  # the two end slices are extrapolated by both methods
    return dict(sr4zct_psnr_db=psnr(ct[m], out[m], dr), cubic_psnr_db=psnr(ct[m], cub[m], dr),
                sr4zct_epochs=info["epochs"], sr4zct_s=time.time() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller problem, time-limited SR4ZCT (< 5 min)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    res = {}
    t0 = time.time()
    res["adjoint_relerr"] = bench_adjoint()
    ob = bench_osem(n=96 if a.quick else 128, nz=8 if a.quick else 32, n_angles=96 if a.quick else 128,
                    n_iter=3, n_subsets=8)
    res.update(ob)
    res["speedup"] = ob["peer_osem_s"] / ob["osem_s"]
    res.update(bench_listmode())
    res.update(bench_sr4zct(a.quick))
    res["total_s"] = time.time() - t0
    print(json.dumps(res, indent=1))
    print("peer: scikit-image radon/iradon(filter_name=None) OSEM, same geometry, data, iterations and subsets")
    keys = ["adjoint_relerr", "osem_s", "peer_osem_s", "speedup", "listmode_prompts", "listmode_delays",
            "sr4zct_psnr_db", "cubic_psnr_db"]
    fmt = lambda v: (f"{v:.3g}" if isinstance(v, float) and (abs(v) < 1e-2 or abs(v) >= 1e4) else
                     (f"{v:.3f}" if isinstance(v, float) else str(v)))
    print(" ".join(f"{k}={fmt(res[k])}" for k in keys))


if __name__ == "__main__":
    main()
