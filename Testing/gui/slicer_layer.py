"""Headless Slicer application for GUI tests: slicer-core's real MRML scene and `slicer.util`, Slicer's own Python
layer (parameter node wrapper, ScriptedLoadableModule, Segment Editor effect base classes, SampleData) mounted from
../shared/slicer-python, PythonQt-style real Qt widgets (pythonqt.py) and strict CTK/qMRML stand-ins (standins.py).

Only the C++ application objects that scripted modules talk to are modelled here (application, module manager,
scripted module and its widget representation, IO manager); each models the upstream class named in its docstring
and has no catch-all attribute.
"""

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

from PySide6 import QtCore, QtGui

ROOT = Path(__file__).resolve().parents[2]
SLICER_PYTHON = ROOT.parent / "shared" / "slicer-python"

_MODULE_NAMES = ("SynthesisModule", "SegmentationModule", "RegistrationModule", "ReconstructionModule",
                 "SegmentEditorPETOrgans")


def available():
    return (SLICER_PYTHON / "slicer" / "ScriptedLoadableModule.py").is_file()


def _purge():
    """Forget modules a previous (stand-in based) import may have left, so the real layer is used."""
    for name in list(sys.modules):
        if (name in ("qt", "ctk", "SampleData", "SegmentEditorEffects") or name.startswith("slicer.")
                or name.split(".")[0] in _MODULE_NAMES or name.startswith("SegmentEditorEffects.")):
            if name.startswith("slicer.") and name.split(".")[1] in ("util", "slicer_core"):
                continue
            del sys.modules[name]


def _load_file_module(name, path, package_path=None):
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=package_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------- app objects

