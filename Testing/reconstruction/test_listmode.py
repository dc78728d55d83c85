"""List-mode reader/histogrammer/reconstruction on the real Siemens mMR PETLINK file."""


import numpy as np
import pytest


torch = pytest.importorskip("torch")
sitk = pytest.importorskip("SimpleITK")

from PETWorkbenchLib.errors import InputError
from ReconstructionModuleLib import listmode as L
from ReconstructionModuleLib.simulate import shared_data_dir

torch.set_num_threads(1)
LM_DIR = shared_data_dir() / "stir_mmr_small_listmode"
HDR = LM_DIR / "PET_ACQ_small.l.hdr.STIR"
pytestmark = pytest.mark.skipif(not HDR.exists(), reason="mMR list-mode example not available")


@pytest.fixture(scope="module")
def lm():
    return L.read_listmode(HDR)


def test_counts_equal_the_file(lm):
    # every 32-bit word of the file is an event (prompt or delay) or a tag
    n_words = (LM_DIR / "small_listmode_file.l").stat().st_size // 4
    assert lm["n_words"] == n_words
    assert lm["prompts"].size + lm["delays"].size + lm["n_tags"] == n_words
    # the numbers documented for this file (data README): 218 881 prompts, 35 320 delays, 613 1-ms time tags
    assert (lm["prompts"].size, lm["delays"].size, lm["n_time_tags"]) == (218881, 35320, 613)
    assert lm["duration_ms"] == 613
    # reading the .l file directly finds the same header and events
    lm2 = L.read_listmode(LM_DIR / "small_listmode_file.l")
    assert np.array_equal(lm2["prompts"], lm["prompts"]) and lm2["geometry"]["rings"] == 64


def test_histogram_keeps_every_count_and_net_is_prompts_minus_delays(lm):
    h = L.histogram(lm, axial_rebin=4, view_mash=2, bin_mash=2)
    assert h["prompts"].sum() == 218881 and h["delays"].sum() == 35320
    assert np.array_equal(h["net"], h["prompts"] - h["delays"])
    assert h["prompts"].shape == (32, 126, 172)
    # SSRB of span-1 data: the axial count profile peaks in the middle of the scanner, not at the ends
    prof = h["prompts"].sum(axis=(1, 2))
    assert prof[len(prof) // 2 - 4: len(prof) // 2 + 4].mean() > 5 * prof[:3].mean()


def test_time_window_selects_a_fraction(lm):
    full = L.histogram(lm, axial_rebin=16)
    half = L.histogram(lm, time_window_s=(0.0, 0.3065), axial_rebin=16)
    rest = L.histogram(lm, time_window_s=(0.3065, 10.0), axial_rebin=16)
    assert half["n_prompts"] + rest["n_prompts"] == full["n_prompts"]
    assert abs(half["time_fraction"] - 0.5) < 0.05  # a constant count rate over 0.613 s
    assert np.array_equal(half["prompts"] + rest["prompts"], full["prompts"])
    with pytest.raises(InputError, match="zero counts"):
        L.histogram(lm, time_window_s=(100.0, 200.0))
    with pytest.raises(InputError, match="after its start"):
        L.histogram(lm, time_window_s=(1.0, 0.5))


def test_reconstruction_shows_the_object(lm):
    """Two independent halves of the acquisition reconstruct to the same compact object."""
    kw = dict(image_size=64, pixel_mm=8.0, axial_rebin=32, view_mash=4, bin_mash=4, n_iter=2, n_subsets=3,
              post_filter_mm=16.0)
    a = sitk.GetArrayFromImage(L.reconstruct_listmode(lm, (0.0, 0.3065), **kw)["image"]).sum(0)
    b = sitk.GetArrayFromImage(L.reconstruct_listmode(lm, (0.3065, 10.0), **kw)["image"]).sum(0)
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert r > 0.8, r
    # the activity is compact: most of it lies within 12 cm of its centre of mass, far less than the 60 cm FOV
    yy, xx = np.mgrid[0:64, 0:64] * 8.0
    w = a / a.sum()
    cy, cx = (w * yy).sum(), (w * xx).sum()
    assert w[np.hypot(yy - cy, xx - cx) < 120].sum() > 0.85


def test_bad_listmode_input(tmp_path):
    f = tmp_path / "x.dat"
    f.write_bytes(b"1234")
    with pytest.raises(InputError, match="unknown list-mode file format"):
        L.read_listmode(f)
    g = tmp_path / "odd.l"
    g.write_bytes(b"12345")
    with pytest.raises(InputError, match="multiple of 4"):
        L.read_listmode(g)
    h = tmp_path / "bad.l.hdr"
    h.write_text("!INTERFILE:=\ndata format:=image\n")
    with pytest.raises(InputError, match="unknown list-mode format"):
        L.read_listmode(h)
