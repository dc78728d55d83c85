"""Synthesis on the real NEMA IQ phantom PET: the 2 mm round trip and the lesion-change report.

    python benchmarks/synthesis_lesions.py [--drf 10] [--model synthesis-drmc-cpu] [--quick]

Data: ../shared/data/nema_iq_pet_dicom (real NEMA image-quality phantom, GE-like grid 2.08 x 2.08 x 2.78 mm,
``pet_recon_1.nii.gz``; see its SOURCE.md). Units are not stored; the phantom is a water-filled cylinder, so its
SUV (activity concentration over mean activity per gram) is about 1 in the warm background: the image is scaled
so that the median of the warm background is 1 SUV. The six hot spheres (10, 13, 17, 22, 28, 37 mm) are the six
largest hot spots of the full-dose image in the sphere plane, identified by volume.

1. Round trip alone (no network): the full-dose image through ``synthesize`` with an identity network (the 2 mm
   resampling and back, as the engine does it) and, for comparison, the image itself resampled to 2 mm and back
   (the earlier behaviour): SUVmax / SUVmean change of each sphere.
2. Low dose: our own simulator (``imagedomain.simulate_lowdose_image``, OSEM of Poisson projections of the image,
   DRF ``--drf``), then the shipped synthesis model, then the lesion-change report with the warm background as the
   PERCIST reference region, and the model's lesion calibration from Models.json (measured on simulated
   patients, not on this phantom). Which spheres are flagged; the warm background must not produce a flagged hot
   spot.

Last line (key=value): roundtrip_suvmax_10mm_pct roundtrip_suvmean_10mm_pct old_roundtrip_suvmax_10mm_pct
flagged_10mm flagged_13mm flagged_37mm flagged_background calibrated (1: the model has a lesion calibration) synth_s
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "SynthesisModule", ROOT / "ReconstructionModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

NEMA = ROOT.parent / "shared" / "data" / "nema_iq_pet_dicom" / "pet_recon_1.nii.gz"
DIAMETERS = (10, 13, 17, 22, 28, 37)


def load_nema(path):
    """The phantom in SUV (warm background median = 1), its background mask and the six sphere masks."""
    import SimpleITK as sitk
    from scipy import ndimage
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(img).astype(np.float64)
    sp = tuple(reversed(img.GetSpacing()))
    smooth = ndimage.gaussian_filter(a, [6.0 / s for s in sp])
    body = smooth > 0.5 * np.percentile(smooth, 90)  # the phantom fills more than 10 % of the field of view
    # background: inside the phantom, far from the hot spheres and the cold lung insert
    hot = smooth > 2.0 * np.median(smooth[body])
    cold = smooth < 0.5 * np.median(smooth[body])
    away = ndimage.binary_erosion(body, iterations=4) & ~ndimage.binary_dilation(hot | cold, iterations=6)
    scale = 1.0 / float(np.median(a[away]))
    suv = sitk.GetImageFromArray((a * scale).astype(np.float32))
    suv.CopyInformation(img)
    # spheres: connected hot regions of the (noise-light) smoothed image, the six largest ordered by volume
    lab, n = ndimage.label(ndimage.gaussian_filter(a * scale, [2.0 / s for s in sp]) > 3.0)
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(sizes)[::-1][:6][::-1]  # six largest, ascending volume
    spheres = {d: lab == (i + 1) for d, i in zip(DIAMETERS, order)}
    bg = sitk.GetImageFromArray(away.astype(np.uint8))
    bg.CopyInformation(img)
    return suv, bg, spheres


def identity_model():
    """Checkpoint of a DRMC network that returns its input (zero last convolution): the engine's resampling alone."""
    import torch
    from SynthesisModuleLib.model import build_model
    cfg = {"arch": "drmc", "n_feats": 8, "res_num": 1, "num_experts": 2, "num_heads": 2, "hidden_dim": 4,
           "tail_init": "zero"}
    torch.manual_seed(0)
    net = build_model(cfg)
    return {"config": {"name": "identity", "model": cfg, "train": {"patch_size": 32}}, "state_dict": net.state_dict()}


