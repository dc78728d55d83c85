"""Batch and pipeline bookkeeping: study ids never reach outside --out, unusable study lists are refused before
anything runs (naming the line), results of changed inputs are recomputed (old ones kept in superseded/), and a
half-written JSON record in a study folder never makes the study fail forever."""

import json

import pytest

from reliability_tools import assert_one_error_line, cli, sha, snapshot, write_pet

STEPS = ["synthesize"]


@pytest.mark.parametrize("study_id", ["../../x", "ABS", "", "   ", "..", "a/b", "x/../../y", "-rf", ".hidden"])
def test_unsafe_or_blank_batch_id_is_refused_before_anything_is_written(tmp_path, capfd, study_id):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    write_pet(work / "low.nii.gz")
    if study_id == "ABS":
        study_id = str(tmp_path / "abs" / "path")
    (work / "studies.csv").write_text(f"id,low_dose\n{study_id},low.nii.gz\n")
    before = snapshot(tmp_path)
    code, _, err = cli(capfd, "batch", work / "studies.csv", "--out", work / "out", "--steps", "synthesize")
    assert code == 2, err
    assert_one_error_line(err, "studies.csv", "line 2")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in work.iterdir()) == ["low.nii.gz", "studies.csv"]      # not even --out
    assert not (tmp_path / "abs").exists() and not (tmp_path / "a" / "x").exists() and not (tmp_path / "x").exists()


def test_unsafe_pipeline_id_is_refused(tmp_path, capfd):
    low = write_pet(tmp_path / "low.nii.gz")
    (tmp_path / "out").mkdir()
    code, _, err = cli(capfd, "pipeline", "--id", "../escaped", "--out", tmp_path / "out", "--low-dose", low,
                       "--steps", "synthesize")
    assert code == 2
    assert_one_error_line(err, "../escaped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["low.nii.gz", "out"]
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("row", ["s2,,ct.nii.gz", "s2", "s2,   ,"])
def test_batch_row_without_low_dose_is_refused_naming_the_line(tmp_path, capfd, row):
    write_pet(tmp_path / "low.nii.gz")
    (tmp_path / "studies.csv").write_text(f"id,low_dose,ct\ns1,low.nii.gz,\n{row}\n")
    code, _, err = cli(capfd, "batch", tmp_path / "studies.csv", "--out", tmp_path / "out")
    assert code == 2, err
    line = assert_one_error_line(err, "studies.csv", "line 3", "s2")
    assert "low_dose" in line
    assert not (tmp_path / "out").exists()


def test_misspelt_batch_step_is_an_argument_error_not_failed_studies(tmp_path, capfd):
    write_pet(tmp_path / "low.nii.gz")
    (tmp_path / "studies.csv").write_text("id,low_dose\ns1,low.nii.gz\n")
    code, _, err = cli(capfd, "batch", tmp_path / "studies.csv", "--out", tmp_path / "out", "--steps", "synthesise")
    assert code == 2, (code, err)
    assert_one_error_line(err, "synthesise")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


# ------------------------------------------------------------------------------------------------ stale results
def test_changed_low_dose_content_is_recomputed_and_old_results_kept(tmp_path, tiny_models):
    from PETWorkbenchApp.batch import run_batch
    low = write_pet(tmp_path / "low.nii.gz", seed=0)
    studies = [{"id": "s1", "low_dose": str(low)}]
    out = tmp_path / "out"
    first = run_batch(studies, out, steps=STEPS, models=tiny_models)
    assert first["studies"][0]["status"] == "done"
    old = sha(out / "s1" / "synthesized.nii.gz")
    assert run_batch(studies, out, steps=STEPS, models=tiny_models)["studies"][0]["status"] == "skipped"
    write_pet(low, seed=3)                                   # same path, other content (a corrected export)
    again = run_batch(studies, out, steps=STEPS, models=tiny_models)
    assert again["studies"][0]["status"] == "done"
    new = sha(out / "s1" / "synthesized.nii.gz")
    assert new != old
    kept = list((out / "s1" / "superseded").rglob("synthesized.nii.gz"))
    assert len(kept) == 1 and sha(kept[0]) == old
    recorded = json.loads((out / "s1" / "inputs.json").read_text())
    assert recorded["low_dose"] == sha(low)[: len(recorded["low_dose"])]


# ------------------------------------------------------------------------------------------------ JSON records
FULL = ["synthesize", "segment", "uptake", "report"]


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny_models):
    """A study run through synthesize, segment, uptake and report: (studies, out folder)."""
    from PETWorkbenchApp.batch import run_batch
    d = tmp_path_factory.mktemp("finished")
    low = write_pet(d / "low.nii.gz")
    studies = [{"id": "s1", "low_dose": str(low)}]
    res = run_batch(studies, d / "out", steps=FULL, models=tiny_models)
    assert res["studies"][0]["status"] == "done", res
    return studies, d / "out"


def _copy_study(src_out, dst_out):
    import shutil
    shutil.copytree(src_out, dst_out)
    return dst_out


@pytest.mark.parametrize("record", ["routing.json", "uptake.json", "DONE.json", "inputs.json", "models.json"])
def test_half_written_json_record_does_not_fail_the_study_forever(tmp_path, finished_study, tiny_models, record):
    """A crash or a full disk with an older, non-atomic writer leaves a JSON record cut in half; the study is then
    interrupted (no DONE.json). The next runs must recompute it or work around it, not fail on it every time."""
    from PETWorkbenchApp.batch import run_batch
    studies, src = finished_study
    out = _copy_study(src, tmp_path / "out")
    p = out / "s1" / record
    text = p.read_text()
    p.write_text(text[: len(text) // 2])
    if record != "DONE.json":
        (out / "s1" / "DONE.json").unlink()
    results = [run_batch(studies, out, steps=FULL, models=tiny_models)["studies"][0] for _ in range(2)]
    assert not any("internal error" in str(r.get("error", "")) for r in results), results
    assert results[-1]["status"] in ("done", "skipped") and "done" in [r["status"] for r in results], results
    json.loads(p.read_text())                                # the record is whole again
    assert (out / "s1" / "DONE.json").is_file()
