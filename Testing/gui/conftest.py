"""Headless GUI tests: the module widgets run on real Qt (PySide6, offscreen), Slicer's own Python layer and
strict CTK/qMRML stand-ins (see slicer_layer.py). Skipped, with one reason, only when ../shared/slicer-python
(Slicer's Python layer, not part of this repository) is absent."""

import logging
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer_layer  # noqa: E402  (needs HERE on sys.path)

if not slicer_layer.available():
    collect_ignore_glob = ["test_*.py"]

    def pytest_collection_modifyitems(session, config, items):  # pragma: no cover - only without the folder
        pass

    pytest.skip("../shared/slicer-python (Slicer's Python layer) is not present beside the checkout",
                allow_module_level=True)


@pytest.fixture(scope="session")
def slicer_app(tmp_path_factory):
    return slicer_layer.install(str(tmp_path_factory.mktemp("slicer-app")))


@pytest.fixture
def scene(slicer_app):
    """A fresh scene for each test (Slicer's File > Close Scene is not what a module sees at start-up)."""
    return slicer_layer.new_scene()


@pytest.fixture
def errors(caplog):
    """Messages shown with slicer.util.errorDisplay (logged at error level in testing mode)."""
    caplog.set_level(logging.ERROR)
    return caplog


def pump(condition, timeout=120.0):
    """Run the Qt event loop (timers, signals) until condition() is true."""
    import time
    from PySide6 import QtCore
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached while running the event loop")
        QtCore.QCoreApplication.processEvents(QtCore.QEventLoop.AllEvents, 50)
        time.sleep(0.02)
