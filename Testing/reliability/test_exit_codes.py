"""Every failure ends with one line 'petworkbench: error: ...' (no traceback) and the documented exit code: 2 bad
input or argument, 3 model, 4 disk/permission/memory, 5 a batch with failed studies, 130 cancelled (SIGTERM,
Ctrl-C, the worker's Cancel)."""

import json
import signal
import subprocess
import time

import pytest

from reliability_tools import PWB, assert_one_error_line, cli, error_lines, permissions_enforced, run, write_pet


@pytest.fixture(scope="module", autouse=True)
def unreachable_scheduler(tmp_path_factory):
    """Started with the module's first test (it mostly waits for its connection timeout), checked by the last."""
    d = tmp_path_factory.mktemp("sched")
    write_pet(d / "low.nii.gz")
    (d / "studies.csv").write_text("id,low_dose\ns1,low.nii.gz\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(PWB + ["batch", str(d / "studies.csv"), "--out", str(d / "out"), "--steps",
                                   "synthesize", "--scheduler", "tcp://127.0.0.1:9",
                                   "--scheduler-timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, t0, d
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _bad_inputs(tmp):
    write_pet(tmp / "low.nii.gz")
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "blank.csv").write_text("id,low_dose\n,low.nii.gz\n")
    (tmp / "ok.csv").write_text("id,low_dose\ns1,low.nii.gz\n")
    (tmp / "a_file").write_text("x")
    return {
        "text file to synthesize": (2, ["synthesize", tmp / "notes.txt", tmp / "o.nii.gz"], "notes.txt"),
        "blank batch id": (2, ["batch", tmp / "blank.csv", "--out", tmp / "out"], "line 2"),
        "scheduler local:abc": (2, ["batch", tmp / "ok.csv", "--out", tmp / "out", "--scheduler", "local:abc"],
                                "local:abc"),
        "scheduler timeout 0": (2, ["batch", tmp / "ok.csv", "--out", tmp / "out", "--scheduler", "tcp://127.0.0.1:9",
                                    "--scheduler-timeout", "0"], "scheduler-timeout"),
        "scheduler timeout inf": (2, ["batch", tmp / "ok.csv", "--out", tmp / "out", "--scheduler",
                                      "tcp://127.0.0.1:9", "--scheduler-timeout", "inf"], "scheduler-timeout"),
        "scheduler nonsense": (2, ["batch", tmp / "ok.csv", "--out", tmp / "out", "--scheduler", "nonsense"],
                               "nonsense"),
        "bad --iterations": (2, ["register", tmp / "low.nii.gz", tmp / "low.nii.gz", "-o", tmp / "f.nii.gz",
                                 "--iterations", "5,x"], "iterations"),
        "unknown option": (2, ["synthesize", tmp / "low.nii.gz", tmp / "o.nii.gz", "--bogus"], "--bogus"),
        "output below a file": (4, ["register", tmp / "low.nii.gz", tmp / "low.nii.gz", "-o",
                                    tmp / "a_file" / "f.nii.gz", "--iterations", "1,1,1", "--prealign", "none"],
                                "f.nii.gz"),
    }


