#!/usr/bin/env python
"""Reliability benchmark: bad inputs and faults against the ``petworkbench`` command line, each in a real process.

    python benchmarks/reliability.py [--quick] [--jobs N] [--only WORD] [--keep]

Every case runs in its own temporary folder holding its inputs and, where it matters, a previous result. Two
kinds of case:

* bad inputs: a file or an argument a user may give by mistake (a text file, a CT, NaN voxels, an unsafe batch id,
  an output onto its input, unknown model, ...). Such a case is *clear* when the exit code is the documented one
  (2 bad input, 3 model), stderr is exactly one line starting ``petworkbench: error:``, and that line names the
  file or argument at fault.
* faults: what happens to a correct command (a full disk, simulated with RLIMIT_FSIZE and SIGXFSZ ignored; SIGTERM
  or Ctrl-C mid-run; a read-only output folder, without root's permission override; damaged weights, bundled or
  given; an input cut short by an interrupted copy; a half-written JSON record; an unreachable scheduler). Its
  expected exit code (4, 130, 5, 3, 2, 0) is checked the same way.

For every case: the exit code, whether stderr is one clear line, whether a traceback was printed, whether any file
that existed before (inputs, previous results) changed or disappeared (SHA-256 before and after: *data lost*),
and temporary files left behind. Read-only cases are skipped when running as root without CAP_SETPCAP.

``--quick`` runs the cases of cheap commands only (skips the batch runs, the unreachable scheduler and the long
engine runs; still more than 20 bad inputs). The last line is
``bad_inputs_tried=N bad_inputs_clear=N faults_tried=N data_lost=N tracebacks=N``.
"""

import argparse
import ctypes
import gzip
import hashlib
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "petworkbench: error: "
BAD, FAULT = "bad input", "fault"


# ------------------------------------------------------------------------------------------------ helpers
def _cli():
    script = Path(sys.executable).parent / "petworkbench"
    if script.is_file():
        return [str(script)], {}
    paths = [str(ROOT)] + [str(p) for p in sorted(ROOT.glob("*Module")) if p.is_dir()]
    return [sys.executable, "-m", "PETWorkbenchApp.cli"], {"PYTHONPATH": os.pathsep.join(paths)}


PWB, PWB_ENV = _cli()


def pet(path, shape=(16, 16, 16), spacing=(4.0, 4.0, 4.0), seed=0, values=None):
    """A small PET in SUV (noisy background and a hot cube), or the array ``values``."""
    if values is None:
        rng = np.random.default_rng(seed)
        values = (0.3 + 0.5 * rng.random(shape)).astype(np.float32)
        z, y, x = (s // 3 for s in shape)
        values[z:2 * z, y:2 * y, x:2 * x] += 3.0 + seed
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(spacing[: img.GetDimension()])
    sitk.WriteImage(img, str(path))
    return Path(path)


def labels(path, origin=(-30.0, -20.0, 10.0)):
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[2:8, 3:10, 4:12] = 14
    lab[9:14, 3:8, 2:6] = 1
    img = sitk.GetImageFromArray(lab)
    img.SetSpacing((4.0, 4.0, 4.0))
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))
    return Path(path)


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot(folder):
    return {str(p.relative_to(folder)): sha(p) for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not p.is_symlink()}


def full_disk(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _drop_dac():
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):                                  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:           # PR_CAPBSET_DROP: the exec'd child has no override
            raise OSError(ctypes.get_errno(), "prctl")


def permissions_preexec():
    """(preexec_fn making a child obey file permissions, or None) and whether that is possible here."""
    if os.geteuid() != 0:
        return None, True
    try:
        p = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_drop_dac, capture_output=True)
        return _drop_dac, p.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None, False


