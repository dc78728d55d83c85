"""Heap settings for inference: before the first reuse_freed_memory() block the intermediates of repeated
forward-like passes are faulted in again at every pass; inside, and after it (the settings stay for the process),
freed pages are reused; leaving the block gives the freed memory back."""

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import PETWorkbenchLib.allocator as allocator
from PETWorkbenchLib.allocator import glibc, reuse_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# run in a fresh interpreter: the heap's state (and glibc's adaptive mmap threshold) then does not depend on what
# the test session did before
SCRIPT = textwrap.dedent('''
    import ctypes, json, resource, sys, threading
    sys.path.insert(0, ROOT)
    import torch
    from PETWorkbenchLib.allocator import glibc, reuse_freed_memory

    class Info(ctypes.Structure):        # mallinfo2 (glibc >= 2.33): arena = bytes the heap took with sbrk
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = glibc()
    libc.mallinfo2.restype = Info

    def fwd():                            # a network's pattern: tensors of 16-48 MB made and freed
        x = torch.ones(4 * 1024 * 1024)
        for _ in range(4):
            y = torch.cat([x, x])
            x = y[: x.numel()] * 2.0
            z = torch.empty(12 * 1024 * 1024).fill_(1.0)
            del y, z
        return float(x[0])

    def rss():                            # resident bytes of the process
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def faults():                         # page faults of a pass once the heap has settled (fewest of three)
        fwd(); fwd(); fwd()
        counts = []
        for _ in range(3):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fwd()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        return min(counts)

    out = {"outside": faults()}
    with reuse_freed_memory() as active:
        out["active"] = active
        out["inside"] = faults()
        with reuse_freed_memory():        # nested: leaving the inner block keeps the settings
            pass
        out["inside_after_nested"] = faults()
        out["heap_inside"] = libc.mallinfo2().arena
        out["rss_inside"] = rss()
    out["rss_after"] = rss()
    out["after"] = faults()
    try:
        with reuse_freed_memory():
            raise KeyError("inside")
    except KeyError:
        pass
    from PETWorkbenchLib import allocator
    out["depth_after_error"] = allocator._depth
    print(json.dumps(out))
''')

needs_glibc = pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"),
                                 reason="glibc heap settings (Linux, glibc >= 2.33) only")


@needs_glibc
def test_freed_memory_is_reused_from_the_first_block_on_and_given_back_when_it_ends():
    r = subprocess.run([sys.executable, "-c", SCRIPT.replace("ROOT", repr(str(ROOT)))], capture_output=True,
                       text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    pages_16mb = 16 * 1024 * 1024 // 4096
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not (thp.is_file() and "[always]" in thp.read_text()):   # with huge pages always on, faults are 2 MB each
        assert out["outside"] > pages_16mb                # fresh pages for the big tensors at every pass
    assert out["active"] is True
    assert out["inside"] < pages_16mb // 10 and out["inside_after_nested"] < pages_16mb // 10
    assert out["heap_inside"] > 48 * 1024 * 1024          # the big blocks came from the heap ...
    assert out["rss_inside"] - out["rss_after"] > 48 * 1024 * 1024   # ... and were given back on leaving
    assert out["after"] < pages_16mb // 10                # the settings stay for the process
    assert out["depth_after_error"] == 0


@needs_glibc
def test_concurrent_blocks_are_counted():
    entered, release = threading.Event(), threading.Event()

    def other():
        with reuse_freed_memory():
            entered.set()
            release.wait(10)
    t = threading.Thread(target=other)
    t.start()
    assert entered.wait(10)
    with reuse_freed_memory():
        assert allocator._depth == 2
    assert allocator._depth == 1                          # the other block is still open: nothing restored yet
    release.set()
    t.join()
    assert allocator._depth == 0


def test_switched_off_or_elsewhere_it_does_nothing(monkeypatch):
    monkeypatch.setattr(allocator, "ENABLED", False)
    with reuse_freed_memory() as active:
        assert active is False and allocator._depth == 0
    with reuse_freed_memory() as active:
        assert active is False
    monkeypatch.setattr(allocator, "ENABLED", True)
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert glibc() is None
    with reuse_freed_memory() as active:
        assert active is False


def test_the_training_loops_run_inside_the_block():
    import inspect

    from SegmentationModuleLib import pemed_train
    from SegmentationModuleLib import train as seg_train
    from SynthesisModuleLib import train as syn_train
    seen = []

    @allocator.reusing_freed_memory
    def probe(a: int, b: int = 2) -> int:
        """doc"""
        seen.append(allocator._depth)
        return a + b
    assert probe(1) == 3 and probe.__name__ == "probe" and probe.__doc__ == "doc"
    assert list(inspect.signature(probe).parameters) == ["a", "b"]
    assert seen == [1 if glibc() is not None else 0] and allocator._depth == 0
    run_code = allocator.reusing_freed_memory(lambda: 0).__code__
    for fn in (syn_train.train, seg_train.train, pemed_train.train):
        assert fn.__code__ is run_code and fn.__wrapped__.__name__ == "train", fn.__module__
