"""The main job, end to end, for one study: low-dose PET in; full-dose estimate, organs, uptake and alignment out.

Steps (each writes into ``<out>/<study id>/`` and can be run alone; a step whose outputs exist is not redone,
unless they were made with other model weights: ``models.json`` records the weights' checksums, and outputs of
older weights are moved to ``superseded/<time>/`` and recomputed):

``simulate``    (only for studies made from anatomy) whole-body pseudo-PET on real CT anatomy, full-dose and
                low-dose (DRF 10) OSEM reconstructions, and a CT carrying a known breathing-like misalignment
``synthesize``  DRMC full-dose estimate from the low-dose PET (+ routing summary)
``segment``     LDOS organs on the low-dose and on the synthesized PET
``uptake``      organ uptake table (volume, SUVmean, SUVmax, SUVpeak) on the synthesized PET
``register``    PET -> CT deformable registration (MIND, instance optimisation), scored against the known field
``report``      metrics (PSNR, SSIM, lesion SUV bias, Dice, registration error), figures and report.md

A study is a dict: ``{"id": ..., "anatomy": "sample" | folder}`` (simulated from real anatomy) or
``{"id": ..., "low_dose": path, "ct": path?, "full_dose": path?, "labels": path?, "lesions": path?}``
(reference images, when given, are used for metrics).

Engine code: no Slicer. The Slicer scene is written by :mod:`PETWorkbenchLib.scene_export` when slicer-core (or
Slicer) is available.
"""

import json
import time
from pathlib import Path

from .errors import InputError
from .paths import resources_dir
from .progress import Reporter

STEPS = ("simulate", "synthesize", "segment", "uptake", "register", "report")
SYNTHESIS_MODEL = "synthesis-drmc-cpu"
SEGMENTATION_MODEL = "segmentation-ldos-cpu"
DEMO_DRF = 10
DEMO_CENTER = "C1"


def sample_anatomy_dir():
    return resources_dir() / "SampleData" / "TotalSegmentatorExampleCT"


def _read(path, what):
    import SimpleITK as sitk
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} not found: {p}")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise InputError(f"{what} {p.name} cannot be read (corrupt or unknown format): "
                         f"{str(e).strip().splitlines()[-1]}") from e
    if img.GetDimension() != 3:
        raise InputError(f"{what} {p.name} is {img.GetDimension()}D; a 3D volume is needed")
    return img


def _write(img, path):
    import SimpleITK as sitk
    tmp = Path(str(path) + ".part.nii.gz")
    sitk.WriteImage(img, str(tmp), True)
    tmp.replace(path)
    return path


class Study:
    """Files of one study in its output folder."""

    def __init__(self, spec, out_root):
        if "id" not in spec or not str(spec["id"]).strip():
            raise InputError(f"Study without an id: {spec}")
        self.spec = dict(spec)
        self.id = str(spec["id"]).strip()
        self.dir = Path(out_root) / self.id
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, name):
        return self.dir / name

    def has(self, *names):
        return all(self.path(n).is_file() for n in names)

    def input(self, key):
        """Path of an input image: given in the spec, or produced by the simulate step."""
        if self.spec.get(key):
            return Path(self.spec[key])
        p = self.path(f"{key}.nii.gz")
        return p if p.is_file() else None


# ----------------------------------------------------------------------------------------------- steps

def _axial_window_on_lesions(anatomy, patient, profile, max_slices):
    """axial_u placing a ``max_slices`` window of the centre grid over the median lesion position, so that
    the demo's short field of view shows lesions (the generator places it at random)."""
    import numpy as np
    ct = anatomy["ct"]
    if not patient["lesions"]:
        return patient["axial_u"]
    d = np.array(ct.GetDirection()).reshape(3, 3)
    c = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in ct.GetSize()]))
    z = np.median([(d.T @ (np.array(L["center_mm"]) - c))[2] for L in patient["lesions"]])
    sp = float(profile["spacing"][2])
    nz_all = int(np.floor(ct.GetSpacing()[2] * ct.GetSize()[2] / sp))
    n = min(nz_all, int(max_slices))
    if n >= nz_all:
        return 0.5
    return float(np.clip(0.5 + z / ((nz_all - n) * sp), 0.0, 1.0))


