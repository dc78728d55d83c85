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



@pytest.fixture
def widget(request, scene):
    """The widget of the module named by the test file's ``MODULE``, opened as Slicer opens it."""
    from guitools import close_module, open_module
    w = open_module(request.module.MODULE)
    yield w
    close_module(w)
