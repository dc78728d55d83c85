"""Batch runs of the pipeline over many studies: resumable, failure-isolated, local or on a Dask cluster.

Studies come from a CSV (columns ``id`` and ``low_dose`` or ``anatomy``; optional ``ct``, ``full_dose``,
``labels``, ``lesions``; relative paths are relative to the CSV) or from a folder with one sub-folder per study
holding ``low_dose.nii.gz`` (+ optional ``ct.nii.gz``, ``full_dose.nii.gz``, ``labels.nii.gz``,
``lesions.nii.gz``). The PET inputs may be folders holding a PET DICOM series (a ``low_dose``/``full_dose``
folder in a study folder, or its path in the CSV); their SUV comes from the DICOM tags.

* Every row names its inputs (``low_dose``, or ``anatomy`` for a simulated study); an id is a safe folder name
  (letters, digits, ``.``, ``_``, ``-``), never a path. Problems in the list are refused before anything runs,
  naming the row.
* Resumable: a finished study has ``<out>/<id>/DONE.json`` and is skipped; finished steps inside an unfinished
  study are not redone. A changed input file (SHA-256 recorded in ``inputs.json``) or model invalidates the
  study's results (moved to ``superseded/``, never deleted).
* A failing study is recorded in ``<out>/<id>/FAILED.json`` with its error; the others continue, and the command
  ends with exit code 5 and the summary.
* Distributed: ``scheduler="tcp://host:8786"`` sends each study to a Dask distributed cluster (one task per
  study; workers need this package and the data paths); ``scheduler="local:N"`` starts a local cluster of N
  worker processes. Dask was chosen because it is pip-installable, runs the same code on a laptop
  (LocalCluster) and on HPC schedulers (dask-jobqueue for SLURM/PBS/SGE) with just a scheduler address, and needs
  no cluster-side service beyond the scheduler; Ray would add a heavier runtime for no gain here (one independent
  task per study). Training scales separately with ``torchrun`` (DDP).
"""

import csv
import math
import traceback
from pathlib import Path

from PETWorkbenchLib.errors import InputError
from PETWorkbenchLib.progress import Reporter

IMAGE_KEYS = ("low_dose", "ct", "full_dose", "labels", "lesions")
PET_KEYS = ("low_dose", "full_dose")          # may also be folders holding a PET DICOM series


def load_studies(source):
    """CSV file or folder -> list of study dicts (paths made absolute). Raises InputError naming the row of an
    unusable entry (missing or unsafe id, no inputs, duplicate id)."""
    from PETWorkbenchLib.dicom import is_pet_dicom_input

    from .pipeline import check_study_id
    src = Path(source)
    if src.is_file():
        try:
            with open(src, newline="", encoding="utf-8-sig") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise InputError(f"Study list {src} cannot be read as CSV: {e}") from None
        if not rows:
            raise InputError(f"Study list {src} has no rows")
        if "id" not in rows[0]:
            raise InputError(f"Study list {src} needs an 'id' column (columns: {', '.join(map(str, rows[0]))})")
        studies = []
        for n, r in enumerate(rows, start=2):
            s = {k: v.strip() for k, v in r.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}
            try:
                s["id"] = check_study_id(s.get("id"))
            except InputError as e:
                raise InputError(f"Study list {src.name}, line {n}: {e}") from None
            if not s.get("low_dose") and not s.get("anatomy"):
                raise InputError(f"Study list {src.name}, line {n} (study {s['id']}): no low_dose PET given (or "
                                 "anatomy=sample to simulate one)")
            for k in IMAGE_KEYS:
                if k in s and not Path(s[k]).is_absolute():
                    s[k] = str((src.parent / s[k]).resolve())
            if s.get("anatomy") not in (None, "sample") and not Path(s["anatomy"]).is_absolute():
                s["anatomy"] = str((src.parent / s["anatomy"]).resolve())
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
                else:
                    if k in PET_KEYS and is_pet_dicom_input(d / k):
                        s[k] = str((d / k).resolve())
            if "low_dose" in s:
                s["id"] = check_study_id(d.name)
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


def _client(scheduler, timeout_s=10):
    """Dask client for ``local:N`` or a scheduler address; InputError with one line when neither works."""
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise InputError(f"--scheduler-timeout must be a positive number of seconds, not {timeout_s}")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise InputError("--scheduler needs Dask: pip install 'dask[distributed]'") from None
    if scheduler.startswith("local"):
        n_text = scheduler.partition(":")[2] or "2"
        if not n_text.isdigit() or int(n_text) < 1:
            raise InputError(f"Scheduler {scheduler!r}: local:N needs a positive number of workers, e.g. local:2")
        cluster = LocalCluster(n_workers=int(n_text), threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), cluster
    if "://" not in scheduler and ":" not in scheduler:
        raise InputError(f"Scheduler {scheduler!r} is neither local:N nor an address like tcp://host:8786")
    try:
        return Client(scheduler, timeout=f"{timeout_s:g}s"), None
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"Cannot reach the Dask scheduler at {scheduler} within {timeout_s:g} s "
                         f"({type(e).__name__}); check the address and that the scheduler is running") from None


def _run_one(spec, out_root, steps, device, seed, models=None):
    """Run one study; never raises (except on cancel): returns a status dict (also written to DONE.json or
    FAILED.json)."""
    from PETWorkbenchLib.errors import Cancelled, as_user_error
    from PETWorkbenchLib.imageio import write_json
    from .pipeline import run_study
    d = Path(out_root) / str(spec.get("id", "unnamed"))
    failed = d / "FAILED.json"
    try:
        summary = run_study(spec, out_root, steps=steps, device=device, seed=seed, models=models)
        if failed.exists():
            failed.unlink()
        return {"id": spec["id"], "status": "skipped" if summary.get("skipped") else "done",
                "seconds": summary.get("seconds"), "metrics": summary.get("metrics", {})}
    except Exception as e:  # noqa: BLE001 - one bad study must not stop the batch
        user = as_user_error(e)
        if isinstance(user, Cancelled):
            raise user from None
        message = str(user) if user is not None else f"internal error ({type(e).__name__}: {e})"
        info = {"id": spec.get("id"), "status": "failed", "error": message,
                "kind": type(user or e).__name__, "exit_code": user.exit_code if user is not None else 1}
        if user is None:
            info["traceback"] = traceback.format_exc()
        try:
            write_json(info, failed)
        except Exception:  # noqa: BLE001 - e.g. a read-only study folder: the summary still reports it
            pass
        return {k: info[k] for k in ("id", "status", "error")}


def run_batch(studies, out_root, steps=None, device="cpu", seed=0, scheduler=None, models=None, progress=None,
              cancel=None, scheduler_timeout_s=10):
    """Run the pipeline on every study. Returns {"studies": [status...], "done", "skipped", "failed"}.

    ``scheduler_timeout_s``: how long to try to reach a scheduler address before refusing (exit code 2)."""
    from PETWorkbenchLib.errors import ResourceError, os_error_reason
    from PETWorkbenchLib.imageio import write_json
    from .pipeline import check_steps
    check_steps(steps)
    rep = Reporter(progress, cancel)
    out_root = Path(out_root)
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"Cannot create the output folder {out_root}: {os_error_reason(e)}") from None
    results = []
    if scheduler:
        from dask.distributed import as_completed
        client, cluster = _client(scheduler, scheduler_timeout_s)
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
    try:
        write_json(summary, out_root / "batch_summary.json")
    except ResourceError as e:
        summary["summary_file"] = f"not written: {e}"
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
