"""Peak memory of the synthesis and segmentation engines per input voxel, against the bounds they enforce.

    python benchmarks/memory.py [--quick] [--size 256 --slices 200]

Each measurement runs at two volume sizes (the slope is the per-voxel cost, the intercept the fixed cost of the
engine's buffers and thread pools), each in two fresh processes that build the same random PET volume, import
the engine and load its shipped model: one then stops, the other runs the engine. The difference of their peak RSS
(``ru_maxrss``, exact, no sampling) is the engine's own memory for that volume. The network is replaced by a
predictor of the same output shape (identity for DRMC, the input repeated per class for LDOS), so that the
measurement takes seconds; the network's activations depend on the patch batch, not on the volume, and are not
included. Two input spacings (2 mm and 1 mm in-plane) separate the per-voxel cost of the input grid from that of
the model grid.

The input's own float32 copy (4 bytes per voxel) is added, since it is freed in the reference process before the
engine runs; the engines' constants (``BYTES_PER_INPUT_VOXEL`` etc.) must bound the result. The last line is
``synthesis_bytes_per_voxel segmentation_bytes_per_voxel synthesis_bound_ok segmentation_bound_ok
wholebody_gb_synthesis wholebody_gb_segmentation registration_bytes_per_voxel registration_bound_ok`` (whole body =
512 x 512 x 600 at 2 mm, from the measured rate). Registration is measured on the fixed grid (LNCC, a few
iterations per level; memory does not grow with the iteration count).
"""

import argparse
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = [ROOT, ROOT / "SynthesisModule", ROOT / "SegmentationModule", ROOT / "RegistrationModule"]

