"""Each <Name>Module.py imports in a headless scene (no torch at file scope) and declares proper metadata."""

import importlib
import sys
import types

import pytest

MODULES = ["SynthesisModule", "SegmentationModule", "RegistrationModule", "ReconstructionModule"]


@pytest.mark.parametrize("name", MODULES)
def test_module_metadata_and_logic(mrml, name):
    before_torch = "torch" in sys.modules
    mod = importlib.import_module(name)
    if not before_torch:
        assert "torch" not in sys.modules, f"importing {name} imported torch"
    parent = types.SimpleNamespace()
    getattr(mod, name)(parent)
    assert parent.categories == ["PETWorkbench"]
    assert parent.title and len(parent.helpText) > 100 and "research use" in parent.helpText.lower()
    assert len(parent.acknowledgementText) > 40
    logic = getattr(mod, f"{name}Logic")()
    assert logic is not None
    for cls in ("Widget", "Test", "ParameterNode"):
        assert hasattr(mod, f"{name}{cls}")
