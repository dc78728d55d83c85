"""Command-line commands of the reconstruction family (registered by ``petworkbench``).

    petworkbench simulate    --out DIR --patients N [--centers C1,C2] [--tracers FDG,FAPI] [--standard]
    petworkbench reconstruct --sinogram FILE.npz --out IMAGE.nii.gz [--iterations 3 --subsets 8]
    petworkbench lowdose     --input PET.nii.gz --drf 10 --out LOW.nii.gz [--ct CT.nii.gz]
    petworkbench sr4zct      --input CT.nii.gz --out SR.nii.gz [--epochs N]
    petworkbench listmode    --header FILE.l.hdr --out IMAGE.nii.gz [--time-window 0 10]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.requests import option

if TYPE_CHECKING:
    import argparse


@dataclass(kw_only=True)
class _Compute:
    """Where a reconstruction command runs: ``--threads``, ``--device``."""

    threads: int = option(None, parse=int, help="CPU threads")
    device: str = option("auto", help="auto, cpu, cuda[:N] or mps")


@dataclass
class ReconstructRequest(_Compute):
    """``petworkbench reconstruct``: OSEM of a 2D multi-slice sinogram file (command line and module logic)."""

    sinogram: str = option(required=True, help=".npz with prompts (nz, views, bins), spacing; optional additive, "
                           "norm, mu")
    out: str = option(required=True, help="output image")
    iterations: int = option(3, help="OSEM iterations")
    subsets: int = option(8, help="OSEM subsets")
    psf: float = option(0.0, help="resolution model FWHM in mm")
    post_filter: float = option(0.0, help="Gaussian post-filter FWHM in mm")


@dataclass
class LowDoseRequest(_Compute):
    """``petworkbench lowdose``: image-domain low-dose simulation of a PET volume."""

    input: str = option(required=True, help="PET volume")
    drf: float = option(required=True, parse=float, help="dose reduction factor (>= 1)")
    out: str = option(required=True, help="output low-dose image")
    full_out: str = option(None, help="also write the re-simulated full-dose image")
    ct: str = option(None, help="CT on any grid (attenuation); without it no attenuation is modelled")
    counts_per_cm: float = option(2.0e6, help="full-dose true counts per cm axial")
    psf: float = option(4.0, help="resolution model FWHM in mm")
    iterations: int = option(3, help="OSEM iterations")
    subsets: int = option(8, help="OSEM subsets")
    seed: int = option(0, help="random seed")


@dataclass
class SR4ZCTRequest(_Compute):
    """``petworkbench sr4zct``: SR4ZCT self-supervised through-plane resolution enhancement."""

    input: str = option(required=True, help="CT (or other) volume with thick slices")
    out: str = option(required=True, help="output volume")
    out_spacing: float = option(None, parse=float, help="output slice spacing (default: in-plane)")
    thickness: float = option(None, parse=float, help="slice thickness in mm (default: metadata)")
    epochs: int = option(None, parse=int, help="training epochs (default: the method's)")
    seed: int = option(0, help="random seed")


@dataclass
class ListModeRequest(_Compute):
    """``petworkbench listmode``: histogram and reconstruct a Siemens mMR PETLINK list-mode file."""

    header: str = option(required=True, help="interfile list-mode header (.l.hdr) or the .l file")
    out: str = option(required=True, help="output image")
    time_window: tuple = option(None, parse=float, nargs=2, help="START_S END_S: only events in this window")
    iterations: int = option(3, help="OSEM iterations")
    subsets: int = option(6, help="OSEM subsets")


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def _set_threads(args):
    """Thread count, and the torch device the command runs on (``--device``, resolved once)."""
    import torch
    from PETWorkbenchLib.device import choose_device
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    return choose_device(getattr(args, "device", "cpu")).name


def _cmd_simulate(args, rep):
    _set_threads(args)
    from .simulate import generate_dataset, generate_standard_set
    if args.standard:
        man = generate_standard_set(args.out, seed=args.seed, progress=rep)
    else:
        if args.patients is None:
            raise InputError("simulate needs --patients N (patients per known centre) or --standard")
        man = generate_dataset(args.out, args.patients, centers=_csv(args.centers),
                               tracers=tuple(_csv(args.tracers) or ["FDG"]),
                               extra_drfs=tuple(float(d) for d in (_csv(args.extra_drfs) or [])), seed=args.seed,
                               n_test=args.test_patients, n_unknown=args.unknown_patients,
                               second_tracer_every=args.second_tracer_every, max_slices=args.max_slices,
                               max_voxels=args.max_voxels, resume=args.resume, progress=rep)
    import csv
    with open(man) as f:
        n = sum(1 for _ in csv.DictReader(f))
    return {"manifest": str(man), "cases": n}


def _outputs(args, inputs, *outs):
    """Refuse outputs that are inputs, or exist without --overwrite, before any work; the writer keyword args."""
    from PETWorkbenchLib.imageio import check_output
    inputs = [str(i) for i in inputs if i]
    for o in outs:
        if o:
            check_output(o, inputs, args.overwrite)
    return {"inputs": inputs, "overwrite": args.overwrite}


def _cmd_reconstruct(args, rep):
    device = _set_threads(args)
    from .io import reconstruct_sinogram_file
    write = _outputs(args, [args.sinogram], args.out)
    return reconstruct_sinogram_file(args.sinogram, args.out, n_iter=args.iterations, n_subsets=args.subsets,
                                     psf_fwhm_mm=args.psf, post_filter_mm=args.post_filter, device=device,
                                     progress=rep, **write)


def _cmd_lowdose(args, rep):
    device = _set_threads(args)
    from PETWorkbenchLib.imageio import read_image, write_image
    from .imagedomain import simulate_lowdose_image
    write = _outputs(args, [args.input, args.ct], args.out, args.full_out)
    img = read_image(args.input, "PET")
    ct = read_image(args.ct, "CT") if args.ct else None
    out = simulate_lowdose_image(img, args.drf, ct=ct, counts_per_cm=args.counts_per_cm, psf_fwhm_mm=args.psf,
                                 n_iter=args.iterations, n_subsets=args.subsets, seed=args.seed, device=device,
                                 progress=rep)
    write_image(out["low_dose"], args.out, **write)
    res = {"output": str(args.out), "drf": float(args.drf), "prompts": out["prompts"],
           "prompts_low": out["prompts_low"]}
    if args.full_out:
        write_image(out["full_dose"], args.full_out, **write)
        res["full_dose"] = str(args.full_out)
    return res


def _cmd_sr4zct(args, rep):
    device = _set_threads(args)
    from PETWorkbenchLib.imageio import read_image, write_image
    from .sr4zct import sr4zct
    write = _outputs(args, [args.input], args.out)
    img = read_image(args.input, "CT")
    out, info = sr4zct(img, out_spacing_z=args.out_spacing, thickness_mm=args.thickness, epochs=args.epochs,
                       seed=args.seed, device=device, progress=rep)
    write_image(out, args.out, **write)
    return dict(info, output=str(args.out))


def _cmd_listmode(args, rep):
    device = _set_threads(args)
    from .listmode import reconstruct_listmode_file
    tw = tuple(args.time_window) if args.time_window else None
    write = _outputs(args, [args.header], args.out)
    return reconstruct_listmode_file(args.header, args.out, time_window_s=tw, n_iter=args.iterations,
                                     n_subsets=args.subsets, device=device, progress=rep, write=write)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from PETWorkbenchLib.requests import add_arguments
    p = subparsers.add_parser("simulate", help="multi-center pseudo-PET data generator (full/low dose, CT, labels)")
    p.add_argument("--out", required=True, help="output folder (manifest.csv + one folder per case)")
    p.add_argument("--patients", type=int, help="patients per known centre")
    p.add_argument("--centers", help="comma-separated centre profiles (default: C1..C6)")
    p.add_argument("--tracers", default="FDG", help="comma-separated tracers: FDG,FAPI")
    p.add_argument("--extra-drfs", default="20", help="comma-separated extra DRFs written for every case")
    p.add_argument("--test-patients", type=int, default=None, help="test patients per known centre")
    p.add_argument("--unknown-patients", type=int, default=None, help="patients per unknown centre")
    p.add_argument("--second-tracer-every", type=int, default=1,
                   help="further tracers only for every N-th patient of whole-body centres")
    p.add_argument("--max-slices", type=int, default=110)
    p.add_argument("--max-voxels", type=int, default=2_500_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep cases already written")
    p.add_argument("--standard", action="store_true", help="the standard training/test set (ignores sizes)")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_simulate)

    p = subparsers.add_parser("reconstruct", help="OSEM reconstruction of a 2D multi-slice sinogram file (.npz)")
    add_arguments(p, ReconstructRequest)
    p.set_defaults(func=_cmd_reconstruct)

    p = subparsers.add_parser("lowdose", help="image-domain low-dose simulation of a PET volume")
    add_arguments(p, LowDoseRequest)
    p.set_defaults(func=_cmd_lowdose)

    p = subparsers.add_parser("sr4zct", help="SR4ZCT self-supervised through-plane resolution enhancement")
    add_arguments(p, SR4ZCTRequest)
    p.set_defaults(func=_cmd_sr4zct)

    p = subparsers.add_parser("listmode", help="histogram + reconstruct Siemens mMR PETLINK list-mode")
    add_arguments(p, ListModeRequest)
    p.set_defaults(func=_cmd_listmode)