def step_simulate(st, rep, device="cpu", seed=0, max_slices=64):
    """Pseudo-PET on real anatomy at DRF 10, and the CT with a known breathing-like misalignment."""
    if st.has("full_dose.nii.gz", "low_dose.nii.gz", "ct.nii.gz", "true_field.nii.gz"):
        return {"skipped": True}
    import numpy as np
    import SimpleITK as sitk
    from ReconstructionModuleLib import simulate as sim
    from RegistrationModuleLib.synthetic import body_mask, field_image, known_deformation, warp_with

    anatomy_dir = sample_anatomy_dir() if st.spec.get("anatomy") in ("sample", None, "") else st.spec["anatomy"]
    anatomy = sim.load_body_anatomy(anatomy_dir)
    patient = sim.make_patient(anatomy, seed, f"{st.id}")
    profile = dict(sim.CENTERS[DEMO_CENTER], name=DEMO_CENTER, drf=DEMO_DRF)
    patient["axial_u"] = _axial_window_on_lesions(anatomy, patient, profile, max_slices)
    res = sim.simulate_case(anatomy, patient, profile, "FDG", drfs=(DEMO_DRF,), seed=seed, max_slices=max_slices,
                            device=device, progress=rep.sub(0.0, 0.9))
    im = res["images"]
    ct_aligned = im["ct"]
    body = body_mask(ct_aligned)
    u = known_deformation(ct_aligned, body, amp_si=9.0, amp_ap=3.0, bumps=3, bump_amp=4.0, seed=seed)
    ct_acquired = warp_with(ct_aligned, u, ct_aligned, default=-1000.0)       # CT(x + u(x)): breathing offset
    _write(im["full_dose"], st.path("full_dose.nii.gz"))
    _write(im[f"drf{DEMO_DRF:g}"], st.path("low_dose.nii.gz"))
    _write(im["labels"], st.path("labels.nii.gz"))
    _write(im["lesions"], st.path("lesions.nii.gz"))
    _write(ct_acquired, st.path("ct.nii.gz"))
    _write(field_image(u, ct_aligned), st.path("true_field.nii.gz"))
    vox = float(np.mean(ct_aligned.GetSpacing()))
    mag = np.linalg.norm(u, axis=-1)[body]
    info = {"center": DEMO_CENTER, "drf": DEMO_DRF, "shape": list(im["full_dose"].GetSize()),
            "spacing_mm": list(im["full_dose"].GetSpacing()), "prompts": res["info"].get("prompts"),
            "misalignment_mean_mm": float(mag.mean()), "misalignment_max_mm": float(mag.max()),
            "misalignment_mean_vox": float(mag.mean() / vox),
            "lesions_in_view": int(len(np.unique(sitk.GetArrayViewFromImage(im["lesions"]))) - 1)}
    (st.path("simulation.json")).write_text(json.dumps(info, indent=1))
    rep(1.0, "simulated")
    return info


def step_synthesize(st, rep, device="cpu", model=SYNTHESIS_MODEL):
    if st.has("synthesized.nii.gz", "routing.json"):
        return {"skipped": True}
    from SynthesisModuleLib import synthesize
    model = str(model)
    low = _read(st.input("low_dose") or "", "low-dose PET")
    out, routing = synthesize(low, model, device=device, progress=rep)
    _write(out, st.path("synthesized.nii.gz"))
    st.path("routing.json").write_text(json.dumps(routing, indent=1, default=float))
    return {"model": Path(model).name}


def step_segment(st, rep, device="cpu", model=SEGMENTATION_MODEL):
    if st.has("organs_low.nii.gz", "organs_synth.nii.gz"):
        return {"skipped": True}
    from SegmentationModuleLib import segment
    model = str(model)
    low = _read(st.input("low_dose") or "", "low-dose PET")
    lab, _ = segment(low, model, device=device, progress=rep.sub(0.0, 0.5))
    _write(lab, st.path("organs_low.nii.gz"))
    if st.has("synthesized.nii.gz"):
        syn = _read(st.path("synthesized.nii.gz"), "synthesized PET")
        lab2, _ = segment(syn, model, device=device, progress=rep.sub(0.5, 1.0))
        _write(lab2, st.path("organs_synth.nii.gz"))
    return {"model": Path(str(model)).name}


def step_uptake(st, rep):
    if st.has("uptake.json"):
        return {"skipped": True}
    from SegmentationModuleLib import organ_specs, organ_uptake
    pet_path = st.path("synthesized.nii.gz") if st.has("synthesized.nii.gz") else st.input("low_dose")
    pet = _read(pet_path, "PET")
    labels = _read(st.path("organs_low.nii.gz"), "organ labels")
    rows = organ_uptake(pet, labels, organ_specs())
    full = st.input("full_dose")
    if full is not None:
        ref_rows = {r["name"]: r for r in organ_uptake(_read(full, "full-dose PET"), labels, organ_specs())}
        for r in rows:
            ref = ref_rows.get(r["name"])
            r["suv_mean_full_dose"] = ref["suv_mean"] if ref else None
    st.path("uptake.json").write_text(json.dumps({"pet": Path(pet_path).name, "rows": rows}, indent=1))
    rep(1.0, "uptake done")
    return {"organs": len(rows)}