def _app_classes():
    from pythonqt import PythonQtMixin, wrap_class
    from PySide6 import QtWidgets

    class qSlicerScriptedLoadableModuleWidget(PythonQtMixin, QtWidgets.QWidget):
        """Slicer Base/QTGUI/qSlicerScriptedLoadableModuleWidget + qSlicerAbstractModuleWidget + qSlicerWidget:
        the C++ widget representation of a scripted module. ``self()`` is the Python widget object; isEntered is
        a read-only property; setMRMLScene(vtkMRMLScene*) is a slot (qSlicerWidget) emitting
        mrmlSceneChanged(vtkMRMLScene*)."""

        _cpp_name = "qSlicerScriptedLoadableModuleWidget"
        mrmlSceneChanged = QtCore.Signal(object)
        _cpp_signals = {"mrmlSceneChanged(vtkMRMLScene*)": "mrmlSceneChanged"}
        _cpp_slots = {"setMRMLScene(vtkMRMLScene*)": "setMRMLScene"}

        def __init__(self, module):
            QtWidgets.QWidget.__init__(self)
            self._module, self._entered, self._scene, self._self = module, False, None, None
            self.setLayout(wrap_class(QtWidgets.QVBoxLayout)())

        isEntered = QtCore.Property(bool, lambda s: s._entered)

        def self(self):
            return self._self

        def mrmlScene(self):
            return self._scene

        def setMRMLScene(self, scene):
            if scene is not self._scene:
                self._scene = scene
                self.mrmlSceneChanged.emit(scene)

        def module(self):
            return self._module

        def enter(self):
            self._entered = True
            if hasattr(self._self, "enter"):
                self._self.enter()

        def exit(self):
            if hasattr(self._self, "exit"):
                self._self.exit()
            self._entered = False

    class qSlicerScriptedLoadableModule(PythonQtMixin, QtCore.QObject):
        """Slicer Base/QTGUI/qSlicerScriptedLoadableModule + qSlicerAbstractCoreModule: properties name, title,
        categories, contributors, dependencies, helpText, acknowledgementText, path, hidden, icon; Q_INVOKABLE
        widgetRepresentation() (created on first use: Python widget class instantiated with the representation as
        parent, then setup(), then the module's scene set on it), logic() (none for scripted modules), self()."""

        _cpp_name = "qSlicerScriptedLoadableModule"

        def __init__(self, name, path):
            QtCore.QObject.__init__(self)
            self._name, self._path, self._self, self._widget = name, str(path), None, None
            self._icon = QtGui.QIcon()

        title = QtCore.Property(str, lambda s: getattr(s, "_title", ""), lambda s, v: setattr(s, "_title", v))
        categories = QtCore.Property("QStringList", lambda s: getattr(s, "_categories", []),
                                     lambda s, v: setattr(s, "_categories", list(v)))
        contributors = QtCore.Property("QStringList", lambda s: getattr(s, "_contributors", []),
                                       lambda s, v: setattr(s, "_contributors", list(v)))
        dependencies = QtCore.Property("QStringList", lambda s: getattr(s, "_dependencies", []),
                                       lambda s, v: setattr(s, "_dependencies", list(v)))
        helpText = QtCore.Property(str, lambda s: getattr(s, "_help", ""), lambda s, v: setattr(s, "_help", v))
        acknowledgementText = QtCore.Property(str, lambda s: getattr(s, "_ack", ""),
                                              lambda s, v: setattr(s, "_ack", v))
        hidden = QtCore.Property(bool, lambda s: getattr(s, "_hidden", False),
                                 lambda s, v: setattr(s, "_hidden", v))
        path = QtCore.Property(str, lambda s: s._path)
        icon = QtCore.Property(QtGui.QIcon, lambda s: s._icon, lambda s, v: setattr(s, "_icon", v))

        def self(self):
            return self._self

        def logic(self):
            return None

        def widgetRepresentation(self):
            if self._widget is None:
                mod = sys.modules[self._name]
                rep = qSlicerScriptedLoadableModuleWidget(self)
                widget_cls = getattr(mod, self._name + "Widget")
                rep._self = widget_cls(rep)
                rep._self.setup()
                rep.setMRMLScene(_state.scene)
                self._widget = rep
            return self._widget

    class qSlicerModuleManager(PythonQtMixin, QtCore.QObject):
        """Slicer Base/QTCore/qSlicerModuleManager: Q_INVOKABLE module(QString), modulesNames();
        signal moduleAboutToBeUnloaded(QString)."""

        _cpp_name = "qSlicerModuleManager"
        moduleAboutToBeUnloaded = QtCore.Signal(str)

        def __init__(self):
            QtCore.QObject.__init__(self)
            self._modules = {}

        def module(self, name):
            return self._modules.get(name)

        def modulesNames(self):
            return list(self._modules)

    class qSlicerCoreIOManager(PythonQtMixin, QtCore.QObject):
        """Slicer Base/QTCore/qSlicerCoreIOManager: Q_INVOKABLE fileType(QString), loadNodes(fileType,
        properties, loadedNodes[, userMessages]) for the IO types these tests need (VolumeFile with the
        ``labelmap``/``name`` properties, SegmentationFile), through Slicer's own module logics.
        An IO type no reader provides fails, as in Slicer (no reader -> false)."""

        _cpp_name = "qSlicerCoreIOManager"

        def fileType(self, fileName):
            name = str(fileName).lower()
            if name.endswith((".seg.nrrd", ".seg.nii.gz")):
                return "SegmentationFile"
            if name.endswith((".h5", ".tfm", ".txt")):
                return "TransformFile"
            if name.endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")):
                return "VolumeFile"
            return "NoFile"

        def loadNodes(self, fileType, properties, loadedNodes=None, userMessages=None):
            path = properties["fileName"]
            name = properties.get("name") or Path(path).name.split(".")[0]
            node = None
            if fileType == "VolumeFile":
                logic = _state.logics["volumes"]
                labelmap = bool(properties.get("labelmap", False))
                node = logic.AddArchetypeVolume(path, name, 1 if labelmap else 0)
            elif fileType == "SegmentationFile":
                node = _state.logics["segmentations"].LoadSegmentationFromFile(path, False, name)
            else:
                if userMessages is not None:
                    userMessages.AddMessage(3, f"No reader for file type {fileType}")
                return False
            if node is None:
                return False
            _state.loaded.append((fileType, dict(properties), node.GetID()))
            if loadedNodes is not None:
                loadedNodes.AddItem(node)
            return True

    class qSlicerApplication(PythonQtMixin, QtCore.QObject):
        """Slicer Base/QTGUI/qSlicerApplication + qSlicerCoreApplication: signal startupCompleted();
        Q_INVOKABLEs applicationLogic(), mrmlScene(), moduleManager(), coreIOManager(), ioManager(),
        testingEnabled(), commandOptions(), userSettings(), settings(), processEvents(), layoutManager() (None:
        no layout headless), pauseRender(), resumeRender(); properties temporaryPath, cachePath,
        applicationName (QCoreApplication)."""

        _cpp_name = "qSlicerApplication"
        startupCompleted = QtCore.Signal()

        def __init__(self, tmp):
            QtCore.QObject.__init__(self)
            self._tmp = tmp
            self._manager = qSlicerModuleManager()
            self._io = qSlicerCoreIOManager()
            self._settings = QtCore.QSettings(os.path.join(tmp, "settings.ini"), QtCore.QSettings.IniFormat)

        temporaryPath = QtCore.Property(str, lambda s: os.path.join(s._tmp, "tmp"))
        cachePath = QtCore.Property(str, lambda s: os.path.join(s._tmp, "cache"))
        applicationName = QtCore.Property(str, lambda s: "Slicer")

        def applicationLogic(self):
            return _state.app_logic

        @staticmethod
        def translate(context, text):             # QCoreApplication::translate (qSlicerApplication is one)
            return QtCore.QCoreApplication.translate(context, text)

        def mrmlScene(self):
            return _state.scene

        def moduleManager(self):
            return self._manager

        def coreIOManager(self):
            return self._io

        ioManager = coreIOManager

        def testingEnabled(self):
            return True

        def commandOptions(self):
            return types.SimpleNamespace(noMainWindow=True)

        def userSettings(self):
            return self._settings

        settings = userSettings

        def processEvents(self, *flags):
            QtCore.QCoreApplication.processEvents()

        def layoutManager(self):
            return None

        def pauseRender(self):
            pass

        def resumeRender(self):
            pass

    return (qSlicerApplication, qSlicerScriptedLoadableModule, qSlicerScriptedLoadableModuleWidget)


