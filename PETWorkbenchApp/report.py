"""Study report: Markdown with PNG figures (slices, routing, organ overlay) and the metrics table."""

import json
from pathlib import Path

import numpy as np

from PETWorkbenchLib.dicom import is_pet_dicom_input
from PETWorkbenchLib.imageio import save_figure, write_text

FIG_DPI = 100


def _image(path):
    """The volume re-oriented to LPS (array axes z = inferior -> superior, y = anterior -> posterior, x = right ->
    left), so that every figure has the same, radiological, orientation whatever the file's direction."""
    import SimpleITK as sitk
    from PETWorkbenchLib.dicom import read_pet
    from PETWorkbenchLib.imageio import read_image
    name = Path(path).name
    img = read_pet(path, name)[0] if is_pet_dicom_input(path) else read_image(path, name)   # a PET DICOM input
    return sitk.DICOMOrient(img, "LPS")


def _arr(path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(_image(path)).astype(np.float32)


def _aspect(img):
    """imshow aspect of a coronal view (rows = z, columns = x) in physical units."""
    sx, _, sz = img.GetSpacing()
    return sz / sx


def _markers(st, img):
    """[(id, column x, row z of the coronal view, flagged)] of the lesion-change report's hot spots."""
    if not st.has_valid("lesion_changes.json"):
        return []
    out = []
    nz = img.GetSize()[2]
    for r in json.loads(st.path("lesion_changes.json").read_text())["lesions"]:
        i, _, k = img.TransformPhysicalPointToContinuousIndex([float(v) for v in r["center_lps"]])
        out.append((r["id"], i, nz - 1 - k, r["flagged"]))
    return out


def _coronal(a, j=None):
    """(z, y, x) -> coronal slice through the middle (superior up)."""
    j = a.shape[1] // 2 if j is None else j
    return a[::-1, j, :]


def _pct(v):
    return "–" if v is None else f"{v:+.1f}"


def _flag(row):
    if not row.get("flagged"):
        return ""
    return "**yes**" + (f": {row['flag_reason']}" if row.get("flag_reason") else "")


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def write_figures(st):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = {}
    panels = [("low_dose", "Low dose (DRF 10)"), ("synthesized", "DRMC synthesized"), ("full_dose", "Full dose")]
    images = [(st.input(k) if k != "synthesized" else st.path("synthesized.nii.gz"), t) for k, t in panels]
    images = [(p, t) for p, t in images if p is not None and (p.is_file() or is_pet_dicom_input(p))]
    if images:
        vols = [_image(p) for p, _ in images]
        import SimpleITK as sitk
        arrays = [sitk.GetArrayFromImage(v).astype(np.float32) for v in vols]
        vmax = float(np.percentile(arrays[-1], 99.8)) or 1.0
        # choose the coronal plane through the hottest lesion if known, else the middle
        j = None
        les = st.input("lesions")
        if les is not None and les.is_file():
            L = _arr(les)
            if L.any():
                j = int(np.argwhere(L > 0)[:, 1].mean())
        marks = _markers(st, vols[0])
        fig, axes = plt.subplots(2, len(arrays), figsize=(3.2 * len(arrays), 8.4), squeeze=False)
        for col, (a, v, (_, title)) in enumerate(zip(arrays, vols, images)):
            for row, (view, name) in enumerate(((_coronal(a, j), "coronal slice"), (a.max(1)[::-1], "coronal MIP"))):
                ax = axes[row, col]
                ax.imshow(view, cmap="gray_r", vmin=0, vmax=vmax, aspect=_aspect(v), interpolation="nearest")
                for lid, x, z, flagged in marks:
                    ax.plot(x, z, "o", ms=11, mfc="none", mec="red" if flagged else "tab:blue", mew=1.2)
                    ax.annotate(str(lid), (x, z), xytext=(6, 6), textcoords="offset points", fontsize=7,
                                color="red" if flagged else "tab:blue")
                ax.set_title(f"{title}: {name}", fontsize=9)
                ax.text(0.01, 0.5, "R", transform=ax.transAxes, fontsize=8, va="center")
                ax.text(0.97, 0.5, "L", transform=ax.transAxes, fontsize=8, va="center")
                ax.axis("off")
        legend = " (circles: hot spots of the lesion-change report, red = flagged)" if marks else ""
        fig.suptitle("Coronal, radiological (patient right on the left), SUV 0–%.1f%s" % (vmax, legend), fontsize=9)
        fig.tight_layout()
        save_figure(fig, st.path("fig_slices.png"), dpi=FIG_DPI)
        plt.close(fig)
        figs["slices"] = "fig_slices.png"
    if st.has_valid("routing.json"):
        routing = json.loads(st.path("routing.json").read_text())
        if routing.get("routed"):
            from SynthesisModuleLib.metrics import routing_plot
            routing_plot({st.id: routing}, st.path("fig_routing.png"), title="DRMC routing: top-1 expert per bank")
            figs["routing"] = "fig_routing.png"
    if st.has("organs_low.nii.gz"):
        base = st.path("synthesized.nii.gz") if st.has("synthesized.nii.gz") else st.input("low_dose")
        pet_img = _image(base)
        pet, lab = _arr(base), _arr(st.path("organs_low.nii.gz"))
        j = int(np.argwhere(lab > 0)[:, 1].mean()) if lab.any() else None
        fig, ax = plt.subplots(figsize=(4.2, 4.6))
        ax.imshow(_coronal(pet, j), cmap="gray_r", vmin=0, vmax=float(np.percentile(pet, 99.5)) or 1,
                  aspect=_aspect(pet_img))
        masked = np.ma.masked_equal(_coronal(lab, j), 0)
        ax.imshow(masked, cmap="tab20", alpha=0.55, vmin=1, vmax=20, aspect=_aspect(pet_img), interpolation="nearest")
        ax.set_title("LDOS organs on the low-dose PET", fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        save_figure(fig, st.path("fig_organs.png"), dpi=FIG_DPI)
        plt.close(fig)
        figs["organs"] = "fig_organs.png"
    return figs


def write_report(st, metrics):
    figs = write_figures(st)
    lines = [f"# PETWorkbench report: {st.id}", "",
             "Research use only. " + ("The PET images of this study are **simulated** on real CT anatomy "
                                      "(no real patient PET); see simulation.json." if st.has("simulation.json")
                                      else ""), ""]
    if st.has_valid("simulation.json"):
        sim = json.loads(st.path("simulation.json").read_text())
        lines += ["## Acquisition (simulated)", "",
                  f"Centre profile {sim.get('center')}, dose reduction factor {sim.get('drf')}, grid "
                  f"{sim.get('shape')} at {[round(s, 2) for s in sim.get('spacing_mm', [])]} mm; known PET/CT "
                  f"misalignment {sim.get('misalignment_mean_mm', 0):.1f} mm mean, "
                  f"{sim.get('misalignment_max_mm', 0):.1f} mm max inside the body.", ""]
    rows = [("PSNR (dB)", "psnr_low", "psnr_synth"), ("SSIM", "ssim_low", "ssim_synth"),
            ("Lesion SUVmax bias", "suvmax_bias_low", "suvmax_bias_synth"),
            ("Lesion SUVmean bias", "suvmean_bias_low", "suvmean_bias_synth"),
            ("Organ Dice (mean)", "dice_low", "dice_synth")]
    if any(metrics.get(a) is not None or metrics.get(b) is not None for _, a, b in rows):
        lines += ["## Image quality and organs", "", "| metric | low-dose input | DRMC synthesized |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(metrics.get(a))} | {_fmt(metrics.get(b))} |" for n, a, b in rows
                  if metrics.get(a) is not None or metrics.get(b) is not None]
        lines.append("")
    reg = {k[4:]: v for k, v in metrics.items() if k.startswith("reg_")}
    if reg:
        lines += ["## PET to CT registration", "", "| " + " | ".join(reg) + " |", "|" + "---|" * len(reg),
                  "| " + " | ".join(_fmt(v) for v in reg.values()) + " |", ""]
    if st.has_valid("uptake.json"):
        up = json.loads(st.path("uptake.json").read_text())
        lines += [f"## Organ uptake ({up['pet']})", "",
                  "| organ | volume (ml) | SUVmean | SUVmax | SUVpeak | SUVmean full dose |",
                  "|---|---|---|---|---|---|"]
        for r in up["rows"]:
            lines.append(f"| {r['name']} | {_fmt(r['volume_ml'])} | {_fmt(r['suv_mean'])} | {_fmt(r['suv_max'])} | "
                         f"{_fmt(r.get('suv_peak'))} | {_fmt(r.get('suv_mean_full_dose'))} |")
        lines.append("")
    if st.has_valid("lesion_changes.json"):
        lc = json.loads(st.path("lesion_changes.json").read_text())
        thr = lc["threshold"]
        src = f", liver from the {thr['liver_from']}" if thr.get("liver_from") else ""
        lines += ["## Lesion changes (what the synthesis did to the input's hot spots)", "",
                  f"Hot spots: connected regions of the low-dose input above {thr['suv']:.2f} SUV ({thr['method']}"
                  f"{src}), at least {lc['min_volume_ml']:g} ml. **Flag** rule: {lc['rule']}. "
                  f"{lc['n_flagged']} of {lc['n_hot_spots']} hot spots flagged.", ""]
        if lc["lesions"]:
            lines += ["| # | volume (ml) | SUVmax in / out (%) | SUVpeak in / out (%) | SUVmean in / out (%) | "
                      "noise SE (%) | model's mean change at this size (%), lower 95 % bound | flag |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in lc["lesions"]:
                cell = lambda m: (f"{r[m + '_in']:.2f} / {r[m + '_out']:.2f} "
                                  f"({r[m + '_change_pct']:+.1f})")
                lines.append(f"| {r['id']} | {r['volume_ml']:.2f} | {cell('suv_max')} | {cell('suv_peak')} | "
                             f"{cell('suv_mean')} | {r['noise_se_pct']:.1f} | {_pct(r.get('expected_change_pct'))}, "
                             f"{_pct(r.get('expected_change_bound_pct'))} | "
                             f"{_flag(r)} |")
            lines.append("")
    titles = {"slices": "Low-dose, synthesized and full-dose PET", "routing": "Routing of experts",
              "organs": "Organ segmentation"}
    for key, fn in figs.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({fn})", ""]
    write_text("\n".join(lines), st.path("report.md"))
    return st.path("report.md")