def step_register(st, rep, device="cpu", iterations=(200, 100, 50), smoothness=2.0, learning_rate=2.0):
    """Moving = synthesized (or low-dose) PET, fixed = CT; multi-modal MIND similarity inside the CT's body mask.

    Settings chosen on a demo study against its known field (mean error in the body, synthesized PET as
    moving; true misalignment 4.3 mm): defaults of the registration module (smoothness 4, step 0.5, 100/60/30
    iterations) 4.98 mm; body mask only 4.0 mm; these settings 3.4 mm. On the current demo patient they give
    3.1 mm against a true 4.4 mm. Far from the diaphragm and organ boundaries PET has no structure to register,
    so part of the field cannot be recovered from PET/CT.
    """
    if st.has("field.nii.gz", "registration.json"):
        return {"skipped": True}
    ct_path = st.input("ct")
    if ct_path is None:
        return {"skipped": True, "reason": "no CT for this study"}
    import SimpleITK as sitk
    from RegistrationModuleLib import register
    ct = _read(ct_path, "CT")
    pet_path = st.path("synthesized.nii.gz") if st.has("synthesized.nii.gz") else st.input("low_dose")
    pet = _read(pet_path, "PET")
    from RegistrationModuleLib.synthetic import body_mask
    body = body_mask(ct)
    mask = sitk.GetImageFromArray(body.astype("uint8"))
    mask.CopyInformation(ct)
    t0 = time.perf_counter()
    res = register(ct, pet, method="instance", similarity="mind", smoothness=smoothness, iterations=tuple(iterations),
                   learning_rate=learning_rate, fixed_mask=mask, prealign="none", device=device, progress=rep)
    summary = dict(res.summary)
    summary["time_s"] = time.perf_counter() - t0
    _write(res.displacement, st.path("field.nii.gz"))
    _write(res.warp(pet), st.path("pet_on_ct.nii.gz"))
    true = st.path("true_field.nii.gz")
    if true.is_file():
        import numpy as np
        u_true = sitk.GetArrayFromImage(sitk.ReadImage(str(true)))
        u = sitk.GetArrayFromImage(res.displacement)
        if u.shape[:3] == u_true.shape[:3]:
            vox = float(np.mean(ct.GetSpacing()))
            summary["disp_true_mm"] = float(np.linalg.norm(u_true, axis=-1)[body].mean())
            summary["disp_err_mm"] = float(np.linalg.norm(u - u_true, axis=-1)[body].mean())
            summary["disp_err_vox"] = summary["disp_err_mm"] / vox
    st.path("registration.json").write_text(json.dumps(summary, indent=1, default=float))
    return {k: summary[k] for k in ("folding_pct", "disp_err_mm") if k in summary}


def compute_metrics(st):
    """PSNR/SSIM/lesion SUV bias against the full dose (when known), Dice against reference labels."""
    import SimpleITK as sitk
    from SegmentationModuleLib import evaluate, organ_specs
    from SynthesisModuleLib.metrics import lesion_suv_bias, psnr, ssim
    m = {}
    full = st.input("full_dose")
    arr = lambda p: sitk.GetArrayFromImage(_read(p, Path(p).name)).astype("float64")  # noqa: E731
    if full is not None and st.has("synthesized.nii.gz"):
        f, lo, sy = arr(full), arr(st.input("low_dose")), arr(st.path("synthesized.nii.gz"))
        m["psnr_low"], m["psnr_synth"] = psnr(lo, f), psnr(sy, f)
        m["ssim_low"], m["ssim_synth"] = ssim(lo, f), ssim(sy, f)
        les = st.input("lesions")
        if les is not None:
            L = arr(les)
            for key, img in (("low", lo), ("synth", sy)):
                m[f"suvmean_bias_{key}"], m[f"suvmax_bias_{key}"], _ = lesion_suv_bias(img, f, L)
    ref = st.input("labels")
    if ref is not None:
        for key, name in (("dice_low", "organs_low.nii.gz"), ("dice_synth", "organs_synth.nii.gz")):
            if st.has(name):
                ev = evaluate(_read(st.path(name), name), _read(ref, "reference labels"), organ_specs())
                m[key] = ev["mean"].get("dice")
                m[key.replace("dice", "organs")] = {k: v.get("dice") for k, v in ev["organs"].items()
                                                    if v.get("status") != "missing"}
    if st.has("registration.json"):
        r = json.loads(st.path("registration.json").read_text())
        for k in ("folding_pct", "std_log_j", "disp_true_mm", "disp_err_mm", "disp_err_vox", "time_s"):
            if k in r:
                m[f"reg_{k}"] = r[k]
    return m


