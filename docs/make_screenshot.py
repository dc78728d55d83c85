"""Regenerate ``docs/Screenshot01.png``, the screenshot of the Slicer extension catalogue (EXTENSION_SCREENSHOTURLS).

    .venv/bin/python docs/make_screenshot.py                 # under a minute on CPU
    .venv/bin/python docs/make_screenshot.py --study out/demo/demo    # reuse a finished demo study

It runs the demo's first steps on the sample data (study id ``demo``, seed 0: the simulated low-dose PET of
``Resources/SampleData/SimulatedPET``), with the shipped CPU models: ``simulate`` (low-dose and full-dose PET on
the sample CT), ``synthesize`` (DRMC full-dose estimate) and ``segment`` (LDOS organs on the estimate), and
draws one axial slice through the hottest lesion: low-dose PET, DRMC estimate, full-dose reference, and the LDOS
organs (colours of the organ terminology) and the estimate's hot spots over the CT.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "Screenshot01.png"
STUDY = {"id": "demo", "anatomy": "sample"}
SEED = 0
MAX_BYTES = 300_000


def _arr(path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)


def _axial(a, k):
    """Axial slice of an LPS (z, y, x) array whose x and y indices run towards patient right and anterior, shown
    the radiological way: anterior up, patient right on the left."""
    return a[k, ::-1, ::-1]


def draw(study_dir, out=OUT):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from PETWorkbenchLib.terminology import organ_specs

    d = Path(study_dir)
    low, synth, full = _arr(d / "low_dose.nii.gz"), _arr(d / "synthesized.nii.gz"), _arr(d / "full_dose.nii.gz")
    ct, organs, lesions = _arr(d / "ct.nii.gz"), _arr(d / "organs_synth.nii.gz").astype(int), _arr(d / "lesions.nii.gz")
    # the axial slice through the hottest lesion (else the one with most organs)
    if lesions.any():
        hot = np.unravel_index(np.argmax(np.where(lesions > 0, full, -np.inf)), full.shape)
        k = int(hot[0])
    else:
        k = int(np.argmax([len(np.unique(organs[i])) for i in range(organs.shape[0])]))
    vmax = max(5.0, float(np.percentile(full, 99.8)))       # SUV; organs visible, lesions saturate
    specs = organ_specs()
    colors = np.zeros((1 + max(s["value"] for s in specs), 4))
    for s in specs:
        colors[s["value"]] = list(s["color"]) + [1.0]
    organ_cmap = ListedColormap(colors)

    fig, axes = plt.subplots(1, 4, figsize=(13.6, 3.45), gridspec_kw={"wspace": 0.03})
    panels = [(low, "Low-dose PET (DRF 10)"), (synth, "DRMC full-dose estimate"), (full, "Full-dose reference")]
    for ax, (a, title) in zip(axes, panels):
        ax.imshow(_axial(a, k), cmap="gray_r", vmin=0, vmax=vmax, interpolation="bilinear")
        ax.set_title(title, fontsize=11)
    ax = axes[3]
    ax.imshow(_axial(ct, k), cmap="gray", vmin=-200, vmax=300, interpolation="bilinear")
    lab = _axial(organs, k)
    ax.imshow(np.ma.masked_equal(lab, 0), cmap=organ_cmap, vmin=0, vmax=len(colors) - 1, alpha=0.6,
              interpolation="nearest")
    pet = _axial(synth, k)                                   # hot spots of the estimate (SUV > 0.6 vmax)
    ax.imshow(np.ma.masked_less(pet, 0.6 * vmax), cmap="autumn", vmin=0.6 * vmax, vmax=vmax, alpha=0.9,
              interpolation="bilinear")
    ax.set_title("LDOS organs + hot spots on CT", fontsize=11)
    present = [s for s in specs if (lab == s["value"]).any()]
    ax.legend(handles=[Patch(color=s["color"], label=s["name"].replace("_", " ")) for s in present],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle("PETWorkbench: low-dose PET to full-dose estimate (DRMC) and CT-free organs (LDOS)  "
                 f"[simulated FDG PET on a real CT; SUV 0-{vmax:.0f}]", fontsize=11)
    fig.subplots_adjust(left=0.01, right=0.9, top=0.86, bottom=0.01)
    fig.savefig(out, format="png", dpi=100, facecolor="white")
    plt.close(fig)
    size = Path(out).stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{out} is {size} bytes (> {MAX_BYTES})")
    return out, size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", help="a finished demo study folder (with synthesized.nii.gz, organs_synth.nii.gz)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT)] + [str(p) for p in sorted(ROOT.glob("*Module"))]
    if args.study:
        out, size = draw(args.study, args.out)
    else:
        from PETWorkbenchApp.pipeline import run_study
        with tempfile.TemporaryDirectory() as tmp:
            run_study(STUDY, tmp, steps=["simulate", "synthesize", "segment"], device="cpu", seed=SEED)
            out, size = draw(Path(tmp) / STUDY["id"], args.out)
    print(f"{out}: {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
