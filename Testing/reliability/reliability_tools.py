"""Helpers of the reliability tests (fixtures are in conftest.py): tiny PET volumes, the command line in-process
and as a real process (with a full disk simulated by RLIMIT_FSIZE, or without root's permission override), file
hashes.

Everything is CPU-sized: 16^3 volumes at 2 mm, untrained models of a few thousand weights.
"""

import ctypes
import hashlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "petworkbench"
PWB = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "PETWorkbenchApp.cli"]
ERROR_PREFIX = "petworkbench: error: "


# ------------------------------------------------------------------------------------------------ data
def pet_image(shape=(16, 16, 16), spacing=(2.0, 2.0, 2.0), seed=0, origin=(0.0, 0.0, 0.0)):
    """A small PET-like volume in SUV (noisy background, a hot cube)."""
    rng = np.random.default_rng(seed)
    a = (0.3 + 0.5 * rng.random(shape)).astype(np.float32)
    z, y, x = (s // 3 for s in shape)
    a[z:2 * z, y:2 * y, x:2 * x] += 3.0 + seed
    img = sitk.GetImageFromArray(a)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def write_pet(path, seed=0, **kw):
    sitk.WriteImage(pet_image(seed=seed, **kw), str(path))
    return Path(path)


def label_image(spacing=(4.0, 4.0, 4.0), origin=(-30.0, -20.0, 10.0)):
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[2:8, 3:10, 4:12] = 14          # liver
    lab[9:14, 3:8, 2:6] = 1            # spleen
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder`` (hidden ones included)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder):
    """Temporary files of atomic writes left behind (``.<name>.<random>.part<suffix>``)."""
    return sorted(str(p) for p in Path(folder).rglob(".*") if ".part" in p.name)


# ------------------------------------------------------------------------------------------------ command line
def cli(capfd, *argv):
    """Run ``petworkbench argv`` in this process; returns (exit code, stdout, stderr) as the terminal would show
    them (file-descriptor capture: C libraries' own prints included)."""
    from PETWorkbenchApp.cli import main
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def assert_one_error_line(stderr, *names):
    """stderr is exactly one line 'petworkbench: error: ...' (no traceback) that names each of ``names``."""
    lines = error_lines(stderr)
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), stderr
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def full_disk(limit_bytes):
    """preexec_fn: no file of the child may grow beyond ``limit_bytes`` (writes fail with EFBIG, like ENOSPC)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _drop_dac():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def permissions_enforced():
    """preexec_fn under which a child process obeys file permissions: None for a normal user; for root, one that
    drops CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set (the child exec's without them). Skips the test
    when root cannot drop them (no CAP_SETPCAP)."""
    if os.geteuid() != 0:
        return None
    probe = subprocess.run([sys.executable, "-c", "import os; os.mkdir('/proc/nope')"], preexec_fn=_drop_dac,
                           capture_output=True, text=True)
    if "prctl" in probe.stderr:
        pytest.skip("running as root and the capability to ignore permissions cannot be dropped here")
    return _drop_dac


def run(argv, preexec_fn=None, timeout=120, env=None, cwd=None):
    """Run ``petworkbench argv`` as a real process; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(PWB + [str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn, env=full_env, cwd=cwd)


def run_python(code, preexec_fn=None, timeout=120, cwd=None):
    """Run a Python snippet with the engines importable (for library calls under a simulated fault)."""
    paths = [str(ROOT)] + [str(p) for p in sorted(ROOT.glob("*Module")) if p.is_dir()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn, env=env, cwd=cwd)