CHILD = r"""
import resource, sys
sys.path[:0] = {paths!r}
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(2)
engine, nx, nz, sp, run = {engine!r}, {nx}, {nz}, {sp}, {run}
import SynthesisModuleLib.infer as sinf
import SegmentationModuleLib.infer as ginf
import RegistrationModuleLib.infer as rinf
from PETWorkbenchLib.models import load_model_checkpoint
load_model_checkpoint("synthesis-drmc-cpu"); load_model_checkpoint("segmentation-ldos-cpu")
a = np.random.default_rng(0).random((nz, nx, nx), dtype=np.float32) * 3
img = sitk.GetImageFromArray(a)
img.SetSpacing((sp, sp, 2.0))
del a
if run and engine == "synthesis":
    real = sinf.predict_array
    class Same(torch.nn.Module):
        num_banks = 0
        def forward(self, x):
            return x * 1.0
    def fake(model, arr, *a, **k):   # the engine's own predict_array (body box, sliding window), network replaced
        return real(Same(), arr, *a, **k)
    sinf.predict_array = fake
    sinf.synthesize(img, "synthesis-drmc-cpu", device="cpu")
elif run and engine == "registration":
    moving = img * 1.01
    rinf.register(img, moving, iterations=(3, 2, 2), prealign="none", device="cpu")
elif run:
    load = ginf.load_model
    def fake_load(ck, dev="cpu", progress=None):
        net, cfg = load(ck, dev)
        ncls = net(torch.zeros(1, 1, *cfg["patch_size"]), heads=("seg",))["seg"].shape[1]
        class Same(torch.nn.Module):
            has_denoiser = False
            def forward(self, x, heads=("seg",)):
                return {{"seg": x.repeat(1, ncls, 1, 1, 1)}}
        return Same(), cfg
    ginf.load_model = fake_load
    ginf.segment(img, "segmentation-ldos-cpu", device="cpu", allow_empty=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_kb(engine, nx, nz, sp, run):
    code = CHILD.format(paths=[str(p) for p in PATHS], engine=engine, nx=nx, nz=nz, sp=sp, run=run)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{engine} measurement failed: {out.stderr.strip().splitlines()[-1]}")
    return int(out.stdout.strip().splitlines()[-1])


def engine_bytes(engine, nx, nz, sp):
    return max(peak_kb(engine, nx, nz, sp, True) - peak_kb(engine, nx, nz, sp, False), 0) * 1024


def bytes_per_voxel(engine, nx, nz, sp):
    """(Slope in bytes per input voxel, fixed bytes): the engine measured at nz and nz // 2 slices; the slope
    includes the input's own 4 bytes per voxel."""
    big, small = engine_bytes(engine, nx, nz, sp), engine_bytes(engine, nx, nz // 2, sp)
    n_big, n_small = nx * nx * nz, nx * nx * (nz // 2)
    slope = (big - small) / (n_big - n_small)
    return slope + 4.0, big - slope * n_big


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller volume (192 x 192 x 160)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--wholebody", action="store_true",
                    help="also run synthesis and segmentation on a 512 x 512 x 600 volume at 2 mm (minutes)")
    args = ap.parse_args()
    nx, nz = (192, 160) if args.quick else (args.size, args.slices)
    for p in PATHS:
        sys.path.insert(0, str(p))
    from RegistrationModuleLib import cli as rcli
    from SegmentationModuleLib import infer as ginf
    from SynthesisModuleLib import infer as sinf
    print(f"volume {nx} x {nx} x {nz}; bytes per input voxel (engine peak RSS + the input itself)")
    print(f"{'engine':<14} {'spacing':>8} {'measured':>9} {'bound':>7} {'fixed MB':>9}")
    worst, ok = {}, {}
    for engine in ("synthesis", "segmentation", "registration"):
        for sp in ((2.0,) if engine == "registration" else (2.0, 1.0)):
            measured, fixed = bytes_per_voxel(engine, nx, nz, sp)
            if engine == "registration":
                bound = rcli.BYTES_PER_FIXED_VOXEL["corrected"]  # the default interpolation
            elif engine == "synthesis":
                ratio = sp * sp * 2.0 / 8.0
                bound = sinf.BYTES_PER_INPUT_VOXEL + sinf.BYTES_PER_2MM_VOXEL * ratio
            else:
                ratio = sp * sp * 2.0 / 64.0
                bound = ginf.BYTES_PER_INPUT_VOXEL + ginf.BYTES_PER_MODEL_VOXEL * ratio
            print(f"{engine:<14} {sp:>6.1f}mm {measured:>9.1f} {bound:>7.1f} {fixed / 2**20:>9.0f}")
            worst[engine] = max(worst.get(engine, 0.0), measured)
            ok[engine] = ok.get(engine, True) and measured <= bound
    wb = 512 * 512 * 600
    measured_wb = ""
    if args.wholebody:
        for engine in ("synthesis", "segmentation"):
            total = peak_kb(engine, 512, 600, 2.0, True) * 1024 / 2**30
            gb = (total * 2**30 - peak_kb(engine, 512, 600, 2.0, False) * 1024 + 4 * wb) / 2**30
            print(f"{engine:<14} 512 x 512 x 600 at 2 mm: {gb:.2f} GB engine + input; {total:.2f} GB peak RSS of "
                  "the whole process (Python, torch, the model, building the test volume)")
            measured_wb += f" measured_wholebody_gb_{engine}={gb:.2f} process_peak_gb_{engine}={total:.2f}"
    print(f"synthesis_bytes_per_voxel={worst['synthesis']:.1f} segmentation_bytes_per_voxel="
          f"{worst['segmentation']:.1f} synthesis_bound_ok={int(ok['synthesis'])} segmentation_bound_ok="
          f"{int(ok['segmentation'])} wholebody_gb_synthesis={worst['synthesis'] * wb / 2**30:.2f} "
          f"wholebody_gb_segmentation={worst['segmentation'] * wb / 2**30:.2f} "
          f"registration_bytes_per_voxel={worst['registration']:.1f} registration_bound_ok={int(ok['registration'])}"
          + measured_wb)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
