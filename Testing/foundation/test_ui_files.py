"""Every module .ui loads in Qt's QUiLoader (offscreen) and every self.ui.<name> used in Python exists in it."""

import glob
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ["SynthesisModule", "SegmentationModule", "RegistrationModule", "ReconstructionModule"]
UI_FILES = sorted(glob.glob(str(ROOT / "*" / "Resources" / "UI" / "*.ui")))

QtWidgets = pytest.importorskip("PySide6.QtWidgets")
from PySide6.QtCore import QFile, QIODevice, qInstallMessageHandler
from PySide6.QtUiTools import QUiLoader


@pytest.fixture(scope="module")
def qapp():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def widget_names(path):
    return {w.get("name") for w in ET.parse(path).getroot().iter("widget") if w.get("name")}


def test_every_module_has_its_ui():
    assert sorted(Path(p).stem for p in UI_FILES) == sorted(MODULES)


@pytest.mark.parametrize("ui_path", UI_FILES, ids=os.path.basename)
def test_ui_loads(qapp, ui_path):
    messages = []
    qInstallMessageHandler(lambda mode, ctx, msg: messages.append(msg))
    try:
        f = QFile(ui_path)
        assert f.open(QIODevice.ReadOnly)
        w = QUiLoader().load(f)
        f.close()
    finally:
        qInstallMessageHandler(None)
    assert w is not None
    bad = [m for m in messages if "defaulting to base class" not in m and "QObject::connect" not in m]
    assert not bad, bad
    names = {c.objectName() for c in w.findChildren(QtWidgets.QWidget)} | {w.objectName()}
    assert widget_names(ui_path) <= names
    for c in w.findChildren(QtWidgets.QWidget):
        types = c.property("nodeTypes")
        if types is not None:
            assert all(t.startswith("vtkMRML") for t in types)
    assert {"applyButton", "progressBar", "statusLabel", "deviceComboBox"} <= names


@pytest.mark.parametrize("module", MODULES)
def test_python_references_exist(module):
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    names = widget_names(ui)
    used = set()
    for py in (ROOT / module).glob("*.py"):
        used |= set(re.findall(r"\bself\.ui\.(\w+)", py.read_text()))
    assert used, f"{module}.py uses no widgets from its .ui"
    assert not used - names, sorted(used - names)


@pytest.mark.parametrize("module", MODULES)
def test_parameter_names_match_wrapper(module):
    """Each SlicerParameterName in the .ui is a field of the module's parameter node wrapper."""
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    params = {p.find("string").text for p in ET.parse(ui).getroot().iter("property")
              if p.get("name") == "SlicerParameterName"}
    src = (ROOT / module / f"{module}.py").read_text()
    body = src.split("@parameterNodeWrapper", 1)[1].split("\nclass ", 2)[1]
    fields = set(re.findall(r"^    (\w+)\s*:", body, re.M))
    assert params <= fields, sorted(params - fields)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_has_no_heavy_imports_at_file_scope(module):
    src = (ROOT / module / f"{module}.py").read_text()
    assert not re.search(r"^(import|from)\s+(torch|monai|SimpleITK|nibabel)\b", src, re.M)
