"""Run an engine command in a separate process, with progress, cancel and engine errors as exceptions.

The child runs ``python -m PETWorkbenchApp.cli <args> --progress-lines``. Its standard output carries

* ``PWB_PROGRESS {"fraction": f, "message": m}``: progress, turned into ``progress(f, m)`` calls;
* ``PWB_RESULT {...}``: the command's JSON summary, available as ``job.result``;
* ``PWB_ERROR {"type": t, "message": m}``: the engine's error, raised as :class:`EngineError` by ``wait()``;
* anything else: log lines, passed to ``log(line)``.

Callbacks are only ever called from the thread that calls :meth:`WorkerJob.poll` or :meth:`WorkerJob.wait`, so a
Slicer widget can poll from a QTimer on the GUI thread while a script just calls ``wait()``.

:meth:`WorkerJob.cancel` ends the child and every process it started (it runs in its own process group / session),
first politely, then by force, within about 2 seconds.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import Cancelled, EngineError

PROGRESS, RESULT, ERROR = "PWB_PROGRESS ", "PWB_RESULT ", "PWB_ERROR "
_REPO = Path(__file__).resolve().parent.parent


def engine_pythonpath():
    """Folders the child needs on sys.path: the folder holding PETWorkbenchLib and each <Name>Module folder."""
    paths = [str(_REPO)] + sorted(str(p) for p in _REPO.glob("*Module") if p.is_dir())
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join(paths + ([old] if old else []))


class WorkerJob:
    def __init__(self, args, progress=None, log=None, done=None, python=None, env=None, cwd=None):
        self.args = [str(a) for a in args]
        self.progress, self.log, self.done = progress, log, done
        self.result = None
        self.error = None
        self.cancelled = False
        self.log_lines = []
        self._queue = queue.Queue()
        self._finished_dispatched = False
        cmd = [python or sys.executable, "-u", "-m", "PETWorkbenchApp.cli"] + self.args + ["--progress-lines"]
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = engine_pythonpath()
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=full_env, cwd=cwd, text=True, encoding="utf-8", errors="replace",
                                     bufsize=1, **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # -- reading (background thread): only puts items into the queue
    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self.proc.stdout.close()
        self._queue.put(None)

    def _handle(self, line):
        if line.startswith(PROGRESS):
            try:
                d = json.loads(line[len(PROGRESS):])
            except json.JSONDecodeError:
                return
            if self.progress:
                self.progress(float(d.get("fraction", 0.0)), d.get("message", ""))
        elif line.startswith(RESULT):
            self.result = json.loads(line[len(RESULT):])
        elif line.startswith(ERROR):
            d = json.loads(line[len(ERROR):])
            self.error = EngineError(d.get("message", "engine error"), d.get("type", "EngineError"))
        else:
            self.log_lines.append(line)
            if self.log:
                self.log(line)

    def poll(self):
        """Dispatch pending output to the callbacks. Returns True while the job is still running."""
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return True
            if line is None:
                self._finish()
                return False
            self._handle(line)

    def _finish(self):
        if self._finished_dispatched:
            return
        self.proc.wait()
        self._finished_dispatched = True
        if self.cancelled:
            self.error = Cancelled("Cancelled by the user")
        elif self.proc.returncode != 0 and self.error is None:
            tail = "\n".join(self.log_lines[-20:])
            self.error = EngineError(f"Engine process ended with exit code {self.proc.returncode}:\n{tail}")
        if self.error is not None:
            self.error.log = "\n".join(self.log_lines)
        if self.done:
            self.done(self)

    @property
    def returncode(self):
        """The engine's exit code (PETWorkbenchLib.errors: 130 when cancelled, whatever signal ended it); None while
        it runs."""
        if self.proc.poll() is None:
            return None
        return 130 if self.cancelled else self.proc.returncode

    @property
    def running(self):
        return not self._finished_dispatched

    def wait(self, timeout=None, interval=0.05):
        """Block until the job ends, dispatching callbacks. Returns the result dict or raises the engine's error."""
        t0 = time.monotonic()
        while self.poll():
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.cancel()
                raise TimeoutError(f"Engine command did not finish within {timeout} s and was stopped")
            time.sleep(interval)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self, grace=1.0):
        """End the whole process tree: terminate, then kill whatever is left after ``grace`` seconds."""
        if self.proc.poll() is not None:
            return
        self.cancelled = True
        _kill_tree(self.proc, grace)


def _kill_tree(proc, grace):
    try:
        import psutil
        try:
            parent = psutil.Process(proc.pid)
            procs = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    except ImportError:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
        else:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(grace + 1.0)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_cli(args, progress=None, log=None, done=None, wait=False, python=None, env=None, timeout=None):
    """Start ``petworkbench <args>`` in a worker process.

    With ``wait=True`` (scripting, batch) block and return the command's JSON result, raising :class:`EngineError`
    or :class:`Cancelled`; otherwise return the :class:`WorkerJob` (call ``poll()`` regularly, ``cancel()`` to stop).
    """
    job = WorkerJob(args, progress=progress, log=log, done=done, python=python, env=env)
    if wait:
        return job.wait(timeout=timeout)
    return job
