"""The main job's plumbing: batch resume and failure isolation, the Dask path, the Slicer scene round trip.

Uses tiny untrained models (built from the engines' own configs) so that the tests check the pipeline, not the
models' quality (that is the benchmarks' job).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def _study_images(folder, seed, corrupt=False):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arr = np.full((20, 24, 24), 0.3, np.float32)
    arr[6:14, 8:16, 8:16] = 2.0 + seed
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((4.0, 4.0, 4.0))
    low = sitk.GetImageFromArray((rng.poisson(arr * 10) / 10).astype(np.float32))
    low.CopyInformation(img)
    sitk.WriteImage(img, str(folder / "full_dose.nii.gz"))
    if corrupt:
        (folder / "low_dose.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    else:
        sitk.WriteImage(low, str(folder / "low_dose.nii.gz"))


STEPS = ["synthesize", "segment", "uptake", "report"]


@pytest.fixture
def three_studies(tmp_path):
    root = tmp_path / "studies"
    for i, name in enumerate(["s1", "s2_corrupt", "s3"]):
        _study_images(root / name, i, corrupt=(name == "s2_corrupt"))
    return root


def test_batch_failure_isolated_and_resumable(three_studies, tmp_path, tiny_models):
    from PETWorkbenchApp.batch import format_table, load_studies, run_batch
    studies = load_studies(three_studies)
    assert [s["id"] for s in studies] == ["s1", "s2_corrupt", "s3"]
    out = tmp_path / "out"
    summary = run_batch(studies, out, steps=STEPS, models=tiny_models)
    status = {r["id"]: r["status"] for r in summary["studies"]}
    assert status == {"s1": "done", "s2_corrupt": "failed", "s3": "done"}
    failed = json.loads((out / "s2_corrupt" / "FAILED.json").read_text())
    assert "low_dose.nii.gz" in failed["error"] and "cannot be read" in failed["error"]
    for sid in ("s1", "s3"):
        d = out / sid
        assert (d / "DONE.json").is_file() and (d / "report.md").is_file()
        assert (d / "synthesized.nii.gz").is_file() and (d / "uptake.json").is_file()
        assert "psnr_low" in json.loads((d / "metrics.json").read_text())
        routing = json.loads((d / "routing.json").read_text())   # the weights that made the image, for the report
        assert Path(routing["model_id"]).is_absolute() and routing["weights_sha256"] is None   # unregistered
        if (d / "lesion_changes.json").is_file():
            assert "no lesion calibration" in json.loads((d / "lesion_changes.json").read_text())["rule"]
    table = format_table(summary)
    assert "failed" in table and "s2_corrupt" in table
    mtime = (out / "s1" / "synthesized.nii.gz").stat().st_mtime_ns
    again = run_batch(studies, out, steps=STEPS, models=tiny_models)
    status = {r["id"]: r["status"] for r in again["studies"]}
    assert status == {"s1": "skipped", "s2_corrupt": "failed", "s3": "skipped"}
    assert (out / "s1" / "synthesized.nii.gz").stat().st_mtime_ns == mtime


def test_batch_csv_errors(tmp_path):
    from PETWorkbenchApp.batch import load_studies
    from PETWorkbenchLib.errors import InputError
    p = tmp_path / "list.csv"
    p.write_text("name,low_dose\na,x.nii.gz\n")
    with pytest.raises(InputError, match="needs an 'id' column"):
        load_studies(p)
    p.write_text("id,low_dose\na,x.nii.gz\na,y.nii.gz\n")
    with pytest.raises(InputError, match="Duplicate study ids: a"):
        load_studies(p)
    with pytest.raises(InputError, match="not found"):
        load_studies(tmp_path / "nope")


def test_distributed_matches_local(three_studies, tmp_path, tiny_models):
    pytest.importorskip("dask.distributed")
    from PETWorkbenchApp.batch import load_studies, run_batch
    studies = [s for s in load_studies(three_studies) if s["id"] != "s2_corrupt"]
    steps = ["synthesize", "segment", "uptake"]
    local = run_batch(studies, tmp_path / "local", steps=steps, models=tiny_models)
    dist = run_batch(studies, tmp_path / "dist", steps=steps, models=tiny_models, scheduler="local:2")
    assert [r["status"] for r in local["studies"]] == [r["status"] for r in dist["studies"]] == ["done", "done"]
    for s in studies:
        for name in ("synthesized.nii.gz", "organs_low.nii.gz"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local" / s["id"] / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "dist" / s["id"] / name)))
            assert np.allclose(a, b, atol=1e-5), name
        ua = json.loads((tmp_path / "local" / s["id"] / "uptake.json").read_text())["rows"]
        ub = json.loads((tmp_path / "dist" / s["id"] / "uptake.json").read_text())["rows"]
        assert [r["name"] for r in ua] == [r["name"] for r in ub]


def _fake_study(d):
    """A study folder as the pipeline writes it (small images, organs, uptake, field)."""
    d.mkdir(parents=True)
    ref = sitk.Image(24, 20, 16, sitk.sitkFloat32)
    ref.SetSpacing((4.0, 4.0, 5.0))
    ref.SetOrigin((-40.0, -30.0, 10.0))
    arr = np.zeros((16, 20, 24), np.float32)
    arr[4:12, 5:15, 6:18] = 2.0
    for name, scale in (("ct", 100.0), ("low_dose", 1.0), ("synthesized", 1.1), ("full_dose", 1.2)):
        im = sitk.GetImageFromArray(arr * scale)
        im.CopyInformation(ref)
        sitk.WriteImage(im, str(d / f"{name}.nii.gz"))
    lab = np.zeros(arr.shape, np.uint8)
    lab[4:12, 5:10, 6:18] = 14
    lab[4:12, 10:15, 6:18] = 1
    li = sitk.GetImageFromArray(lab)
    li.CopyInformation(ref)
    sitk.WriteImage(li, str(d / "organs_low.nii.gz"))
    rows = [{"name": "spleen", "value": 1, "volume_ml": 48.0, "suv_mean": 2.2, "suv_max": 2.2, "suv_peak": 2.2},
            {"name": "liver", "value": 14, "volume_ml": 48.0, "suv_mean": 2.2, "suv_max": 2.2, "suv_peak": None}]
    (d / "uptake.json").write_text(json.dumps({"pet": "synthesized.nii.gz", "rows": rows}))
    u = np.zeros(arr.shape + (3,))
    u[..., 2] = 3.0
    f = sitk.GetImageFromArray(u, isVector=True)
    f.CopyInformation(ref)
    sitk.WriteImage(f, str(d / "field.nii.gz"))
    return arr, lab


def test_scene_file_loads_back_with_references(tmp_path, mrml):
    from PETWorkbenchSlicer import mrml as bridge
    from PETWorkbenchSlicer.scene_export import load_scene, write_study_scene
    arr, lab = _fake_study(tmp_path / "study")
    path, ids = write_study_scene(tmp_path / "study")
    assert Path(path).is_file() and {"ct", "low_dose", "synthesized", "organs", "uptake", "transform"} <= set(ids)
    scene = load_scene(path)
    vols = {scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName(): scene.GetNthNodeByClass(
        i, "vtkMRMLScalarVolumeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))}
    assert {"CT", "PET low dose", "PET DRMC synthesized", "PET full dose"} <= set(vols)
    back = sitk.GetArrayFromImage(bridge.volume_to_image(vols["PET low dose"]))
    assert np.allclose(back, arr)
    seg = scene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    names = {seg.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(seg.GetSegmentation().GetNumberOfSegments())}
    assert names == {"spleen", "liver"}
    assert seg.GetNodeReference("PETWorkbench.input").GetName() == "PET low dose"
    table = seg.GetNodeReference("PETWorkbench.uptakeTable")
    assert table is not None and table.GetTable().GetNumberOfRows() == 2
    t = scene.GetFirstNodeByClass("vtkMRMLGridTransformNode")
    assert t.GetNodeReference("fixedVolume").GetName() == "CT"
    assert t.GetNodeReference("movingVolume").GetName() == "PET DRMC synthesized"
    p = np.array([[-10.0, -10.0, 30.0]])
    moved = bridge.transform_points_ras(t, p)
    assert np.allclose(moved - p, [[0, 0, 3.0]], atol=1e-3)


def test_outputs_of_other_model_weights_are_superseded_not_reused(tmp_path):
    from PETWorkbenchApp.pipeline import Study, _supersede_stale_outputs, model_fingerprint
    w1, w2 = tmp_path / "a.pt", tmp_path / "b.pt"
    w1.write_bytes(b"weights one")
    w2.write_bytes(b"weights two")
    assert model_fingerprint(w1) != model_fingerprint(w2)
    assert model_fingerprint("synthesis-drmc-cpu").startswith("synthesis-drmc-cpu@")
    st = Study({"id": "s1"}, tmp_path / "out")
    names = ["low_dose.nii.gz", "synthesized.nii.gz", "organs_low.nii.gz", "organs_synth.nii.gz", "DONE.json"]
    for n in names:
        st.path(n).write_text(n)
    fp = {"synthesis": model_fingerprint(w1), "segmentation": model_fingerprint(w1)}
    st.path("models.json").write_text(json.dumps(fp))
    assert _supersede_stale_outputs(st, fp) == [] and all(st.has(n) for n in names)   # same weights: kept
    changed = _supersede_stale_outputs(st, dict(fp, synthesis=model_fingerprint(w2)))
    assert changed == ["synthesis"]
    assert st.has("low_dose.nii.gz", "organs_low.nii.gz")                          # inputs, segmentation kept
    assert not st.has("synthesized.nii.gz") and not st.has("organs_synth.nii.gz") and not st.has("DONE.json")
    moved = list((st.dir / "superseded").glob("*/synthesized.nii.gz"))
    assert len(moved) == 1 and moved[0].read_text() == "synthesized.nii.gz"        # moved, never deleted
    assert json.loads(st.path("models.json").read_text())["synthesis"] == model_fingerprint(w2)


def test_scene_written_from_a_relative_folder_moves_with_it(tmp_path, monkeypatch, mrml):
    """The scene is written into a temporary folder and swapped in: its files are named relative to it, so the
    scene loads from anywhere, a second export replaces the first, and no temporary folder is left."""
    import shutil

    from PETWorkbenchSlicer.scene_export import load_scene, write_study_scene
    _fake_study(tmp_path / "study")
    monkeypatch.chdir(tmp_path)
    write_study_scene(Path("study"))
    path, _ = write_study_scene(Path("study"))                    # replaces the first one
    assert [p.name for p in (tmp_path / "study").iterdir() if p.name.startswith(".scene")] == []
    text = Path(path).read_text()
    assert ".scene.part" not in text and str(tmp_path) not in text
    shutil.move(str(tmp_path / "study"), str(tmp_path / "moved"))
    monkeypatch.chdir("/")
    scene = load_scene(tmp_path / "moved" / "scene" / "Scene.mrml")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") >= 3


def _recorded_study(root, names, fingerprints):
    """A study folder holding files ``names`` (each containing its name) and ``fingerprints`` in models.json."""
    from PETWorkbenchApp.pipeline import Study
    st = Study({"id": "s1"}, root / "out")
    for n in names:
        st.path(n).write_text(n)
    st.path("models.json").write_text(json.dumps(fingerprints))
    return st


def test_a_registration_made_with_other_settings_is_superseded(tmp_path, monkeypatch):
    from RegistrationModuleLib import petct
    from PETWorkbenchApp.pipeline import _supersede_stale_outputs, registration_fingerprint
    fp = {"synthesis": "m@1", "segmentation": "m@2"}
    # a study recorded before the settings were fingerprinted: its registration's settings are unknown
    st = _recorded_study(tmp_path, ["low_dose.nii.gz", "synthesized.nii.gz", "field.nii.gz", "registration.json",
                                    "pet_on_ct.nii.gz", "DONE.json"], fp)
    changed = _supersede_stale_outputs(st, dict(fp, registration=registration_fingerprint()))
    assert changed == ["registration"] and not st.has("field.nii.gz") and not st.has("DONE.json")
    assert st.has("synthesized.nii.gz", "low_dose.nii.gz")
    assert len(list((st.dir / "superseded").glob("*/field.nii.gz"))) == 1
    # same settings again: kept; other settings (e.g. a new CT smoothing): superseded
    for n in ("field.nii.gz", "registration.json", "DONE.json"):
        st.path(n).write_text(n)
    now = dict(fp, registration=registration_fingerprint())
    assert _supersede_stale_outputs(st, now) == [] and st.has("field.nii.gz", "DONE.json")
    mapping = petct.CT_MAPPING
    monkeypatch.setattr(petct, "CT_MAPPING", dict(mapping, sigma_mm=mapping["sigma_mm"] + 10.0))
    assert registration_fingerprint() != now["registration"]
    monkeypatch.undo()
    assert registration_fingerprint() == now["registration"]
    monkeypatch.setattr(petct, "CT_SIGMA_MM", petct.CT_SIGMA_MM + 1.0)
    assert registration_fingerprint() != now["registration"]
    assert _supersede_stale_outputs(st, dict(fp, registration=registration_fingerprint())) == ["registration"]
    assert not st.has("field.nii.gz") and st.has("synthesized.nii.gz")


def test_a_synthesis_made_with_other_inference_settings_is_superseded(tmp_path, monkeypatch):
    import SynthesisModuleLib
    from PETWorkbenchApp.pipeline import _supersede_stale_outputs, synthesis_fingerprint
    fp = {"synthesis": synthesis_fingerprint("synthesis-drmc-cpu"), "segmentation": "m@2", "registration": "r@3"}
    st = _recorded_study(tmp_path, ["low_dose.nii.gz", "synthesized.nii.gz", "organs_low.nii.gz",
                                    "organs_synth.nii.gz", "field.nii.gz", "DONE.json"], fp)
    assert _supersede_stale_outputs(st, fp) == [] and st.has("synthesized.nii.gz", "DONE.json")
    # the same weights synthesized with another default overlap: the synthesis and what was made from it go
    monkeypatch.setattr(SynthesisModuleLib, "DEFAULT_OVERLAP", 0.5)
    now = dict(fp, synthesis=synthesis_fingerprint("synthesis-drmc-cpu"))
    assert now["synthesis"] != fp["synthesis"] and now["synthesis"].startswith("synthesis-drmc-cpu@")
    assert _supersede_stale_outputs(st, now) == ["synthesis"]
    assert not st.has("synthesized.nii.gz") and not st.has("organs_synth.nii.gz") and not st.has("field.nii.gz")
    assert not st.has("DONE.json") and st.has("low_dose.nii.gz", "organs_low.nii.gz")
    assert len(list((st.dir / "superseded").glob("*/synthesized.nii.gz"))) == 1