def flip_in_tensor(src, dst):
    data = bytearray(Path(src).read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    n, e = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + n + e + info.compress_size // 2
    for k in range(3):
        data[start + k] ^= 0x5A
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def damaged_resources(d):
    """A Resources folder whose bundled synthesis weights have one flipped byte (the real one is not touched)."""
    res = d / "Resources"
    (res / "Models").mkdir(parents=True)
    for name in ("Models.json", "Models.schema.json"):
        shutil.copy(ROOT / "Resources" / name, res / name)
    for name in ("SampleData", "Terminology", "Icons"):
        if (ROOT / "Resources" / name).exists():
            (res / name).symlink_to(ROOT / "Resources" / name)
    data = bytearray((ROOT / "Resources" / "Models" / "synthesis-drmc-cpu.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (res / "Models" / "synthesis-drmc-cpu.pt").write_bytes(bytes(data))
    return res


# ------------------------------------------------------------------------------------------------ cases
@dataclass
class Case:
    kind: str
    name: str
    expected: int
    setup: object                      # setup(folder) -> dict(argv, names, [preexec, env, signal, mutable, check])
    slow: bool = False
    result: dict = field(default_factory=dict)


def _synth(d, image, out="out.nii.gz", *extra):
    return ["synthesize", image, out, "--device", "cpu", *extra]


def _study_csv(d, text, images=("low.nii.gz",)):
    for i, name in enumerate(images):
        pet(d / name, seed=i)
    (d / "studies.csv").write_text(text)
    return d / "studies.csv"


def bad_inputs():
    c = []

    def add(name, expected, setup, slow=False):
        c.append(Case(BAD, name, expected, setup, slow))

    add("synthesize: text file as PET", 2, lambda d: (
        (d / "notes.txt").write_text("patient notes\n"),
        {"argv": _synth(d, "notes.txt"), "names": ["notes.txt"]})[1])
    add("synthesize: missing input file", 2, lambda d: {"argv": _synth(d, "nope.nii.gz"), "names": ["nope.nii.gz"]})
    add("synthesize: empty .nii.gz", 2, lambda d: (
        (d / "empty.nii.gz").write_bytes(b""), {"argv": _synth(d, "empty.nii.gz"), "names": ["empty.nii.gz"]})[1])
    add("synthesize: DICOM folder", 2, lambda d: (
        (d / "series").mkdir(), (d / "series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64),
        {"argv": _synth(d, "series"), "names": ["series"]})[2])
    add("synthesize: plain folder", 2, lambda d: (
        (d / "folder").mkdir(), {"argv": _synth(d, "folder"), "names": ["folder"]})[1])
    add("synthesize: CT in HU", 2, lambda d: (
        pet(d / "ct.nii.gz", values=np.where(np.indices((16, 16, 16)).sum(0) > 20, 40, -1000).astype(np.int16)),
        {"argv": _synth(d, "ct.nii.gz"), "names": ["ct.nii.gz"]})[1])
    add("synthesize: Bq/ml volume as SUV", 2, lambda d: (
        pet(d / "bqml.nii.gz", values=np.full((16, 16, 16), 12000.0, np.float32)),
        {"argv": _synth(d, "bqml.nii.gz"), "names": ["bqml.nii.gz"]})[1])
    add("synthesize: all-zero volume", 2, lambda d: (
        pet(d / "zero.nii.gz", values=np.zeros((16, 16, 16), np.float32)),
        {"argv": _synth(d, "zero.nii.gz"), "names": ["zero.nii.gz"]})[1])

    def nan_first(d):
        a = np.full((16, 16, 16), 0.5, np.float32)
        a[0, 0, 0] = np.nan
        pet(d / "nan.nii.gz", values=a)
        return {"argv": _synth(d, "nan.nii.gz"), "names": ["nan.nii.gz"]}
    add("synthesize: NaN voxel (NIfTI)", 2, nan_first)
    add("synthesize: 2D image", 2, lambda d: (
        pet(d / "slice.nii.gz", values=np.ones((16, 16), np.float32)),
        {"argv": _synth(d, "slice.nii.gz"), "names": ["slice.nii.gz"]})[1])
    add("synthesize: output is the input", 2, lambda d: (
        pet(d / "low.nii.gz"), {"argv": ["--overwrite"] + _synth(d, "low.nii.gz", "./low.nii.gz"),
                                "names": ["low.nii.gz"]})[1])
    add("synthesize: output exists, no --overwrite", 2, lambda d: (
        pet(d / "low.nii.gz"), pet(d / "out.nii.gz", seed=4),
        {"argv": _synth(d, "low.nii.gz"), "names": ["out.nii.gz"]})[2])
    add("synthesize: --overlap 1.5", 2, lambda d: (
        pet(d / "low.nii.gz"), {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--overlap", "1.5"),
                                "names": ["overlap"]})[1])
    add("synthesize: unknown model id", 3, lambda d: (
        pet(d / "low.nii.gz"), {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--model", "no-such-model"),
                                "names": ["no-such-model"]})[1])
    add("synthesize: empty weights file", 3, lambda d: (
        pet(d / "low.nii.gz"), (d / "empty.pt").write_bytes(b""),
        {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--model", "empty.pt"), "names": ["empty.pt"]})[2])
    add("synthesize: text file as weights", 3, lambda d: (
        pet(d / "low.nii.gz"), (d / "weights.pt").write_text("not weights\n"),
        {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--model", "weights.pt"), "names": ["weights.pt"]})[2])
    add("segment: output is the input", 2, lambda d: (
        pet(d / "pet.nii.gz"), {"argv": ["--overwrite", "segment", "--input", "pet.nii.gz", "--output",
                                         "pet.nii.gz"], "names": ["pet.nii.gz"]})[1])
    add("segment: unknown organ", 2, lambda d: (
        pet(d / "pet.nii.gz"), {"argv": ["segment", "--input", "pet.nii.gz", "--output", "lab.nii.gz",
                                         "--organs", "livr"], "names": ["livr"]})[1])
    add("register: --iterations 5,x", 2, lambda d: (
        pet(d / "f.nii.gz"), {"argv": ["register", "f.nii.gz", "f.nii.gz", "-o", "field.nii.gz",
                                       "--iterations", "5,x"], "names": ["iterations", "5,x"]})[1])
    add("register: missing moving image", 2, lambda d: (
        pet(d / "f.nii.gz"), {"argv": ["register", "f.nii.gz", "m.nii.gz", "-o", "field.nii.gz"],
                              "names": ["m.nii.gz"]})[1])
    add("evaluate: reference shifted 40 mm", 2, lambda d: (
        labels(d / "ref.nii.gz"), labels(d / "pred.nii.gz", origin=(10.0, -20.0, 10.0)),
        {"argv": ["evaluate", "segmentation", "--pred", "pred.nii.gz", "--ref", "ref.nii.gz"],
         "names": ["pred.nii.gz", "prediction"]})[2])
    add("evaluate: --pred without --ref", 2, lambda d: (
        labels(d / "pred.nii.gz"), {"argv": ["evaluate", "segmentation", "--pred", "pred.nii.gz"],
                                    "names": ["--ref"]})[1])
    add("batch: blank id", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\n,low.nii.gz\n"), "--out", "out"], "names": ["line 2"]})
    add("batch: id ../../x", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\n../../x,low.nii.gz\n"), "--out", "out"],
        "names": ["../../x"]})
    add("batch: absolute path as id", 2, lambda d: {
        "argv": ["batch", _study_csv(d, f"id,low_dose\n{d / 'abs'},low.nii.gz\n"), "--out", "out"],
        "names": [str(d / "abs")]})
    add("batch: row without low_dose", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose,ct\ns1,low.nii.gz,\ns2,,ct.nii.gz\n"), "--out", "out"],
        "names": ["line 3"]})
    add("batch: duplicate ids", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\ns1,low.nii.gz\ns1,low.nii.gz\n"), "--out", "out"],
        "names": ["s1"]})
    add("batch: CSV without id column", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "name,low_dose\ns1,low.nii.gz\n"), "--out", "out"], "names": ["id"]})
    add("batch: --scheduler local:abc", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\ns1,low.nii.gz\n"), "--out", "out", "--scheduler",
                 "local:abc"], "names": ["local:abc"]})
    add("batch: --steps typo (synthesise)", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\ns1,low.nii.gz\n"), "--out", "out", "--steps", "synthesise"],
        "names": ["synthesise"]})
    add("pipeline: id a/b", 2, lambda d: (
        pet(d / "low.nii.gz"), {"argv": ["pipeline", "--id", "a/b", "--out", "out", "--low-dose", "low.nii.gz",
                                         "--steps", "synthesize"], "names": ["a/b"]})[1])
    add("PETWORKBENCH_MEMORY_GB=lots", 2, lambda d: (
        pet(d / "low.nii.gz"), {"argv": _synth(d, "low.nii.gz"), "names": ["PETWORKBENCH_MEMORY_GB"],
                                "env": {"PETWORKBENCH_MEMORY_GB": "lots"}})[1])
    add("unknown command", 2, lambda d: {"argv": ["synthesise", "a", "b"], "names": ["synthesise"]})
    add("selftest --steps abc", 2, lambda d: {"argv": ["selftest", "--steps", "abc"], "names": ["--steps", "abc"]})
    add("models verify unknown id", 3, lambda d: {"argv": ["models", "verify", "nope"], "names": ["nope"]})
    add("models install onto a bundled model", 2, lambda d: (
        pet(d / "low.nii.gz"), {"argv": ["models", "install", "synthesis-drmc-cpu", "low.nii.gz"],
                                "names": ["synthesis-drmc-cpu"]})[1])
    return c


def faults(can_drop):
    c = []

    def add(name, expected, setup, slow=False):
        c.append(Case(FAULT, name, expected, setup, slow))

    def disk_synth(d):
        pet(d / "low.nii.gz")
        pet(d / "out.nii.gz", shape=(24, 24, 24), seed=3)              # the previous result
        return {"argv": ["--overwrite"] + _synth(d, "low.nii.gz"), "names": ["out.nii.gz"],
                "preexec": full_disk(4096)}
    add("full disk: synthesize onto a previous .nii.gz", 4, disk_synth)

    def disk_register(d, out):
        pet(d / "f.nii.gz", seed=0)
        pet(d / "m.nii.gz", seed=1)
        pet(d / out, shape=(24, 24, 24), seed=3)
        return {"argv": ["--overwrite", "register", "f.nii.gz", "m.nii.gz", "-o", out, "--iterations", "2,2,2",
                         "--prealign", "none", "--device", "cpu"], "names": [out], "preexec": full_disk(4096)}
    add("full disk: register onto a previous .nii", 4, lambda d: disk_register(d, "field.nii"))
    add("full disk: register onto a previous .nrrd", 4, lambda d: disk_register(d, "field.nrrd"))
    add("full disk: register onto a previous .mha", 4, lambda d: disk_register(d, "field.mha"))

    def disk_segment(d):
        pet(d / "pet.nii.gz")
        pet(d / "lab.nii", shape=(24, 24, 24), seed=3)
        return {"argv": ["--overwrite", "segment", "--input", "pet.nii.gz", "--output", "lab.nii", "--device", "cpu"],
                "names": ["lab.nii"], "preexec": full_disk(4096)}
    add("full disk: segment onto a previous .nii", 4, disk_segment)

    def disk_batch(d):
        csv = _study_csv(d, "id,low_dose\ns1,low.nii.gz\n")
        return {"argv": ["batch", csv, "--out", "out", "--steps", "synthesize", "--device", "cpu"], "names": [],
                "preexec": full_disk(4096),
                "check": lambda: "DONE.json written" if (d / "out" / "s1" / "DONE.json").exists() else None}
    add("full disk: batch study", 5, disk_batch, slow=True)

    add("SIGTERM: selftest mid-run", 130, lambda d: {
        "argv": ["selftest", "--steps", "100", "--delay", "0.1"], "names": ["Cancelled"],
        "signal": (signal.SIGTERM, 2.5)})
    add("Ctrl-C: selftest mid-run", 130, lambda d: {
        "argv": ["selftest", "--steps", "100", "--delay", "0.1"], "names": ["Cancelled"],
        "signal": (signal.SIGINT, 2.5)})

    def term_register(d, sig):
        pet(d / "f.nii.gz", shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), seed=0)
        pet(d / "m.nii.gz", shape=(48, 48, 48), spacing=(2.0, 2.0, 2.0), seed=1)
        pet(d / "field.nii.gz", seed=3)                                  # the previous result
        return {"argv": ["--overwrite", "register", "f.nii.gz", "m.nii.gz", "-o", "field.nii.gz", "--iterations",
                         "400,300,200", "--device", "cpu"], "names": ["Cancelled"], "signal": (sig, 4.0)}
    add("SIGTERM: register mid-run, previous output", 130, lambda d: term_register(d, signal.SIGTERM))
    add("Ctrl-C: register mid-run, previous output", 130, lambda d: term_register(d, signal.SIGINT), slow=True)

    def term_batch(d):
        csv = _study_csv(d, "id,low_dose\ns1,a.nii.gz\ns2,b.nii.gz\ns3,c.nii.gz\n",
                         images=("a.nii.gz", "b.nii.gz", "c.nii.gz"))
        return {"argv": ["batch", csv, "--out", "out", "--steps", "synthesize", "--device", "cpu"],
                "names": ["Cancelled"], "signal": (signal.SIGTERM, lambda: (d / "out" / "s1" / "DONE.json").exists()),
                "check": lambda: ("a study after the cancel was marked finished"
                                  if (d / "out" / "s3" / "DONE.json").exists() else None)}
    add("SIGTERM: batch after its first study", 130, term_batch, slow=True)

    if can_drop[1]:
        def ro_register(d):
            pet(d / "f.nii.gz")
            (d / "ro").mkdir()
            (d / "ro").chmod(0o555)
            return {"argv": ["register", "f.nii.gz", "f.nii.gz", "-o", "ro/field.nii.gz", "--iterations", "1,1,1",
                             "--prealign", "none", "--device", "cpu"], "names": ["field.nii.gz"],
                    "preexec": can_drop[0], "cleanup": lambda: (d / "ro").chmod(0o755)}
        add("read-only output folder: register", 4, ro_register)

        def ro_batch(d):
            csv = _study_csv(d, "id,low_dose\ns1,a.nii.gz\ns2,b.nii.gz\n", images=("a.nii.gz", "b.nii.gz"))
            (d / "out" / "s2").mkdir(parents=True)
            (d / "out" / "s2").chmod(0o555)
            return {"argv": ["batch", csv, "--out", "out", "--steps", "synthesize", "--device", "cpu"], "names": [],
                    "preexec": can_drop[0], "cleanup": lambda: (d / "out" / "s2").chmod(0o755),
                    "check": lambda: None if (d / "out" / "s1" / "DONE.json").exists() else "s1 not finished"}
        add("read-only study folder in a batch", 5, ro_batch, slow=True)

    def corrupt_bundled(d):
        pet(d / "low.nii.gz")
        res = damaged_resources(d)
        return {"argv": _synth(d, "low.nii.gz"), "names": ["synthesis-drmc-cpu"],
                "env": {"PETWORKBENCH_RESOURCES": str(res)}}
    add("corrupt bundled weights", 3, corrupt_bundled)

    def flipped(d):
        pet(d / "low.nii.gz")
        flip_in_tensor(ROOT / "Resources" / "Models" / "synthesis-drmc-cpu.pt", d / "mine.pt")
        return {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--model", "mine.pt"), "names": ["mine.pt"]}
    add("weights with 3 flipped bytes in a tensor", 3, flipped)

    def renamed(d):
        import torch
        pet(d / "low.nii.gz")
        ck = torch.load(ROOT / "Resources" / "Models" / "synthesis-drmc-cpu.pt", weights_only=True)
        k = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
        ck["state_dict"][k] = ck["state_dict"][k] * 1.01
        torch.save(ck, d / "synthesis-drmc-cpu.pt")
        return {"argv": _synth(d, "low.nii.gz", "out.nii.gz", "--model", "synthesis-drmc-cpu.pt"),
                "names": ["synthesis-drmc-cpu.pt"]}
    add("modified weights named like a registered model", 3, renamed)

    def truncated(d, name, cut):
        pet(d / "whole.nii", seed=1)
        raw = (d / "whole.nii").read_bytes()
        (d / "whole.nii").unlink()
        (d / name).write_bytes(cut(raw))
        return {"argv": _synth(d, name), "names": [name]}
    add("interrupted copy: .nii.gz cut in half", 2,
        lambda d: truncated(d, "low.nii.gz", lambda r: gzip.compress(r)[: len(gzip.compress(r)) // 2]))
    add("interrupted copy: .nii missing its last 100 bytes", 2, lambda d: truncated(d, "low.nii", lambda r: r[:-100]))
    add("interrupted copy: .mha missing 3000 bytes", 2, lambda d: (
        pet(d / "whole.mha"), (d / "low.mha").write_bytes((d / "whole.mha").read_bytes()[:-3000]),
        (d / "whole.mha").unlink(), {"argv": _synth(d, "low.mha"), "names": ["low.mha"]})[3])

    def nan_last(d):
        a = np.full((16, 16, 16), 0.5, np.float32)
        a[-1, -1, -1] = np.nan
        pet(d / "low.nii", values=a)
        return {"argv": _synth(d, "low.nii"), "names": ["low.nii"]}
    add("NaN in the last voxel of a .nii", 2, nan_last)

    def too_big(d):
        import nibabel as nib
        h = nib.Nifti1Header()
        h.set_data_shape((512, 512, 400))
        h.set_data_dtype(np.float32)
        h["vox_offset"] = 352
        (d / "big.nii.gz").write_bytes(gzip.compress(h.binaryblock + b"\0" * 4))
        return {"argv": _synth(d, "big.nii.gz"), "names": ["big.nii.gz"],
                "env": {"PETWORKBENCH_MEMORY_GB": "0.001"}}
    add("volume over the memory budget", 2, too_big)

    def half_json(d):
        csv = _study_csv(d, "id,low_dose\ns1,low.nii.gz\n")
        first = subprocess.run(PWB + ["batch", str(csv), "--out", "out", "--steps", "synthesize,report",
                                      "--device", "cpu"], cwd=d, capture_output=True, env=dict(os.environ, **PWB_ENV))
        if first.returncode != 0:
            raise RuntimeError(f"setup batch failed: {first.stderr.decode()[-300:]}")
        (d / "out" / "s1" / "DONE.json").unlink()                    # interrupted: not finished
        r = d / "out" / "s1" / "routing.json"
        r.write_text(r.read_text()[:100])                              # written in half
        return {"argv": ["batch", csv, "--out", "out", "--steps", "synthesize,report", "--device", "cpu"],
                "names": [], "mutable": ["out/"]}
    add("half-written routing.json, batch re-run", 0, half_json, slow=True)

    add("unreachable scheduler tcp://127.0.0.1:9", 2, lambda d: {
        "argv": ["batch", _study_csv(d, "id,low_dose\ns1,low.nii.gz\n"), "--out", "out", "--steps", "synthesize",
                 "--scheduler", "tcp://127.0.0.1:9"], "names": ["tcp://127.0.0.1:9"], "max_seconds": 15},
        slow=True)
    return c


# ------------------------------------------------------------------------------------------------ running
def run_case(case, root):
    d = Path(tempfile.mkdtemp(prefix="case-", dir=root))
    r = case.result
    try:
        spec = case.setup(d)
    except Exception as e:  # noqa: BLE001 - a broken setup is reported, not fatal
        r.update(status="setup failed", note=f"{type(e).__name__}: {e}"[:120])
        return case
    before = snapshot(d)
    env = dict(os.environ, **PWB_ENV, **spec.get("env", {}))
    argv = PWB + [str(a) for a in spec["argv"]]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=spec.get("preexec"))
    sig = spec.get("signal")
    note = []
    if sig:
        what, when = sig
        while proc.poll() is None and time.monotonic() - t0 < 120:
            if (callable(when) and when()) or (not callable(when) and time.monotonic() - t0 >= when):
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(what)
        else:
            note.append("ended before the signal")
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        note.append("timed out")
    seconds = time.monotonic() - t0
    if spec.get("cleanup"):
        spec["cleanup"]()
    after = snapshot(d)
    mutable = tuple(spec.get("mutable", ()))
    lost = [f for f, h in before.items() if not f.startswith(mutable) and after.get(f) != h]
    temps = [f for f in after if f not in before and Path(f).name.startswith(".") and ".part" in Path(f).name]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    one_line = len(lines) == 1 and lines[0].startswith(PREFIX)
    if case.expected in (0, 5):                 # success or a batch summary: no error line expected
        one_line = len(lines) <= 1 and all(ln.startswith(PREFIX) for ln in lines)
    names = spec.get("names", [])
    named = not names or (bool(lines) and any(n in lines[-1] for n in names))
    tb = "Traceback" in err or "Traceback" in out
    problem = spec.get("check", lambda: None)()
    if problem:
        note.append(problem)
    if temps:
        note.append(f"{len(temps)} temp file(s) left")
    if spec.get("max_seconds") and seconds > spec["max_seconds"]:
        note.append(f"took {seconds:.0f} s")
    ok = (proc.returncode == case.expected and one_line and named and not tb and not lost and not problem
          and not temps and not (spec.get("max_seconds") and seconds > spec["max_seconds"]))
    r.update(status="ok" if ok else "NOT OK", code=proc.returncode, one_line=one_line, named=named, traceback=tb,
             lost=lost, seconds=seconds, lines=[ln[:160] for ln in lines[:3]],
             stderr_lines=len(lines), note="; ".join(note))
    shutil.rmtree(d, ignore_errors=True)
    return case


def print_table(cases):
    head = f"{'kind':<9} {'case':<47} {'want':>4} {'got':>4} {'1line':>5} {'named':>5} {'lost':>4} {'tb':>3} " \
           f"{'s':>5}  result"
    print(head)
    print("-" * len(head))
    for c in cases:
        r = c.result
        if r.get("status") == "setup failed" or "code" not in r:
            print(f"{c.kind:<9} {c.name[:47]:<47} {c.expected:>4} {'-':>4} {'':>5} {'':>5} {'':>4} {'':>3} {'':>5}  "
                  f"{r.get('status', 'skipped')} {r.get('note', '')}")
            continue
        yn = lambda v: "yes" if v else "NO"
        print(f"{c.kind:<9} {c.name[:47]:<47} {c.expected:>4} {r['code']:>4} {yn(r['one_line']):>5} "
              f"{yn(r['named']):>5} {len(r['lost']):>4} {'YES' if r['traceback'] else '-':>3} {r['seconds']:>5.1f}  "
              f"{r['status']}{' (' + r['note'] + ')' if r['note'] else ''}")
    bad = [c for c in cases if c.result.get("status") == "NOT OK"]
    if bad:
        print("\nlines of the cases that are not ok:")
        for c in bad:
            r = c.result
            lost = f" LOST: {', '.join(r['lost'])}" if r["lost"] else ""
            print(f"  {c.name}: exit {r['code']} (want {c.expected}), {r['stderr_lines']} stderr line(s){lost}")
            for ln in r["lines"]:
                print(f"      {ln}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="cheap commands only (skips batch runs and long engine runs)")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at the same time (default 1)")
    ap.add_argument("--only", default="", help="only cases whose name contains this text")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    a = ap.parse_args(argv)

    can_drop = permissions_preexec()
    cases = bad_inputs() + faults(can_drop)
    if a.quick:
        cases = [c for c in cases if not c.slow]
    if a.only:
        cases = [c for c in cases if a.only.lower() in c.name.lower()]
    root = Path(tempfile.mkdtemp(prefix="pwb-reliability-"))
    t0 = time.time()
    try:
        with ThreadPoolExecutor(max(1, a.jobs)) as pool:
            list(pool.map(lambda c: run_case(c, root), cases))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(cases)
    if not can_drop[1]:
        print("\n(read-only cases skipped: running as root without the capability to drop the permission override)")
    ran = [c for c in cases if "code" in c.result]
    bad = [c for c in ran if c.kind == BAD]
    clear = [c for c in bad if c.result["code"] == c.expected and c.result["one_line"] and c.result["named"]
             and not c.result["traceback"]]
    flt = [c for c in ran if c.kind == FAULT]
    lost = sum(1 for c in ran if c.result["lost"])
    tbs = sum(1 for c in ran if c.result["traceback"])
    faults_ok = sum(1 for c in flt if c.result["status"] == "ok")
    print(f"\n{len(ran)} cases in {time.time() - t0:.0f} s; faults handled as documented: {faults_ok} of {len(flt)}")
    print(f"bad_inputs_tried={len(bad)} bad_inputs_clear={len(clear)} faults_tried={len(flt)} data_lost={lost} "
          f"tracebacks={tbs}")


if __name__ == "__main__":
    main()
