#!/usr/bin/env python
"""Registration on real inter-subject pairs: the six 2D T1 brain slices that ANTs uses in its registration examples
(r16, r27, r30, r62, r64, r85; ``../shared/data/antspy_2d_brain_slices``, different subjects, skull-stripped).

Every ordered pair (30) is registered moving -> fixed.  No ground-truth field or labels exist for these images, so
the measure is a **proxy**: three intensity classes inside the brain (intensity above 10 of 255; Otsu's two
thresholds of the brain's intensities, per image), warped with the field and compared by their mean Dice.  Dice of
intensity classes rewards a field that matches intensities, plausible or not, so it is read together with the
folding of our fields, and it is not anatomical accuracy.  Unlike the main registration benchmark
(``registration.py``: a known smooth field inside one subject, the moving image an interpolated copy of the fixed
one), these pairs differ by inter-subject anatomy, and their noise is their own.

Methods: ours with the defaults a new user gets; ours with LNCC's earlier stabiliser (``lncc_eps=1e-5``); ours with
a weaker, diffeomorphic regulariser for inter-subject pairs (``smoothness`` 4 and 1, ``diffeomorphic=True``); ANTs
SyN (antspyx, ``type_of_transform="SyN"`` defaults) when installed.  One thread for every method.

Last line: ``real2d_dice_before real2d_dice_ours real2d_dice_ours_eps1e5 real2d_dice_ours_s4_diffeo
real2d_dice_ours_s1_diffeo real2d_dice_ants real2d_fold_pct_ours real2d_fold_pct_ours_s4_diffeo
real2d_fold_pct_ours_s1_diffeo real2d_time_ours_s real2d_time_ants_s`` (mean Dice over the 30 pairs; folding:
largest % of det J <= 0 over the pairs; times: all 30 pairs).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "RegistrationModule"))
DATA = Path(os.environ.get("PETWORKBENCH_DATA", ROOT.parent / "shared" / "data")) / "antspy_2d_brain_slices"

from RegistrationModuleLib.metrics import dice  # noqa: E402 - after the sys.path set-up above
NAMES = ("r16", "r27", "r30", "r62", "r64", "r85")
BRAIN = 10.0        # intensity (0-255) above which a pixel is brain
OURS = {"ours": {}, "ours_eps1e5": {"lncc_eps": 1e-5},
        "ours_s4_diffeo": {"smoothness": 4.0, "diffeomorphic": True},
        "ours_s1_diffeo": {"smoothness": 1.0, "diffeomorphic": True}}


def intensity_classes(img: sitk.Image) -> sitk.Image:
    """0 outside the brain, 1-3 inside: Otsu's two thresholds of the brain's intensities."""
    a = sitk.GetArrayFromImage(img)
    brain = a > BRAIN
    otsu = sitk.OtsuMultipleThresholdsImageFilter()
    otsu.SetNumberOfThresholds(2)
    otsu.SetNumberOfHistogramBins(128)
    otsu.Execute(sitk.GetImageFromArray(a[brain].reshape(1, -1).astype(np.float32)))
    t1, t2 = otsu.GetThresholds()
    lab = np.zeros(a.shape, np.uint8)
    lab[brain] = 1 + (a[brain] > t1) + (a[brain] > t2)
    out = sitk.GetImageFromArray(lab)
    out.CopyInformation(img)
    return out


def mean_dice(fixed: sitk.Image, warped: sitk.Image) -> float:
    return dice(fixed, warped, values=(1, 2, 3))[1]


def run_ants(images, labels, pairs):
    import ants

    from registration import ants_image
    dices, t0 = [], time.perf_counter()
    for f, m in pairs:
        tx = ants.registration(ants_image(images[f]), ants_image(images[m]), type_of_transform="SyN")
        w = ants.apply_transforms(ants_image(labels[f]), ants_image(labels[m]), tx["fwdtransforms"],
                                  interpolator="nearestNeighbor")
        warped = sitk.GetImageFromArray(w.numpy().T.astype(np.uint8))
        warped.CopyInformation(labels[f])
        dices.append(mean_dice(labels[f], warped))
    return float(np.mean(dices)), time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="accepted for run_all.py; the run is short anyway (~3 min)")
    p.add_argument("--no-ants", action="store_true", help="leave ANTs SyN out")
    args = p.parse_args(argv)
    import torch

    from RegistrationModuleLib import register
    torch.set_num_threads(1)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    images = {n: sitk.Cast(sitk.ReadImage(str(DATA / f"{n}slice.jpg")), sitk.sitkFloat32) for n in NAMES}
    labels = {n: intensity_classes(images[n]) for n in NAMES}
    pairs = list(itertools.permutations(NAMES, 2))
    key = {"real2d_dice_before": float(np.mean([
        mean_dice(labels[f], sitk.Resample(labels[m], labels[f], sitk.Transform(), sitk.sitkNearestNeighbor))
        for f, m in pairs]))}
    defaults = None                                             # the defaults' Dice per pair, for the comparison
    for name, kw in OURS.items():
        dices, folds, t0 = [], [], time.perf_counter()
        for f, m in pairs:
            res = register(images[f], images[m], device="cpu", **kw)
            dices.append(mean_dice(labels[f], res.warp(labels[m], is_label=True)))
            folds.append(res.summary["folding_pct"])
        dt = time.perf_counter() - t0
        better = ""
        if defaults is None:
            defaults = np.asarray(dices)
            key["real2d_time_ours_s"] = dt
        else:
            better = f" (better than the defaults in {int(np.sum(np.asarray(dices) > defaults))} of {len(pairs)} pairs)"
        key[f"real2d_dice_{name}"] = float(np.mean(dices))
        key[f"real2d_fold_pct_{name}"] = float(np.max(folds))
        print(f"{name} {kw}: mean Dice {np.mean(dices):.4f} (median {np.median(dices):.4f}), largest folding "
              f"{np.max(folds):.3f} %, {dt:.1f} s for {len(pairs)} pairs{better}", flush=True)
    key["real2d_dice_ants"], key["real2d_time_ants_s"] = math.nan, math.nan
    if not args.no_ants:
        try:
            key["real2d_dice_ants"], key["real2d_time_ants_s"] = run_ants(images, labels, pairs)
            print(f"ants SyN: mean Dice {key['real2d_dice_ants']:.4f}, {key['real2d_time_ants_s']:.1f} s", flush=True)
        except ImportError:
            print("ants SyN skipped: antspyx is not installed (pip install -e '.[bench]')", flush=True)
    print(f"before registration: mean Dice {key['real2d_dice_before']:.4f}", flush=True)
    keys = ["real2d_dice_before", "real2d_dice_ours", "real2d_dice_ours_eps1e5", "real2d_dice_ours_s4_diffeo",
            "real2d_dice_ours_s1_diffeo", "real2d_dice_ants", "real2d_fold_pct_ours", "real2d_fold_pct_ours_s4_diffeo",
            "real2d_fold_pct_ours_s1_diffeo", "real2d_time_ours_s", "real2d_time_ants_s"]
    print(" ".join(f"{k}={key[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()
