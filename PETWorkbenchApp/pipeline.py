"""The main job, end to end, for one study: low-dose PET in; full-dose estimate, organs, uptake and alignment out.

Steps (each writes into ``<out>/<study id>/`` and can be run alone; a step whose outputs exist is not redone,
unless they were made with other model weights, synthesis settings or PET -> CT settings: ``models.json`` records
the weights' checksums with the synthesis settings and a fingerprint of the registration settings, and outputs of
older ones are moved to ``superseded/<time>/`` and recomputed):

``simulate``    (only for studies made from anatomy) whole-body pseudo-PET on real CT anatomy, full-dose and
                low-dose (DRF 10) OSEM reconstructions, and a CT carrying a known breathing-like misalignment
``synthesize``  DRMC full-dose estimate from the low-dose PET (+ routing summary) and the lesion-change report
                (hot spots of the input and what the network did to them; SynthesisModuleLib.lesions)
``segment``     LDOS organs on the low-dose and on the synthesized PET (the lesion-change report is redone with
                PERCIST's liver threshold once the liver is segmented)
``uptake``      organ uptake table (volume, SUVmean, SUVmax, SUVpeak) on the synthesized PET
``register``    PET -> CT deformable registration (instance optimisation, LNCC against the CT mapped to the PET's
                intensities locally), scored against the known field
``report``      metrics (PSNR, SSIM, lesion SUV bias, Dice, registration error), figures and report.md

A study is a dict: ``{"id": ..., "anatomy": "sample" | folder}`` (simulated from real anatomy) or
``{"id": ..., "low_dose": path, "ct": path?, "full_dose": path?, "labels": path?, "lesions": path?}``
(reference images, when given, are used for metrics). The PET inputs (``low_dose``, ``full_dose``) are image files in
SUV or folders holding a PET DICOM series (SUV from its tags, :func:`PETWorkbenchLib.dicom.read_pet`).

Engine code: no Slicer. The Slicer scene is written by :mod:`PETWorkbenchSlicer.scene_export` when slicer-core (or
Slicer) is available.
"""

import json
import re
import time
from pathlib import Path

from PETWorkbenchLib.errors import InputError, ResourceError, os_error_reason
from PETWorkbenchLib.imageio import read_image
from PETWorkbenchLib.paths import resources_dir
from PETWorkbenchLib.progress import Reporter

STEPS = ("simulate", "synthesize", "segment", "uptake", "register", "report")
INPUT_KEYS = ("low_dose", "ct", "full_dose", "labels", "lesions")
DEMO_DRF = 10
DEMO_CENTER = "C1"


def sample_anatomy_dir():
    return resources_dir() / "SampleData" / "TotalSegmentatorExampleCT"


SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_steps(steps):
    """Refuse unknown step names (before anything is written)."""
    unknown = [s for s in (steps or []) if s not in STEPS]
    if unknown:
        raise InputError(f"Unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    return steps


def check_study_id(study_id):
    """A study id is a folder name inside the output folder: letters, digits, '.', '_', '-', never a path."""
    sid = "" if study_id is None else str(study_id).strip()
    if not sid:
        raise InputError("A study has no id; give each study a name (letters, digits, '.', '_', '-')")
    if not SAFE_ID.match(sid) or ".." in sid:
        raise InputError(f"Study id {sid!r} is not a safe folder name: use letters, digits, '.', '_' and '-' "
                         "(at most 100 characters, no '/', no '..')")
    return sid


class Study:
    """Files of one study in its output folder. Inputs named in the spec are never written over."""

    def __init__(self, spec, out_root):
        self.spec = dict(spec)
        self.id = check_study_id(spec.get("id"))
        self.dir = Path(out_root) / self.id
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResourceError(f"Cannot create the study folder {self.dir}: {os_error_reason(e)}") from None

    def path(self, name):
        return self.dir / name

    def has(self, *names):
        return all(self.path(n).is_file() for n in names)

    def has_valid(self, *names):
        """True when every file exists, and every JSON record among them reads (a damaged one is redone)."""
        for n in names:
            p = self.path(n)
            if not p.is_file():
                return False
            if n.endswith(".json"):
                try:
                    json.loads(p.read_text())
                except (OSError, ValueError):
                    return False
        return True

    def input(self, key):
        """Path of an input image: given in the spec, or produced by the simulate step."""
        if self.spec.get(key):
            return Path(self.spec[key])
        p = self.path(f"{key}.nii.gz")
        return p if p.is_file() else None

    def inputs(self):
        return [self.spec[k] for k in INPUT_KEYS if self.spec.get(k)]

    def read_pet(self, key, what):
        """A PET input (``low_dose``, ``full_dose``) in SUV: an image file, or a PET DICOM series."""
        from PETWorkbenchLib.dicom import read_pet
        return read_pet(self.input(key), what)[0]

    def write_image(self, img, name):
        from PETWorkbenchLib.imageio import write_image
        return write_image(img, self.path(name), inputs=self.inputs())

    def write_json(self, obj, name):
        from PETWorkbenchLib.imageio import write_json
        return write_json(obj, self.path(name), inputs=self.inputs())


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
    st.write_image(im["full_dose"], "full_dose.nii.gz")
    st.write_image(im[f"drf{DEMO_DRF:g}"], "low_dose.nii.gz")
    st.write_image(im["labels"], "labels.nii.gz")
    st.write_image(im["lesions"], "lesions.nii.gz")
    st.write_image(ct_acquired, "ct.nii.gz")
    st.write_image(field_image(u, ct_aligned), "true_field.nii.gz")
    vox = float(np.mean(ct_aligned.GetSpacing()))
    mag = np.linalg.norm(u, axis=-1)[body]
    info = {"center": DEMO_CENTER, "drf": DEMO_DRF, "shape": list(im["full_dose"].GetSize()),
            "spacing_mm": list(im["full_dose"].GetSpacing()), "prompts": res["info"].get("prompts"),
            "misalignment_mean_mm": float(mag.mean()), "misalignment_max_mm": float(mag.max()),
            "misalignment_mean_vox": float(mag.mean() / vox),
            "lesions_in_view": int(len(np.unique(sitk.GetArrayViewFromImage(im["lesions"]))) - 1)}
    st.write_json(info, "simulation.json")
    rep(1.0, "simulated")
    return info


def step_synthesize(st, rep, device="cpu", model=None):
    if st.has_valid("synthesized.nii.gz", "routing.json"):
        return {"skipped": True}
    from PETWorkbenchLib.models import default_model
    from SynthesisModuleLib import synthesize
    model = str(model or default_model("synthesis"))
    low = st.read_pet("low_dose", "low-dose PET")
    out, routing = synthesize(low, model, device=device, progress=rep)
    # the lesion report looks up the model's lesion calibration by it (a registry id, or the weights' absolute
    # path) and checks that it belongs to the weights that made this image
    from PETWorkbenchLib.models import registered_entry
    routing["model_id"] = str(Path(model).resolve()) if Path(model).is_file() else model
    entry = registered_entry(model)
    routing["weights_sha256"] = entry.sha256 if entry is not None else None
    st.write_image(out, "synthesized.nii.gz")
    st.write_json(routing, "routing.json")
    report = write_lesion_report(st, low, out)
    return {"model": Path(model).name, "hot_spots": report["n_hot_spots"], "flagged": report["n_flagged"]}


def write_lesion_report(st, low=None, synthesized=None):
    """lesion_changes.json / .csv of the study: hot spots of the low-dose input and their change in the synthesized
    PET, with PERCIST's liver threshold when a liver is known (segmented on the low dose, else the reference
    labels), else the fixed threshold; flattening flags from the lesion calibration of the weights routing.json
    names (the ones that made the synthesized image)."""
    from PETWorkbenchLib.imageio import write_csv
    from SynthesisModuleLib.lesions import liver_from_labels, lesion_change_report, model_calibration, report_rows
    routing = json.loads(st.path("routing.json").read_text()) if st.has("routing.json") else {}
    model, sha = routing.get("model_id"), routing.get("weights_sha256")
    low = low if low is not None else st.read_pet("low_dose", "low-dose PET")
    synthesized = synthesized if synthesized is not None else read_image(st.path("synthesized.nii.gz"),
                                                                          "synthesized PET")
    liver, source = None, None
    for name, path in (("organs segmented on the low dose", st.path("organs_low.nii.gz")),
                       ("reference labels", st.input("labels"))):
        if path is not None and Path(path).is_file():
            liver = liver_from_labels(read_image(path, name), low, min_voxels=10)
            if liver is not None:
                source = name
                break
    report = lesion_change_report(low, synthesized, liver_mask=liver,
                                  calibration=model_calibration(model, sha) if model else None)
    report["threshold"]["liver_from"] = source
    st.write_json(report, "lesion_changes.json")
    rows = report_rows(report)
    if rows:
        write_csv(rows, st.path("lesion_changes.csv"), inputs=st.inputs())
    return report


def step_segment(st, rep, device="cpu", model=None):
    if st.has("organs_low.nii.gz", "organs_synth.nii.gz"):
        return {"skipped": True}
    from PETWorkbenchLib.models import default_model
    from SegmentationModuleLib import segment
    model = str(model or default_model("segmentation"))
    low = st.read_pet("low_dose", "low-dose PET")
    lab, _ = segment(low, model, device=device, progress=rep.sub(0.0, 0.5))
    st.write_image(lab, "organs_low.nii.gz")
    if st.has("synthesized.nii.gz"):
        syn = read_image(st.path("synthesized.nii.gz"), "synthesized PET")
        lab2, _ = segment(syn, model, device=device, progress=rep.sub(0.5, 1.0))
        st.write_image(lab2, "organs_synth.nii.gz")
        write_lesion_report(st)  # now with the segmented liver (PERCIST threshold)
    return {"model": Path(str(model)).name}


def step_uptake(st, rep):
    if st.has_valid("uptake.json"):
        return {"skipped": True}
    from SegmentationModuleLib import organ_specs, organ_uptake
    synthesized = st.has("synthesized.nii.gz")
    pet_path = st.path("synthesized.nii.gz") if synthesized else st.input("low_dose")
    pet = read_image(pet_path, "PET") if synthesized else st.read_pet("low_dose", "PET")
    labels = read_image(st.path("organs_low.nii.gz"), "organ labels")
    rows = organ_uptake(pet, labels, organ_specs())
    full = st.input("full_dose")
    if full is not None:
        ref_rows = {r["name"]: r for r in organ_uptake(st.read_pet("full_dose", "full-dose PET"), labels,
                                                       organ_specs())}
        for r in rows:
            ref = ref_rows.get(r["name"])
            r["suv_mean_full_dose"] = ref["suv_mean"] if ref else None
    st.write_json({"pet": Path(pet_path).name, "rows": rows}, "uptake.json")
    rep(1.0, "uptake done")
    return {"organs": len(rows)}


def step_register(st, rep, device="cpu"):
    """Moving = synthesized (or low-dose) PET, fixed = CT mapped to the PET's intensities locally; LNCC inside the
    CT's body mask (``RegistrationModuleLib.petct``, whose METHOD.md §5 says how its settings were chosen)."""
    if st.has_valid("field.nii.gz", "registration.json"):
        return {"skipped": True}
    ct_path = st.input("ct")
    if ct_path is None:
        return {"skipped": True, "reason": "no CT for this study"}
    import SimpleITK as sitk
    ct = read_image(ct_path, "CT")
    if st.has("synthesized.nii.gz"):
        pet = read_image(st.path("synthesized.nii.gz"), "PET")
    else:
        pet = st.read_pet("low_dose", "PET")
    from RegistrationModuleLib.petct import register_pet_to_ct
    from RegistrationModuleLib.synthetic import body_mask
    body = body_mask(ct)                                 # passed on, and kept to score against a known field
    t0 = time.perf_counter()
    res = register_pet_to_ct(ct, pet, body, device=device, progress=rep)
    summary = dict(res.summary)
    summary["time_s"] = time.perf_counter() - t0
    st.write_image(res.displacement, "field.nii.gz")
    st.write_image(res.warp(pet), "pet_on_ct.nii.gz")
    true = st.path("true_field.nii.gz")
    if true.is_file():
        import numpy as np
        u_true = sitk.GetArrayFromImage(read_image(true, "true field"))
        u = sitk.GetArrayFromImage(res.displacement)
        if u.shape[:3] == u_true.shape[:3]:
            vox = float(np.mean(ct.GetSpacing()))
            summary["disp_true_mm"] = float(np.linalg.norm(u_true, axis=-1)[body].mean())
            summary["disp_err_mm"] = float(np.linalg.norm(u - u_true, axis=-1)[body].mean())
            summary["disp_err_vox"] = summary["disp_err_mm"] / vox
    st.write_json(summary, "registration.json")
    return {k: summary[k] for k in ("folding_pct", "disp_err_mm") if k in summary}


def compute_metrics(st):
    """PSNR/SSIM/lesion SUV bias against the full dose (when known), Dice against reference labels."""
    import SimpleITK as sitk
    from SegmentationModuleLib import evaluate, organ_specs
    from SynthesisModuleLib.metrics import lesion_suv_bias, psnr, ssim
    m = {}
    full = st.input("full_dose")
    arr = sitk.GetArrayFromImage
    if full is not None and st.has("synthesized.nii.gz"):
        from PETWorkbenchLib.imageio import match_grid
        full_img = st.read_pet("full_dose", "full-dose PET")
        on_full = lambda img, what: match_grid(img, full_img, f"the {what}", "the full-dose PET")
        f = arr(full_img).astype("float64")
        lo = arr(on_full(st.read_pet("low_dose", "low-dose PET"), "low-dose PET")).astype("float64")
        sy = arr(on_full(read_image(st.path("synthesized.nii.gz"), "synthesized PET"), "synthesized PET")
                 ).astype("float64")
        m["psnr_low"], m["psnr_synth"] = psnr(lo, f), psnr(sy, f)
        m["ssim_low"], m["ssim_synth"] = ssim(lo, f), ssim(sy, f)
        les = st.input("lesions")
        if les is not None:
            L = arr(on_full(read_image(les, "lesion labels"), "lesion labels")).astype("float64")
            for key, img in (("low", lo), ("synth", sy)):
                m[f"suvmean_bias_{key}"], m[f"suvmax_bias_{key}"], _ = lesion_suv_bias(img, f, L)
    ref = st.input("labels")
    if ref is not None:
        for key, name in (("dice_low", "organs_low.nii.gz"), ("dice_synth", "organs_synth.nii.gz")):
            if st.has(name):
                ev = evaluate(read_image(st.path(name), name), read_image(ref, "reference labels"), organ_specs())
                m[key] = ev["mean"].get("dice")
                m[key.replace("dice", "organs")] = {k: v.get("dice") for k, v in ev["organs"].items()
                                                    if v.get("status") != "missing"}
    if st.has_valid("registration.json"):
        r = json.loads(st.path("registration.json").read_text())
        for k in ("folding_pct", "std_log_j", "disp_true_mm", "disp_err_mm", "disp_err_vox", "time_s"):
            if k in r:
                m[f"reg_{k}"] = r[k]
    return m


def step_report(st, rep):
    from .report import write_report
    metrics = compute_metrics(st)
    st.write_json(metrics, "metrics.json")
    write_report(st, metrics)
    rep(1.0, "report written")
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


# outputs that depend on each model family (the report and scene read them all)
_REPORT_FILES = ("metrics.json", "report.md", "fig_slices.png", "fig_organs.png", "fig_routing.png", "scene")
MODEL_OUTPUTS = {
    "synthesis": ("synthesized.nii.gz", "routing.json", "lesion_changes.json", "lesion_changes.csv",
                  "organs_synth.nii.gz", "uptake.json", "field.nii.gz",
                  "pet_on_ct.nii.gz", "registration.json") + _REPORT_FILES,
    "segmentation": ("organs_low.nii.gz", "organs_synth.nii.gz", "uptake.json", "lesion_changes.json",
                     "lesion_changes.csv") + _REPORT_FILES,
    "registration": ("field.nii.gz", "pet_on_ct.nii.gz", "registration.json") + _REPORT_FILES,
}


def registration_fingerprint():
    """'pet-ct@<16 hex digits>' of the main job's PET -> CT settings (``RegistrationModuleLib.petct``: the
    registration, the CT smoothing and mapping), so that a study registered with other settings is registered
    again, like outputs of other model weights."""
    from RegistrationModuleLib import petct
    return petct.fingerprint()


def synthesis_fingerprint(model):
    """The synthesis model's fingerprint plus the inference settings the main job synthesizes with (synthesize()'s
    defaults: overlap, blending width, precision, windows over the body's bounding box only), so that a study
    synthesized with other settings is synthesized again (and everything made from its synthesized PET), like
    outputs of other model weights."""
    from SynthesisModuleLib import BLEND_SIGMA, DEFAULT_OVERLAP, DEFAULT_PRECISION
    return f"{model_fingerprint(model)}+overlap={DEFAULT_OVERLAP:g},sigma={BLEND_SIGMA:g},{DEFAULT_PRECISION},body-box"


def model_fingerprint(model):
    """'<id or file name>@<first 16 hex digits of the weights' SHA-256>' of a registered model id or a file."""
    model = str(model)
    path = Path(model)
    if path.is_file():
        from PETWorkbenchLib.models import sha256_of
        return f"{path.name}@{sha256_of(path)[:16]}"
    from PETWorkbenchLib.models import get
    try:
        return f"{model}@{get(model).sha256[:16]}"
    except Exception:  # noqa: BLE001 - an unknown id fails later with the model loader's message
        return model


def input_fingerprints(st, seed):
    """What the study's results depend on besides the models: each input image's SHA-256 (content, not path), or
    the anatomy and seed of a simulated study."""
    from PETWorkbenchLib.dicom import is_pet_dicom_input, series_fingerprint
    from PETWorkbenchLib.models import sha256_of
    if st.spec.get("low_dose"):
        fp = {}
        for k in INPUT_KEYS:
            if st.spec.get(k):
                p = Path(st.spec[k])
                fp[k] = (sha256_of(p)[:32] if p.is_file() else series_fingerprint(p)[:32] if is_pet_dicom_input(p)
                         else "missing")
        return fp
    return {"anatomy": str(st.spec.get("anatomy") or "sample"), "seed": int(seed)}


_RECORDS = ("models.json", "inputs.json", "FAILED.json", "superseded")


def _supersede_stale_outputs(st, fingerprints, inputs=None):
    """Move the outputs made with other model weights, synthesis or registration settings than ``fingerprints`` (or
    from other ``inputs``) into ``superseded/<time>/`` (never deleted) so that they are recomputed. Returns what
    changed."""
    import shutil
    from PETWorkbenchLib.imageio import write_json

    def previous(name):
        p = st.path(name)
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return {}                                  # unreadable record: treat everything as changed
    before_models, before_inputs = previous("models.json"), previous("inputs.json")
    had_results = st.has("DONE.json") or any(st.path(n).exists() for fam in MODEL_OUTPUTS for n in MODEL_OUTPUTS[fam])
    changed = []
    if before_models is not None:   # a family not recorded but with outputs present: made by unknown settings
        changed = [fam for fam, fp in fingerprints.items() if before_models.get(fam) != fp and (
            before_models.get(fam) is not None or any(st.path(n).exists() for n in MODEL_OUTPUTS[fam]))]
    elif st.has("DONE.json"):  # a run from before fingerprints were recorded: weights unknown
        changed = list(fingerprints)
    if inputs is None:
        inputs_changed = False
    else:
        inputs_changed = (before_inputs != inputs) if before_inputs is not None else had_results
    protected = {Path(p).resolve() for p in st.inputs()}
    if inputs_changed:
        names = sorted(p.name for p in st.dir.iterdir() if p.name not in _RECORDS and p.resolve() not in protected
                       and not p.name.startswith("."))
    else:
        names = sorted({n for fam in changed for n in MODEL_OUTPUTS[fam] if st.path(n).exists()})
    if names:
        dest = st.path("superseded") / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.move(str(st.path(n)), str(dest / n))
    if (changed or inputs_changed) and st.path("DONE.json").is_file():
        st.path("DONE.json").unlink()
    if before_models != fingerprints:
        write_json(fingerprints, st.path("models.json"))
    if inputs is not None and before_inputs != inputs:
        write_json(inputs, st.path("inputs.json"))
    return changed + (["inputs"] if inputs_changed else [])


def run_study(spec, out_root, steps=None, device="cpu", seed=0, models=None, progress=None, cancel=None):
    """Run the requested steps (default: all that apply) for one study. Returns a summary dict; a study that
    finished has ``<out>/<id>/DONE.json`` and is skipped on the next run. ``models`` overrides the model ids or
    weights files: {"synthesis": ..., "segmentation": ...}."""
    models = dict(models or {})
    rep = Reporter(progress, cancel)
    check_steps(steps)
    st = Study(spec, out_root)
    done = st.path("DONE.json")
    wanted = [s for s in (steps or STEPS) if s in STEPS]
    from PETWorkbenchLib.models import default_model
    for family in ("synthesis", "segmentation"):
        models[family] = models.get(family) or default_model(family)
    fingerprints = {"synthesis": synthesis_fingerprint(models["synthesis"]),
                    "segmentation": model_fingerprint(models["segmentation"]),
                    "registration": registration_fingerprint()}
    if not st.spec.get("low_dose") and not st.spec.get("anatomy"):
        raise InputError(f"Study {st.id} names no low_dose PET (and no anatomy to simulate from)")
    _supersede_stale_outputs(st, fingerprints, input_fingerprints(st, seed))
    try:
        finished = json.loads(done.read_text()) if done.is_file() else None
    except (OSError, ValueError):
        finished = None                                  # a damaged DONE.json: run again
    if finished and set(wanted) <= set(finished.get("steps", [])):
        return dict(finished, skipped=True)
    simulated = not st.spec.get("low_dose")
    if "simulate" in wanted and not simulated:
        wanted.remove("simulate")
    if "low_dose" in st.spec and "simulate" not in wanted:
        st.read_pet("low_dose", "low-dose PET")                    # fail early on unreadable input
    t0 = time.perf_counter()
    results = {}
    runners = {"simulate": lambda r: step_simulate(st, r, device, seed),
               "synthesize": lambda r: step_synthesize(st, r, device, models["synthesis"]),
               "segment": lambda r: step_segment(st, r, device, models["segmentation"]),
               "uptake": lambda r: step_uptake(st, r),
               "register": lambda r: step_register(st, r, device),
               "report": lambda r: step_report(st, r)}
    for i, name in enumerate(wanted):
        sub = rep.sub(i / len(wanted), (i + 1) / len(wanted))
        sub(0.0, f"{st.id}: {name}")
        results[name] = runners[name](sub)
    summary = {"id": st.id, "steps": wanted, "seconds": round(time.perf_counter() - t0, 1), "results": results,
               "dir": str(st.dir), "models": fingerprints}
    if st.has_valid("metrics.json"):
        summary["metrics"] = {k: v for k, v in json.loads(st.path("metrics.json").read_text()).items()
                              if not isinstance(v, dict)}
    from PETWorkbenchLib.imageio import write_json
    write_json(summary, done)
    rep(1.0, f"{st.id}: done")
    return summary
