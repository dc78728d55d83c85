#!/usr/bin/env python
"""Run the family benchmarks, keep their final key=value line, and write the README's results table from them.

Usage: python benchmarks/run_all.py [--quick] [--only reconstruction,synthesis] [--readme-only]

Each benchmark's last output line (key=value figures) is saved to benchmarks/results/<family>.txt together with
the date and machine; the README section between the results markers is regenerated from those files, so no number
in it is typed by hand.
"""

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ["reconstruction", "synthesis", "synthesis_speed", "synthesis_lesions", "segmentation", "interactive",
            "registration", "registration_real", "reliability", "memory"]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

EXPLAIN = {
    "reconstruction": "OSEM on the same 2D multi-slice geometry vs the peer; list-mode counts of the real mMR file; "
                      "SR4ZCT vs cubic on the real CT made 6 mm thick",
    "synthesis": "held-out simulated patients (known centres) and the two unknown centres; dense vs sparse expert "
                 "execution of the full paper configuration",
    "synthesis_speed": "paper configuration per 64^3 patch, dense vs sparse, against the machine's measured peak; "
                       "demo model on a whole-body stack of simulated patients, earlier settings vs today's",
    "synthesis_lesions": "real NEMA IQ phantom: the 2 mm round trip alone, then made low-dose (DRF 10) with our "
                         "simulator, synthesized, lesion-change report",
    "segmentation": "held-out simulated 5 %-dose cases; LDOS vs the same-budget segmentation-only network",
    "interactive": "held-out simulated patients, lesions of known extent at full, low and 5 % dose, simulated "
                   "clicks; PE-MED vs click-seeded SUV 2.5 / 41 % / 50 % / PERCIST thresholds (Dice and MTV error "
                   "after 3 clicks)",
    "registration": "MNI152 T1 2 mm and real abdomen CT 3 mm, each warped by a known field (6 Gaussian bumps); "
                    "ours (CLI defaults) vs ANTs SyN, elastix B-spline NCC and FireANTs in the same run; the demo's "
                    "PET -> CT",
    "registration_real": "30 real inter-subject pairs of ANTs' 2D T1 brain slices; proxy: mean Dice of 3 intensity "
                         "classes; ours (defaults, earlier stabiliser, diffeomorphic smoothness 4 / 1) vs ANTs SyN, "
                         "1 thread",
    "reliability": "bad inputs and faults (full disk, SIGTERM, read-only folder, damaged weights, cut files) through "
                   "the command line in real processes",
    "memory": "engine peak RSS per input voxel against the bound each engine enforces; 512 x 512 x 600 at 2 mm "
              "extrapolated",
}


def parse(line):
    out = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            out[k] = v
    return out


def save(family, last, quick, source):
    RESULTS.mkdir(exist_ok=True)
    stamp = f"# {datetime.date.today()} {platform.machine()} quick={quick} from={source}"
    (RESULTS / f"{family}.txt").write_text(stamp + "\n" + last.strip() + "\n")


def last_figures(text, family):
    keys = {"reconstruction": "adjoint_relerr=", "synthesis": "psnr_low=", "segmentation": "dice_ldos=",
            "interactive": "dice1_pemed=",
            "synthesis_speed": "patch_s_paper=", "synthesis_lesions": "roundtrip_suvmax_10mm_pct=",
            "registration": "mni_err_ours=", "registration_real": "real2d_dice_before=",
            "reliability": "bad_inputs_tried=",
            "memory": "synthesis_bytes_per_voxel="}[family]
    lines = [ln for ln in text.strip().splitlines() if ln.startswith(keys)]
    if not lines:
        raise SystemExit(f"no final key=value line of the {family} benchmark found")
    return lines[-1]


def run(family, quick):
    script = ROOT / "benchmarks" / f"{family}.py"
    cmd = [sys.executable, str(script)] + (["--quick"] if quick else [])
    print("$", " ".join(cmd[1:]), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    sys.stdout.write(p.stdout[-3000:])
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"{family} benchmark failed (exit {p.returncode})")
    save(family, last_figures(p.stdout, family), quick, "run")


def readme_section():
    lines = [BEGIN, "", "| benchmark | figures (last run, from `benchmarks/results/`) |", "|---|---|"]
    for fam in FAMILIES:
        f = RESULTS / f"{fam}.txt"
        if not f.is_file():
            lines.append(f"| {fam} | not run yet |")
            continue
        stamp, data = f.read_text().splitlines()[:2]
        figures = ", ".join(f"`{k}={v}`" for k, v in parse(data).items())
        lines.append(f"| {fam} ({EXPLAIN[fam]}; {stamp.lstrip('# ')}) | {figures} |")
    lines += ["", END]
    return "\n".join(lines)


def update_readme():
    readme = ROOT / "README.md"
    text = readme.read_text()
    section = readme_section()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Measured results\n\n" + section + "\n"
    readme.write_text(text)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--readme-only", action="store_true")
    ap.add_argument("--import-log", action="append", default=[], metavar="FAMILY=LOG",
                    help="take a family's figures from the saved output of an earlier run of its benchmark")
    a = ap.parse_args()
    for item in a.import_log:
        fam, log = item.split("=", 1)
        save(fam, last_figures(Path(log).read_text(), fam), "--quick" in Path(log).read_text() or a.quick,
             f"log of an earlier run ({Path(log).name})")
    if not a.readme_only and not a.import_log:
        for fam in [f for f in (a.only.split(",") if a.only else FAMILIES) if f]:
            run(fam, a.quick)
    update_readme()


if __name__ == "__main__":
    main()