CASES = ["text file to synthesize", "blank batch id", "scheduler local:abc", "scheduler nonsense", "bad --iterations",
         "unknown option", "output below a file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_and_the_documented_code(tmp_path, capfd, case):
    expected, argv, name = _bad_inputs(tmp_path)[case]
    code, _, err = cli(capfd, *argv)
    assert code == expected, (code, err)
    assert_one_error_line(err, name)


def test_bad_memory_budget_setting_is_an_input_error(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("PETWORKBENCH_MEMORY_GB", "lots")
    code, _, err = cli(capfd, "synthesize", write_pet(tmp_path / "low.nii.gz"), tmp_path / "o.nii.gz")
    assert code == 2
    assert_one_error_line(err, "PETWORKBENCH_MEMORY_GB", "lots")


def test_batch_with_a_failed_study_exits_5(tmp_path, capfd):
    (tmp_path / "low.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    (tmp_path / "studies.csv").write_text("id,low_dose\nbad,low.nii.gz\n")
    code, out, err = cli(capfd, "batch", tmp_path / "studies.csv", "--out", tmp_path / "out")
    assert code == 5, (code, err)
    assert "Traceback" not in err + out
    failed = json.loads((tmp_path / "out" / "bad" / "FAILED.json").read_text())
    assert failed["exit_code"] == 2 and "low.nii.gz" in failed["error"]
    assert not (tmp_path / "out" / "bad" / "DONE.json").exists()


# ------------------------------------------------------------------------------------------------ real processes
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cancels_with_130_and_no_traceback(sig):
    p = subprocess.Popen(PWB + ["selftest", "--steps", "100", "--delay", "0.1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)                                           # imported and inside the steps
    assert p.poll() is None
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err
    assert_one_error_line(err, "Cancelled")


def test_cancelled_worker_job_has_returncode_130():
    from PETWorkbenchLib.errors import Cancelled
    from PETWorkbenchLib.worker import WorkerJob
    seen = []
    job = WorkerJob(["selftest", "--steps", "100", "--delay", "0.1"], progress=lambda f, m: seen.append(m))
    deadline = time.monotonic() + 20
    while job.poll() and len(seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(seen) >= 3 and job.returncode is None
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(timeout=20)
    assert job.returncode == 130


def test_read_only_output_folder_fails_that_study_only(tmp_path):
    preexec = permissions_enforced()
    for sid, seed in (("s1", 0), ("s2", 1)):
        write_pet(tmp_path / f"{sid}.nii.gz", seed=seed)
    (tmp_path / "studies.csv").write_text("id,low_dose\ns1,s1.nii.gz\ns2,s2.nii.gz\n")
    locked = tmp_path / "out" / "s2"
    locked.mkdir(parents=True)
    locked.chmod(0o555)
    try:
        p = run(["--json", "batch", tmp_path / "studies.csv", "--out", tmp_path / "out", "--steps", "synthesize",
                 "--device", "cpu"], preexec_fn=preexec)
    finally:
        locked.chmod(0o755)
    assert p.returncode == 5, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout and len(error_lines(p.stderr)) <= 1
    summary = json.loads(p.stdout)
    status = {r["id"]: r for r in summary["studies"]}
    assert status["s1"]["status"] == "done" and (tmp_path / "out" / "s1" / "DONE.json").is_file()
    assert status["s2"]["status"] == "failed" and "permission denied" in status["s2"]["error"]
    assert list(locked.iterdir()) == []


def test_read_only_output_folder_exits_4(tmp_path):
    preexec = permissions_enforced()
    img = write_pet(tmp_path / "low.nii.gz")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        p = run(["register", img, img, "-o", ro / "field.nii.gz", "--iterations", "1,1,1", "--prealign", "none",
                 "--device", "cpu"], preexec_fn=preexec)
    finally:
        ro.chmod(0o755)
    assert p.returncode == 4, (p.returncode, p.stderr)
    assert "permission denied" in assert_one_error_line(p.stderr, "field.nii.gz")
    assert list(ro.iterdir()) == []


def test_unreachable_scheduler_is_refused_after_its_timeout(unreachable_scheduler):
    # The process is told to give up after 2 s. Dask's own connect timeout is 30 s, so finishing within 25 s
    # (2 s plus up to 23 s for starting Python and importing torch/dask while other tests load the machine)
    # shows the timeout is ours; the bound is not a speed target.
    proc, t0, d = unreachable_scheduler
    out, err = proc.communicate(timeout=max(1.0, 40 - (time.monotonic() - t0)))
    assert time.monotonic() - t0 < 25, "did not give up within its 2 s scheduler timeout"
    assert proc.returncode == 2, (proc.returncode, err)
    line = assert_one_error_line(err, "tcp://127.0.0.1:9")
    assert "scheduler" in line.lower() and "within 2" in line
    assert not (d / "out" / "s1" / "DONE.json").exists()
