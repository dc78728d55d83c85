"""Siemens Biograph mMR list-mode (PETLINK 32-bit words): reader, histogrammer and rebinned 2D reconstruction.

PETLINK words (little endian, 32 bit):
* bit 31 = 0: coincidence event; bit 30 = 1 prompt, 0 delay; bits 0-29 = sinogram bin address
  ``((sinogram * n_views) + view) * n_bins + bin`` of the uncompressed (span 1) sinogram.
* bit 31 = 1: tag; top nibble 0b1000 = time tag, bits 0-28 = elapsed time in ms (one every 1 ms).

Span-1 sinograms come ordered by segment (ring difference 0, then +-1, +-2, ...; the sign does not matter here)
and, within a segment, by the lower ring.  Single-slice rebinning (SSRB) puts the line of response of rings
(r1, r2) into the direct slice r1 + r2 (2 * rings - 1 slices of half the ring spacing); slices can be grouped
further (``axial_rebin``).  Radial bins are not arc corrected: bin b sits at s = R sin((b - n_bins/2) pi / D)
with R the effective ring radius and D the detectors per ring; the projector uses those positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
import torch

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.progress import Reporter

from .osem import osem
from .projector import ParallelProjector, PETSystem

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["read_interfile_header", "read_listmode", "histogram", "reconstruct_listmode",
           "reconstruct_listmode_file", "MMR"]

# Siemens Biograph mMR geometry (STIR scanner description / Interfile template of the same data)
MMR = dict(name="Siemens mMR", rings=64, detectors_per_ring=504, n_views=252, n_bins=344, max_ring_diff=60,
           ring_spacing_mm=4.0625, inner_radius_mm=328.0, doi_mm=7.0)


def read_interfile_header(path: str | Path) -> dict:
    """Interfile ``key := value`` pairs; keys lower-cased without the ``!``/``%`` prefixes."""
    out = {}
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        raise InputError(f"cannot read header {path}: {e}") from None
    if "interfile" not in text[:200].lower():
        raise InputError(f"{Path(path).name} is not an Interfile header (no '!INTERFILE' line)")
    for line in text.splitlines():
        if ":=" not in line:
            continue
        k, v = line.split(":=", 1)
        k = k.strip().lstrip("!%").strip().lower()
        k = " ".join(k.split())
        out[k] = v.strip()
    return out


def _geometry_from_header(h):
    g = dict(MMR)
    try:
        if "number of rings" in h:
            g["rings"] = int(h["number of rings"])
        if "distance between rings (cm)" in h:
            g["ring_spacing_mm"] = float(h["distance between rings (cm)"]) * 10
        if "gantry crystal radius (cm)" in h:
            g["inner_radius_mm"] = float(h["gantry crystal radius (cm)"]) * 10
        if "number of views" in h:
            g["n_views"] = int(h["number of views"])
        if "number of projections" in h:
            g["n_bins"] = int(h["number of projections"])
        if "maximum ring difference" in h:
            g["max_ring_diff"] = int(h["maximum ring difference"])
        g["axial_compression"] = int(h.get("axial compression", 1))
    except ValueError as e:
        raise InputError(f"malformed list-mode header value: {e}") from None
    g["detectors_per_ring"] = 2 * g["n_views"]
    return g


def read_listmode(path: str | Path) -> dict:
    """Read a PETLINK list-mode file (the ``.l`` file or its Interfile ``.l.hdr`` header).

    Returns dict(prompts=addresses, delays=addresses, prompt_time_ms, delay_time_ms, n_time_tags, duration_ms,
    n_words, geometry, path).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"list-mode file not found: {p}")
    header = {}
    data = p
    if p.suffix.lower() in (".hdr", ".stir") or p.name.lower().endswith((".l.hdr", ".l.hdr.stir")):
        header = read_interfile_header(p)
        ns = header.get("header name space", "").lower()
        fmt = header.get("data format", "").lower()
        if "petlink" not in ns and "coincidencelist" not in fmt.replace(" ", ""):
            raise InputError(f"unknown list-mode format in {p.name}: expected a PETLINK CoincidenceList header "
                             f"(name space {ns!r}, data format {fmt!r})")
        data = p.parent / header.get("name of data file", "")
        if not data.is_file():
            raise InputError(f"list-mode data file named in the header not found: {data}")
    elif p.suffix.lower() != ".l":
        raise InputError(f"unknown list-mode file format '{p.suffix}' for {p.name}: expected a PETLINK .l file "
                         "or its .l.hdr Interfile header")
    else:
        for cand in (p.with_name(p.name + ".hdr"), p.with_name(p.name + ".hdr.STIR"),
                     p.with_name(p.stem + ".l.hdr"), p.with_name(p.stem + ".l.hdr.STIR")):
            if cand.exists():
                header = read_interfile_header(cand)
                break
        if not header:  # a header next to the data with another stem
            for cand in sorted(p.parent.glob("*.l.hdr*")):
                h = read_interfile_header(cand)
                if h.get("name of data file", "") == p.name:
                    header = h
                    break
    geom = _geometry_from_header(header)
    if geom.get("axial_compression", 1) != 1:
        raise InputError(f"only span-1 (axial compression 1) list-mode is supported, header says "
                         f"{geom['axial_compression']}")
    size = data.stat().st_size
    if size == 0 or size % 4:
        raise InputError(f"{data.name} is not a 32-bit PETLINK stream ({size} bytes, not a positive multiple of 4)")
    w = np.fromfile(data, dtype="<u4")
    is_event = (w >> 31) == 0
    is_prompt = is_event & (((w >> 30) & 1) == 1)
    is_delay = is_event & (((w >> 30) & 1) == 0)
    is_time = (~is_event) & ((w >> 28) == 0x8)
    pos = np.flatnonzero(is_time)
    tvals = (w[pos] & 0x1FFFFFFF).astype(np.int64)
    # time of an event = the last time tag before it (0 before the first tag)
    def times(mask):
        idx = np.flatnonzero(mask)
        k = np.searchsorted(pos, idx, side="right") - 1
        return np.where(k >= 0, tvals[np.clip(k, 0, None)] if len(tvals) else 0, 0).astype(np.int64)
    addr = (w & 0x3FFFFFFF).astype(np.int64)
    n_sino = _n_sinograms(geom)
    limit = n_sino * geom["n_views"] * geom["n_bins"]
    pa, da = addr[is_prompt], addr[is_delay]
    if (pa.size and pa.max() >= limit) or (da.size and da.max() >= limit):
        raise InputError(f"bin addresses exceed the span-1 sinogram size {limit} of the {geom['name']} geometry; "
                         "is this an mMR PETLINK file?")
    return dict(prompts=pa, delays=da, prompt_time_ms=times(is_prompt), delay_time_ms=times(is_delay),
                n_time_tags=int(is_time.sum()), n_tags=int((~is_event).sum()), n_words=int(w.size),
                duration_ms=int(tvals.max() + 1) if tvals.size else 0, geometry=geom, path=str(data))