def step_report(st, rep):
    from .report import write_report
    metrics = compute_metrics(st)
    st.path("metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    write_report(st, metrics)
    rep(1.0, "report written")
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


# outputs that depend on each model family (the report and scene read them all)
_REPORT_FILES = ("metrics.json", "report.md", "fig_slices.png", "fig_organs.png", "fig_routing.png", "scene")
MODEL_OUTPUTS = {
    "synthesis": ("synthesized.nii.gz", "routing.json", "organs_synth.nii.gz", "uptake.json", "field.nii.gz",
                  "pet_on_ct.nii.gz", "registration.json") + _REPORT_FILES,
    "segmentation": ("organs_low.nii.gz", "organs_synth.nii.gz", "uptake.json") + _REPORT_FILES,
}


def model_fingerprint(model):
    """'<id or file name>@<first 16 hex digits of the weights' SHA-256>' of a registered model id or a file."""
    model = str(model)
    path = Path(model)
    if path.is_file():
        from .models import sha256_of
        return f"{path.name}@{sha256_of(path)[:16]}"
    from .models import get
    try:
        return f"{model}@{get(model).sha256[:16]}"
    except Exception:  # noqa: BLE001 - an unknown id fails later with the model loader's message
        return model


def _supersede_stale_outputs(st, fingerprints):
    """Move the outputs made with other model weights than ``fingerprints`` into ``superseded/<time>/`` (never
    deleted) so that they are recomputed. Returns the families whose weights changed."""
    import shutil
    record = st.path("models.json")
    before = json.loads(record.read_text()) if record.is_file() else None
    changed = []
    if before is not None:
        changed = [fam for fam, fp in fingerprints.items() if before.get(fam) not in (None, fp)]
    elif st.has("DONE.json"):  # a run from before fingerprints were recorded: weights unknown
        changed = list(fingerprints)
    names = sorted({n for fam in changed for n in MODEL_OUTPUTS[fam] if st.path(n).exists()})
    if names:
        dest = st.path("superseded") / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.move(str(st.path(n)), str(dest / n))
    if changed and st.path("DONE.json").is_file():
        st.path("DONE.json").unlink()
    record.write_text(json.dumps(fingerprints, indent=1))
    return changed


def run_study(spec, out_root, steps=None, device="cpu", seed=0, models=None, progress=None, cancel=None):
    """Run the requested steps (default: all that apply) for one study. Returns a summary dict; a study that
    finished has ``<out>/<id>/DONE.json`` and is skipped on the next run. ``models`` overrides the model ids or
    weights files: {"synthesis": ..., "segmentation": ...}."""
    models = dict(models or {})
    rep = Reporter(progress, cancel)
    st = Study(spec, out_root)
    done = st.path("DONE.json")
    wanted = [s for s in (steps or STEPS) if s in STEPS]
    unknown = [s for s in (steps or []) if s not in STEPS]
    if unknown:
        raise InputError(f"Unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    fingerprints = {"synthesis": model_fingerprint(models.get("synthesis", SYNTHESIS_MODEL)),
                    "segmentation": model_fingerprint(models.get("segmentation", SEGMENTATION_MODEL))}
    _supersede_stale_outputs(st, fingerprints)
    if done.is_file() and set(wanted) <= set(json.loads(done.read_text()).get("steps", [])):
        return dict(json.loads(done.read_text()), skipped=True)
    simulated = bool(st.spec.get("anatomy")) or not st.spec.get("low_dose")
    if "simulate" in wanted and not simulated:
        wanted.remove("simulate")
    if "low_dose" in st.spec and "simulate" not in wanted:
        _read(st.spec["low_dose"], "low-dose PET")          # fail early on unreadable input
    t0 = time.perf_counter()
    results = {}
    runners = {"simulate": lambda r: step_simulate(st, r, device, seed),
               "synthesize": lambda r: step_synthesize(st, r, device, models.get("synthesis", SYNTHESIS_MODEL)),
               "segment": lambda r: step_segment(st, r, device, models.get("segmentation", SEGMENTATION_MODEL)),
               "uptake": lambda r: step_uptake(st, r),
               "register": lambda r: step_register(st, r, device),
               "report": lambda r: step_report(st, r)}
    for i, name in enumerate(wanted):
        sub = rep.sub(i / len(wanted), (i + 1) / len(wanted))
        sub(0.0, f"{st.id}: {name}")
        results[name] = runners[name](sub)
    summary = {"id": st.id, "steps": wanted, "seconds": round(time.perf_counter() - t0, 1), "results": results,
               "dir": str(st.dir), "models": fingerprints}
    if st.has("metrics.json"):
        summary["metrics"] = {k: v for k, v in json.loads(st.path("metrics.json").read_text()).items()
                              if not isinstance(v, dict)}
    done.write_text(json.dumps(summary, indent=1, default=float))
    rep(1.0, f"{st.id}: done")
    return summary
