"""Batch runs of the pipeline over many studies: resumable, failure-isolated, local or on a Dask cluster.

Studies come from a CSV (columns ``id`` and ``low_dose`` or ``anatomy``; optional ``ct``, ``full_dose``,
``labels``, ``lesions``; relative paths are relative to the CSV) or from a folder with one sub-folder per study
holding ``low_dose.nii.gz`` (+ optional ``ct.nii.gz``, ``full_dose.nii.gz``, ``labels.nii.gz``,
``lesions.nii.gz``).

* Resumable: a finished study has ``<out>/<id>/DONE.json`` and is skipped; finished steps inside an unfinished
  study are not redone.
* A failing study is recorded in ``<out>/<id>/FAILED.json`` with its error; the others continue.
* Distributed: ``scheduler="tcp://host:8786"`` sends each study to a Dask distributed cluster (one task per
  study; workers need this package and the data paths); ``scheduler="local:N"`` starts a local cluster of N
  worker processes. Dask was chosen because it is pip-installable, runs the same code on a laptop
  (LocalCluster) and on HPC schedulers (dask-jobqueue for SLURM/PBS/SGE) with just a scheduler address, and needs
  no cluster-side service beyond the scheduler; Ray would add a heavier runtime for no gain here (one independent
  task per study). Training scales separately with ``torchrun`` (DDP).
"""

import csv
import json
import traceback
from pathlib import Path

from .errors import InputError
from .progress import Reporter

IMAGE_KEYS = ("low_dose", "ct", "full_dose", "labels", "lesions")


def load_studies(source):
    """CSV file or folder -> list of study dicts (paths made absolute)."""
    src = Path(source)
    if src.is_file():
        with open(src, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            raise InputError(f"Study list {src} has no rows")
        if "id" not in rows[0]:
            raise InputError(f"Study list {src} needs an 'id' column (columns: {', '.join(rows[0])})")
        studies = []
        for r in rows:
            s = {k: v.strip() for k, v in r.items() if v and v.strip()}
            for k in IMAGE_KEYS:
                if k in s and not Path(s[k]).is_absolute():
                    s[k] = str((src.parent / s[k]).resolve())
            studies.append(s)
    elif src.is_dir():
        studies = []
        for d in sorted(p for p in src.iterdir() if p.is_dir()):
            s = {"id": d.name}
            for k in IMAGE_KEYS:
                for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
                    if (d / f"{k}{ext}").is_file():
                        s[k] = str((d / f"{k}{ext}").resolve())
                        break
            if "low_dose" in s:
                studies.append(s)
        if not studies:
            raise InputError(f"No study folders with a low_dose image found in {src}")
    else:
        raise InputError(f"Study list not found: {src}")
    ids = [s["id"] for s in studies]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise InputError(f"Duplicate study ids: {', '.join(sorted(dup))}")
    return studies


def _run_one(spec, out_root, steps, device, seed, models=None):
    """Run one study; never raises: returns a status dict (also written to DONE.json / FAILED.json)."""
    from .pipeline import run_study
    d = Path(out_root) / str(spec.get("id", "unnamed"))
    failed = d / "FAILED.json"
    try:
        summary = run_study(spec, out_root, steps=steps, device=device, seed=seed, models=models)
        if failed.exists():
            failed.unlink()
        return {"id": spec["id"], "status": "skipped" if summary.get("skipped") else "done",
                "seconds": summary.get("seconds"), "metrics": summary.get("metrics", {})}
    except Exception as e:  # one bad study must not stop the batch
        d.mkdir(parents=True, exist_ok=True)
        info = {"id": spec.get("id"), "status": "failed", "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}
        failed.write_text(json.dumps(info, indent=1))
        return {k: info[k] for k in ("id", "status", "error")}


def run_batch(studies, out_root, steps=None, device="cpu", seed=0, scheduler=None, models=None, progress=None,
              cancel=None):
    """Run the pipeline on every study. Returns {"studies": [status...], "done", "skipped", "failed"}."""
    rep = Reporter(progress, cancel)
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    results = []
    if scheduler:
        from dask.distributed import Client, LocalCluster, as_completed
        cluster = None
        if scheduler.startswith("local"):
            n = int(scheduler.split(":")[1]) if ":" in scheduler else 2
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
            client = Client(cluster)
        else:
            client = Client(scheduler)
        try:
            futures = [client.submit(_run_one, s, str(out_root), steps, device, seed, models, key=f"study-{s['id']}",
                                     pure=False) for s in studies]
            for i, fut in enumerate(as_completed(futures)):
                results.append(fut.result())
                rep((i + 1) / len(studies), f"{results[-1]['id']}: {results[-1]['status']}")
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        for i, s in enumerate(studies):
            sub = rep.sub(i / len(studies), (i + 1) / len(studies))
            sub(0.0, f"study {s.get('id')} ({i + 1} of {len(studies)})")
            results.append(_run_one(s, out_root, steps, device, seed, models))
    order = {s["id"]: i for i, s in enumerate(studies)}
    results.sort(key=lambda r: order.get(r["id"], 0))
    counts = {k: sum(r["status"] == k for r in results) for k in ("done", "skipped", "failed")}
    summary = {"studies": results, **counts, "out": str(out_root)}
    (out_root / "batch_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


def format_table(summary):
    """The one-screen summary table of a batch."""
    keys = ["psnr_low", "psnr_synth", "dice_low", "dice_synth", "reg_disp_err_mm"]
    lines = [f"{'study':<16} {'status':<8} {'time s':>7} " + " ".join(f"{k:>15}" for k in keys)]
    for r in summary["studies"]:
        m = r.get("metrics") or {}
        vals = " ".join(f"{m[k]:>15.3f}" if isinstance(m.get(k), (int, float)) else f"{'-':>15}" for k in keys)
        t = f"{r['seconds']:>7.1f}" if isinstance(r.get("seconds"), (int, float)) else f"{'-':>7}"
        lines.append(f"{r['id']:<16} {r['status']:<8} {t} {vals}")
        if r["status"] == "failed":
            lines.append(f"    error: {r['error']}")
    lines.append(f"done {summary['done']}, skipped {summary['skipped']}, failed {summary['failed']}; "
                 f"outputs in {summary['out']}")
    return "\n".join(lines)