class _State:
    scene = None
    app_logic = None
    logics = {}
    loaded = []
    app = None


_state = _State()


def install(tmpdir):
    """Set up the whole layer once per process; returns the application stand-in."""
    if _state.app is not None:
        return _state.app
    import pythonqt
    import standins
    _purge()
    qapp = pythonqt.install()
    sys.modules["ctk"] = standins.ctk_module()
    pythonqt.QUiLoader.customWidgets = dict(standins.CUSTOM_WIDGETS)

    import slicer
    import slicer.util  # noqa: F401  (slicer-core's real util)
    slicer.qMRMLWidget = standins.qMRMLWidget
    slicer.qMRMLNodeComboBox = standins.qMRMLNodeComboBox
    for name in standins.MRML_NOT_MODELLED:
        setattr(slicer, name, type(name, (standins._NotModelled,), {}))
    import segment_editor
    slicer.qSlicerSegmentEditorAbstractEffect = segment_editor.qSlicerSegmentEditorAbstractEffect
    app_cls, module_cls, widget_cls = _app_classes()
    slicer.qSlicerScriptedLoadableModule = module_cls
    slicer.qSlicerScriptedLoadableModuleWidget = widget_cls

    # Slicer's own Python layer, mounted as sub-modules of the slicer-core `slicer` package
    upstream = str(SLICER_PYTHON / "slicer")
    if upstream not in slicer.__path__:
        slicer.__path__.append(upstream)
    for sub in ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule"):
        setattr(slicer, sub, importlib.import_module(f"slicer.{sub}"))
    if str(SLICER_PYTHON / "SampleData") not in sys.path:
        sys.path.insert(0, str(SLICER_PYTHON / "SampleData"))
    effects = types.ModuleType("SegmentEditorEffects")
    effects.__path__ = [str(SLICER_PYTHON / "SegmentEditorEffects")]
    sys.modules["SegmentEditorEffects"] = effects
    abstract = _load_file_module("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect",
                                 SLICER_PYTHON / "SegmentEditorEffects" / "AbstractScriptedSegmentEditorEffect.py")
    effects.AbstractScriptedSegmentEditorEffect = abstract.AbstractScriptedSegmentEditorEffect

    os.makedirs(os.path.join(tmpdir, "cache"), exist_ok=True)
    os.makedirs(os.path.join(tmpdir, "tmp"), exist_ok=True)
    _state.app = app_cls(tmpdir)
    _state.qapp = qapp
    slicer.app = _state.app
    new_scene()
    return _state.app


def new_scene():
    """A fresh real MRML scene with Slicer's module logics (slicer-core), as `slicer.mrmlScene`."""
    import slicer
    from PETWorkbenchSlicer.scene_export import headless_scene
    app = slicer.app
    scene, logics = headless_scene()
    _state.app_logic = slicer.app.applicationLogic()  # headless_scene() points slicer.app at a namespace
    slicer.app = app
    _state.scene, _state.logics = scene, logics
    slicer.mrmlScene = scene
    cache = slicer.vtkCacheManager()                  # Slicer's application gives every scene one
    cache.SetRemoteCacheDirectory(slicer.app.cachePath)
    scene.SetCacheManager(cache)
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")   # setSliceViewerLayers sets the layers of these
    _state.loaded = []
    modules = types.SimpleNamespace(**{k: types.SimpleNamespace(logic=(lambda lg=lg: lg)) for k, lg in logics.items()})
    for name, mod in _state.app.moduleManager()._modules.items():
        setattr(modules, name.lower(), mod)
    slicer.modules = modules
    return scene


def load_module(name):
    """Load a scripted module as Slicer's module factory does: import <Name>.py from its folder, create the C++
    module stand-in and instantiate the Python module class with it as ``parent``."""
    import slicer
    manager = slicer.app.moduleManager()
    if manager.module(name) is not None:
        return manager.module(name)
    folder = ROOT / name
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    mod = importlib.import_module(name)
    module = slicer.qSlicerScriptedLoadableModule(name, folder / f"{name}.py")
    module._self = getattr(mod, name)(module)
    manager._modules[name] = module
    setattr(slicer.modules, name.lower(), module)
    return module