def sphere_change(a, b, spheres):
    out = {}
    for d, m in spheres.items():
        out[d] = {"suvmax_pct": 100 * (b[m].max() / a[m].max() - 1),
                  "suvmean_pct": 100 * (b[m].mean() / a[m].mean() - 1)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nema", default=str(NEMA))
    ap.add_argument("--drf", type=float, default=10.0)
    ap.add_argument("--model", default="synthesis-drmc-cpu")
    ap.add_argument("--overlap", type=float, default=None, help="default: synthesize()'s")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / ".cache" / "synthesis" / "nema"))
    ap.add_argument("--quick", action="store_true", help="skip the low-dose synthesis (round trip only)")
    a = ap.parse_args(argv)
    import SimpleITK as sitk
    import torch
    torch.set_num_threads(a.threads)
    from PETWorkbenchLib.imageio import resample_like, resample_to_spacing, write_image, write_json
    from SynthesisModuleLib import synthesize
    from SynthesisModuleLib.lesions import lesion_change_report, model_calibration
    if not Path(a.nema).is_file():
        sys.exit(f"NEMA phantom not found: {a.nema}")
    if a.overlap is None:
        from SynthesisModuleLib import DEFAULT_OVERLAP
        a.overlap = DEFAULT_OVERLAP           # as a user's `petworkbench synthesize` runs
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    full, bg, spheres = load_nema(a.nema)
    fa = sitk.GetArrayFromImage(full)
    print("sphere volumes (ml):", {d: round(float(m.sum() * np.prod(full.GetSpacing()) / 1000), 2)
                                   for d, m in spheres.items()})
    # 1. round trip
    new, _ = synthesize(full, identity_model(), device="cpu", overlap=a.overlap)
    old = resample_like(resample_to_spacing(full, (2.0, 2.0, 2.0)), full)
    rt_new = sphere_change(fa, sitk.GetArrayFromImage(new), spheres)
    rt_old = sphere_change(fa, sitk.GetArrayFromImage(old), spheres)
    for d in DIAMETERS:
        print(f"round trip {d:2d} mm sphere: SUVmax {rt_new[d]['suvmax_pct']:+.2f} % SUVmean "
              f"{rt_new[d]['suvmean_pct']:+.2f} % (image resampled itself: SUVmax {rt_old[d]['suvmax_pct']:+.1f} %, "
              f"SUVmean {rt_old[d]['suvmean_pct']:+.1f} %)")
    kv = {"roundtrip_suvmax_10mm_pct": rt_new[10]["suvmax_pct"],
          "roundtrip_suvmean_10mm_pct": rt_new[10]["suvmean_pct"],
          "old_roundtrip_suvmax_10mm_pct": rt_old[10]["suvmax_pct"]}
    if not a.quick:
        from ReconstructionModuleLib.imagedomain import simulate_lowdose_image
        t = time.time()
        sim = simulate_lowdose_image(full, a.drf, seed=0)
        low, ref = sim["low_dose"], sim["full_dose"]
        print(f"low-dose simulation DRF {a.drf:g}: {time.time() - t:.0f} s")
        t = time.time()
        syn, _ = synthesize(low, a.model, device="cpu", overlap=a.overlap)
        synth_s = time.time() - t
        print(f"synthesis ({a.model}, overlap {a.overlap}): {synth_s:.0f} s")
        for name, im in (("low_dose", low), ("full_dose_resimulated", ref), ("synthesized", syn)):
            write_image(im, out_dir / f"{name}.nii.gz", overwrite=True)
        calibration = model_calibration(a.model)
        rep = lesion_change_report(low, syn, liver_mask=bg, calibration=calibration)
        write_json(rep, out_dir / "lesion_changes.json", overwrite=True)
        lab = {}
        flagged = {}
        for r in rep["lesions"]:
            idx = full.TransformPhysicalPointToIndex([float(v) for v in r["center_lps"]])
            hit = [d for d, m in spheres.items() if m[idx[2], idx[1], idx[0]]]
            key = f"{hit[0]} mm sphere" if hit else "background"
            lab[r["id"]] = key
            flagged[key] = flagged.get(key, False) or r["flagged"]
            print(f"hot spot {r['id']} ({key}): {r['volume_ml']:.2f} ml, SUVpeak {r['suv_peak_in']:.2f} -> "
                  f"{r['suv_peak_out']:.2f} ({r['suv_peak_change_pct']:+.1f} %, noise SE {r['noise_se_pct']:.1f} %), "
                  f"SUVmax {r['suv_max_change_pct']:+.1f} %, SUVmean {r['suv_mean_change_pct']:+.1f} %"
                  + (f", model's mean change at this size {r['expected_change_pct']:+.1f} %"
                     if r["expected_change_pct"] is not None else ", model not calibrated")
                  + (f" (95 % bound {r['expected_change_bound_pct']:+.1f} %)"
                     if r["expected_change_bound_pct"] is not None else "")
                  + f"{'  FLAGGED (' + r['flag_reason'] + ')' if r['flagged'] else ''}")
        la, sa, ra = (sitk.GetArrayFromImage(x) for x in (low, syn, ref))
        for d in DIAMETERS:
            m = spheres[d]
            pct = lambda x, f: 100 * (f(x[m]) / f(ra[m]) - 1)
            print(f"{d:2d} mm sphere vs re-simulated full dose: SUVmax low {pct(la, np.max):+.1f} % synthesized "
                  f"{pct(sa, np.max):+.1f} %; SUVmean low {pct(la, np.mean):+.1f} % synthesized "
                  f"{pct(sa, np.mean):+.1f} %")
        kv.update({"flagged_10mm": int(flagged.get("10 mm sphere", False)),
                   "flagged_13mm": int(flagged.get("13 mm sphere", False)),
                   "flagged_37mm": int(flagged.get("37 mm sphere", False)),
                   "flagged_background": int(flagged.get("background", False)),
                   "calibrated": int(calibration is not None), "synth_s": synth_s,
                   "threshold_suv": rep["threshold"]["suv"]})
        write_json({"kv": kv, "hot_spots": lab}, out_dir / "summary.json", overwrite=True)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kv.items()))
    return kv


if __name__ == "__main__":
    main()
