"""Headless 3D Slicer for tests: a real MRML scene from slicer-core with the module logics registered, plus
stand-ins for the parts of Slicer's Python API that need the GUI application (ScriptedLoadableModule,
parameterNodeWrapper; qt and ctk import but have no attributes), so that each <Name>Module.py can be imported and
its Logic class exercised."""

import sys
import types

import slicer


def init_headless_slicer():
    """New scene + application logic + Colors/Volumes/Segmentations/Transforms/SubjectHierarchy logics."""
    from PETWorkbenchSlicer.scene_export import headless_scene
    scene, logics = headless_scene()
    slicer.app.commandOptions = lambda: types.SimpleNamespace(noMainWindow=True)
    slicer.app.connect = lambda *a, **k: None
    return scene, slicer.app.applicationLogic(), logics


def _gui_only_module(name):
    """``qt`` / ``ctk`` for the logic tests: importable (the module files import them at file scope), but every
    attribute raises, so logic code that reaches for a GUI class fails here instead of getting a dummy. The widgets
    run against real Qt classes in Testing/gui."""
    m = types.ModuleType(name)
    m.__file__ = __file__                      # a normal (non built-in) module for inspect/torch

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"{name}.{attr} is used outside a widget: the headless logic tests have no {name} "
                             "(the GUI tests in Testing/gui run the widgets)")

    m.__getattr__ = getattr_
    return m


def install_module_shims():
    """Make `import qt, ctk`, `from slicer.ScriptedLoadableModule import *` and
    `from slicer.parameterNodeWrapper import ...` work headless. Real Slicer provides the real ones."""
    for name in ("qt", "ctk", "slicer.i18n"):
        if name not in sys.modules:
            sys.modules[name] = _gui_only_module(name)
    sys.modules["slicer.i18n"].tr = lambda s: s
    sys.modules["slicer.i18n"].translate = lambda ctx, s: s
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest:
        def delayDisplay(self, message, msec=None):
            pass

    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(slm, c.__name__, c)
    slm.__all__ = [c.__name__ for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                        ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    slicer.ScriptedLoadableModule = slm

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        cls.__pwb_shim__ = True
        return cls

    pnw.parameterNodeWrapper = parameterNodeWrapper
    pnw.parameterPack = lambda cls: cls
    for n in ("WithinRange", "Choice", "Default", "Minimum", "Maximum", "Decimals", "SingleStep"):
        setattr(pnw, n, lambda *a, **k: None)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    slicer.parameterNodeWrapper = pnw
    if not hasattr(slicer.util, "VTKObservationMixin"):
        class VTKObservationMixin:
            def addObserver(self, *a, **k):
                pass

            def removeObserver(self, *a, **k):
                pass

            def removeObservers(self, *a, **k):
                pass
        slicer.util.VTKObservationMixin = VTKObservationMixin


class DICOMDatabaseStandIn:
    """``slicer.dicomDatabase`` for the logic tests: CTK's ctkDICOMDatabase (Libs/DICOM/Core/ctkDICOMDatabase.h)
    reduced to ``fileForInstance(sopInstanceUID) -> str`` (the stored file's path, '' for an instance it does not
    hold), the one call the logics make. Any other attribute raises, so code needing more of the database fails
    here."""

    def __init__(self, files_by_uid):
        object.__setattr__(self, "_files", {str(k): str(v) for k, v in files_by_uid.items()})

    def fileForInstance(self, sopInstanceUID):
        return self._files.get(str(sopInstanceUID), "")

    def __getattr__(self, name):
        raise AttributeError(f"ctkDICOMDatabase.{name} is not modelled by the headless stand-in (only "
                             "fileForInstance is)")

    def __setattr__(self, name, value):
        raise AttributeError(f"ctkDICOMDatabase has no writable attribute {name}")
