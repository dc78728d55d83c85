"""Regenerate the simulated PET/CT sample data: ``Resources/SampleData/SimulatedPET/``.

    .venv/bin/python docs/make_sample_pet.py          # a few seconds on one CPU core

It runs the demo's own ``simulate`` step (:func:`PETWorkbenchApp.pipeline.run_study` with study id ``demo``,
seed 0: the same images as ``petworkbench demo`` or ``petworkbench pipeline --id demo --steps simulate``) on the
sample CT (``Resources/SampleData/TotalSegmentatorExampleCT``) and keeps two of its outputs:

* ``lowdose_pet.nii.gz``: the simulated low-dose (DRF 10) FDG PET in SUV (float32), C1 scanner profile;
* ``lowdose_pet_ct.nii.gz``: the simulated patient's CT on the PET grid (int16 HU), with the demo's known breathing-like
  misalignment (what the Registration module corrects).

The SHA-256 of the files are written into the entries of ``Resources/SampleData/SampleData.json`` whose
``file`` is one of them. Re-running reproduces the images up to floating-point differences between machines.
"""

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "Resources" / "SampleData" / "SimulatedPET"
FILES = {"low_dose.nii.gz": "lowdose_pet.nii.gz", "ct.nii.gz": "lowdose_pet_ct.nii.gz"}
STUDY = {"id": "demo", "anatomy": "sample"}
SEED = 0


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main():
    sys.path[:0] = [str(ROOT)] + [str(p) for p in sorted(ROOT.glob("*Module"))]
    import torch
    from PETWorkbenchApp.pipeline import run_study
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_study(STUDY, tmp, steps=["simulate"], device="cpu", seed=SEED)
        for src, dst in FILES.items():
            shutil.copyfile(Path(tmp) / STUDY["id"] / src, OUT / dst)
    sums = {(OUT / dst).relative_to(ROOT).as_posix(): sha256(OUT / dst) for dst in FILES.values()}
    spec_path = ROOT / "Resources" / "SampleData" / "SampleData.json"
    spec = json.loads(spec_path.read_text())
    for source in spec["sources"]:
        for f in source["files"]:
            if f["file"] in sums:
                f["sha256"] = sums[f["file"]]
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    for name, digest in sums.items():
        print(f"{name}  {(ROOT / name).stat().st_size / 1e6:.2f} MB  sha256 {digest}")


if __name__ == "__main__":
    main()
