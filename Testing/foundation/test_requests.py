"""Typed requests: the module logic's argument list and the command line describe the same request."""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "SynthesisModule", ROOT / "SegmentationModule", ROOT / "RegistrationModule"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from PETWorkbenchLib.requests import add_arguments, from_args, option, to_argv


def _round_trip(cls, request):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return from_args(cls, parser.parse_args(to_argv(request)))


def test_engine_requests_round_trip():
    from RegistrationModuleLib.cli import RegisterRequest
    from SegmentationModuleLib.cli import SegmentRequest
    from SynthesisModuleLib.cli import SynthesizeRequest
    cases = [
        (SynthesizeRequest, SynthesizeRequest(input="a.nii", output="b.nii", overlap=0.25, patch=32,
                                              units="Bq/ml", weight_kg=70.0, injected_dose_mbq=350.0)),
        (SegmentRequest, SegmentRequest(input="a.nii", output="l.nii", organs="liver,spleen", device="cpu")),
        (RegisterRequest, RegisterRequest(fixed="f.nii", moving="m.nii", output="u.nii", similarity="mind",
                                          iterations=(20, 10), diffeomorphic=True, fixed_mask="k.nii",
                                          penalty=1.0, interpolation="cubic")),
    ]
    for cls, req in cases:
        assert _round_trip(cls, req) == req


def test_a_new_option_is_one_field():
    @dataclass
    class Request:
        input: str = option(positional=True, help="input")
        scale: float = option(1.0, help="scale")
        fast: bool = option(flag=True, help="go fast")
        levels: tuple = option((3, 2), parse=lambda t: tuple(int(v) for v in t.split(",")),
                               format=lambda v: ",".join(map(str, v)), help="levels")

    req = Request(input="x", scale=2.0, fast=True, levels=(5, 4, 3))
    assert to_argv(req) == ["x", "--scale", "2.0", "--fast", "--levels", "5,4,3"]
    assert to_argv(Request(input="x")) == ["x"]                         # defaults are left to the engine
    assert _round_trip(Request, req) == req
    parser = argparse.ArgumentParser()
    add_arguments(parser, Request)
    with pytest.raises(SystemExit):
        parser.parse_args(["x", "--scale", "abc"])


def test_reconstruction_requests_round_trip():
    sys.path.insert(0, str(ROOT / "ReconstructionModule"))
    from ReconstructionModuleLib.cli import ListModeRequest, LowDoseRequest, ReconstructRequest, SR4ZCTRequest
    cases = [
        (ReconstructRequest, ReconstructRequest(sinogram="s.npz", out="o.nii", post_filter=4.0, iterations=2)),
        (LowDoseRequest, LowDoseRequest(input="p.nii", out="l.nii", drf=10.0, seed=3, ct="ct.nii")),
        (SR4ZCTRequest, SR4ZCTRequest(input="c.nii", out="s.nii", epochs=5, thickness=3.0)),
        (ListModeRequest, ListModeRequest(header="x.l.hdr", out="o.nii", time_window=(0.0, 10.0))),
    ]
    for cls, req in cases:
        back = _round_trip(cls, req)
        if cls is ListModeRequest:
            back.time_window = tuple(back.time_window)
        assert back == req
