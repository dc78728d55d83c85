import os
import time

import pytest

from PETWorkbenchLib.errors import Cancelled, EngineError
from PETWorkbenchLib.worker import run_cli


def test_progress_and_result():
    seen = []
    result = run_cli(["selftest", "--steps", "4", "--delay", "0.01"], progress=lambda f, m: seen.append((f, m)),
                     wait=True, timeout=60)
    assert result["steps"] == 4
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("step 2 of 4" in m for _, m in seen)


def test_engine_error_carries_message():
    with pytest.raises(EngineError) as e:
        run_cli(["selftest", "--steps", "5", "--delay", "0.01", "--fail-at", "3"], wait=True, timeout=60)
    assert "selftest failure requested at step 3" in str(e.value)
    assert e.value.kind == "InputError"


def test_bad_arguments_are_an_error():
    with pytest.raises(EngineError) as e:
        run_cli(["selftest", "--steps", "notanumber"], wait=True, timeout=60)
    assert "invalid int value" in str(e.value)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(os.name == "nt", reason="uses /proc")
def test_cancel_kills_process_tree_quickly():
    job = run_cli(["selftest", "--steps", "1000", "--delay", "0.1", "--spawn-child"])
    child_pid = None
    t0 = time.monotonic()
    seen = []
    job.progress = lambda f, m: seen.append(m)
    while not seen and time.monotonic() - t0 < 30:
        job.poll()
        time.sleep(0.02)
    assert seen, "no progress from the worker"
    import psutil
    children = psutil.Process(job.proc.pid).children(recursive=True)
    assert children, "selftest should have started a child process"
    child_pid = children[0].pid
    t1 = time.monotonic()
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(timeout=10)
    # cancel() waits at most its 1 s grace before SIGKILL; a Slicer user must not wait for the job to finish
    # (it has ~100 s left). 5 s leaves room for a loaded machine and still catches a cancel that waits.
    assert time.monotonic() - t1 < 5.0
    assert not _alive(job.proc.pid)
    deadline = time.monotonic() + 2
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid), "child process survived cancel"