def _segment_table(geom):
    """[(ring difference |d|, number of axial positions)] in stream order: 0, then each |d| twice."""
    R, mrd = geom["rings"], geom["max_ring_diff"]
    tab = [(0, R)]
    for d in range(1, mrd + 1):
        tab += [(d, R - d), (d, R - d)]
    return tab


def _n_sinograms(geom):
    return sum(n for _, n in _segment_table(geom))


def _ssrb_lut(geom):
    """Direct slice index (r1 + r2) of every span-1 sinogram."""
    out = []
    for d, n in _segment_table(geom):
        out.append(2 * np.arange(n) + d)
    return np.concatenate(out)


def histogram(lm: dict, time_window_s: tuple[float, float] | None = None, axial_rebin: int = 1, view_mash: int = 1,
              bin_mash: int = 1) -> dict:
    """SSRB-histogram prompts and delays into 2D sinograms (n_slices, n_views, n_bins).

    ``time_window_s``: (start, end) seconds; only events with a time tag in [start, end) are used.  Returns
    dict(prompts, delays, net = prompts - delays, n_prompts, n_delays, time_fraction, slice_mm, ...).
    """
    g = lm["geometry"]
    for name, v in (("axial_rebin", axial_rebin), ("view_mash", view_mash), ("bin_mash", bin_mash)):
        if int(v) < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if g["n_views"] % view_mash or g["n_bins"] % bin_mash:
        raise InputError(f"view_mash {view_mash} / bin_mash {bin_mash} must divide {g['n_views']} views / "
                         f"{g['n_bins']} bins")
    pm = np.ones(lm["prompts"].shape, bool)
    dm = np.ones(lm["delays"].shape, bool)
    frac = 1.0
    if time_window_s is not None:
        t0, t1 = (float(t) * 1000.0 for t in time_window_s)
        if not t1 > t0:
            raise InputError(f"time window end must be after its start, got {time_window_s}")
        pm = (lm["prompt_time_ms"] >= t0) & (lm["prompt_time_ms"] < t1)
        dm = (lm["delay_time_ms"] >= t0) & (lm["delay_time_ms"] < t1)
        frac = float(pm.sum()) / max(1, lm["prompts"].size)
        if pm.sum() == 0:
            raise InputError(f"the time window {time_window_s} s contains zero counts "
                             f"(data span {lm['duration_ms'] / 1000:.3f} s)")
    lut = _ssrb_lut(g)
    nv, nb = g["n_views"], g["n_bins"]
    n_slices_full = 2 * g["rings"] - 1
    n_slices = int(math.ceil(n_slices_full / axial_rebin))
    out = {}
    for key, m in (("prompts", pm), ("delays", dm)):
        a = lm[key][m]
        b = a % nb
        v = (a // nb) % nv
        sl = lut[a // (nb * nv)] // axial_rebin
        flat = (sl * (nv // view_mash) + v // view_mash) * (nb // bin_mash) + b // bin_mash
        h = np.bincount(flat, minlength=n_slices * (nv // view_mash) * (nb // bin_mash))
        out[key] = h.reshape(n_slices, nv // view_mash, nb // bin_mash).astype(np.float32)
    out["net"] = out["prompts"] - out["delays"]
    out.update(n_prompts=int(pm.sum()), n_delays=int(dm.sum()), time_fraction=frac,
               slice_mm=g["ring_spacing_mm"] / 2 * axial_rebin, n_slices=n_slices,
               bin_positions_mm=_bin_positions(g, bin_mash), view_mash=view_mash)
    return out


def _bin_positions(g, bin_mash=1):
    R = g["inner_radius_mm"] + g["doi_mm"]
    b = np.arange(g["n_bins"]) - g["n_bins"] // 2
    s = R * np.sin(b * math.pi / g["detectors_per_ring"])
    return s.reshape(-1, bin_mash).mean(1)


def reconstruct_listmode(lm: dict, time_window_s: tuple[float, float] | None = None, image_size: int = 128,
                         pixel_mm: float = 4.0, axial_rebin: int = 16, view_mash: int = 2, bin_mash: int = 2,
                         n_iter: int = 3, n_subsets: int = 6, post_filter_mm: float = 0.0,
                         device: str | torch.device = "cpu", progress: Callable[[float, str], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> dict:
    """Histogram (SSRB) and reconstruct with OSEM; prompts are the data, the delays (flat per slice) the randoms
    estimate.  No attenuation or normalisation files come with the data, so the image is not quantitative.
    Returns dict(image=Image, histogram=..., ...)."""
    rep = Reporter(progress, cancel)
    rep(0.0, "histogramming")
    h = histogram(lm, time_window_s, axial_rebin, view_mash, bin_mash)
    if h["prompts"].sum() <= 0:
        raise InputError("the list-mode data have zero prompts")
    nz, nv, nb = h["prompts"].shape
    proj = ParallelProjector(image_size, image_size, pixel_mm, n_angles=nv, n_bins=nb, n_subsets=n_subsets,
                             bin_positions_mm=h["bin_positions_mm"], device=device)
    sysm = PETSystem((nz, image_size, image_size), (h["slice_mm"], pixel_mm, pixel_mm), projector=proj,
                     device=device)
    # randoms: delays spread evenly over the bins of each slice (a variance-reduced, unbiased estimate)
    r = np.broadcast_to(h["delays"].sum(axis=(1, 2), keepdims=True) / (nv * nb), h["prompts"].shape)
    r = np.ascontiguousarray(r, dtype=np.float32)
    x = osem(sysm, torch.from_numpy(h["prompts"]), torch.from_numpy(r), n_iter=n_iter,
             post_filter_fwhm_mm=post_filter_mm, progress=rep.sub(0.05, 1.0))
    img = sitk.GetImageFromArray(x.cpu().numpy().astype(np.float32))
    img.SetSpacing((pixel_mm, pixel_mm, h["slice_mm"]))
    img.SetOrigin((-(image_size - 1) / 2 * pixel_mm, -(image_size - 1) / 2 * pixel_mm,
                   -(nz - 1) / 2 * h["slice_mm"]))
    return dict(image=img, histogram=h)


def reconstruct_listmode_file(path: str | Path, out: str | Path, time_window_s: tuple[float, float] | None = None,
                              n_iter: int = 3, n_subsets: int = 6, progress: Callable[[float, str], None] | None = None,
                              cancel: Callable[[], bool] | None = None, write: dict | None = None, **kw: Any) -> dict:
    from PETWorkbenchLib.imageio import write_image
    lm = read_listmode(path)
    res = reconstruct_listmode(lm, time_window_s, n_iter=n_iter, n_subsets=n_subsets, progress=progress,
                               cancel=cancel, **kw)
    write_image(res["image"], out, **(write or {"inputs": [path]}))
    h = res["histogram"]
    return {"output": str(out), "prompts": h["n_prompts"], "delays": h["n_delays"],
            "time_tags": lm["n_time_tags"], "duration_s": lm["duration_ms"] / 1000.0,
            "time_fraction": h["time_fraction"], "net_trues": h["n_prompts"] - h["n_delays"]}
