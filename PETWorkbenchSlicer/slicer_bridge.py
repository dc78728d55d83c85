"""What every module's Logic and Widget share on the Slicer side.

* :func:`ensure_dependencies`: lazy installation of torch (through the PyTorch extension) and the other Python
  packages, on first use, never at import or start-up.
* :class:`EngineRun`: one engine command in the worker process, with inputs written from nodes to a private
  temporary folder, and outputs read back into nodes **only after success** (cancel or failure leaves the user's
  scene untouched). ``wait=True`` blocks (Python console, batch); otherwise the widget polls it from a timer.
* :class:`ApplyButtonController`: Apply turns into Cancel while a run is going, with progress bar and status text.
* :func:`pet_volume_in_suv`: the PET a logic sends to an engine, in SUV; for a volume loaded from Slicer's DICOM
  database the factor comes from the series' tags (:func:`PETWorkbenchLib.dicom.suv_factor_of_files`).

Headless (pytest, slicer-core) everything except the Qt timer works the same; the tests use ``wait=True``.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from PETWorkbenchLib.errors import Cancelled, EngineError, InputError
from PETWorkbenchLib.worker import run_cli

PIP_REQUIREMENTS = ["monai>=1.3", "SimpleITK", "nibabel", "requests", "tqdm", "psutil", "scipy", "pydicom"]
MINIMUM_TORCH = "2.1"


def python_executable():
    """The Python that runs engine commands: PythonSlicer inside Slicer, this interpreter elsewhere."""
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        cand = exe.parent / name
        if cand.is_file():
            return str(cand)
    found = shutil.which("PythonSlicer")
    if found and "Slicer" in exe.name:
        return found
    return sys.executable


def ensure_dependencies(ask=True):
    """Install missing packages into Slicer's Python (torch through the PyTorch extension). Returns True if all
    is there. Outside Slicer it only checks and names what is missing."""
    missing = []
    try:
        import torch  # noqa: F401 - imported only to see that it is installed
    except ImportError:
        missing.append("torch")
    for mod in ("monai", "SimpleITK", "nibabel", "requests", "tqdm", "psutil", "scipy", "pydicom"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if not missing:
        return True
    try:
        import slicer
        import qt  # noqa: F401 - imported only to see that Slicer's Qt is there
    except ImportError:
        raise InputError("Missing Python packages: " + ", ".join(missing)
                         + ". Install them with: pip install -c constraints.txt -e .")
    if ask and not slicer.util.confirmOkCancelDisplay(
            "PETWorkbench needs these Python packages, which will be downloaded and installed now "
            f"(this can take several minutes): {', '.join(missing)}", "Install Python packages"):
        raise InputError("Required Python packages are not installed: " + ", ".join(missing))
    if "torch" in missing:
        try:
            import PyTorchUtils
        except ImportError:
            raise InputError("The PyTorch extension is required: install 'PyTorch' from the Extensions Manager "
                             "and restart Slicer")
        torch_logic = PyTorchUtils.PyTorchUtilsLogic()
        if not torch_logic.torchInstalled():
            if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=f">={MINIMUM_TORCH}") is None:
                raise InputError("PyTorch could not be installed; see the PyTorch module for details")
    others = [r for r in PIP_REQUIREMENTS if r.split(">")[0].split("=")[0] in missing]
    if others:
        slicer.util.pip_install(others)
    return True


class EngineRun:
    """Run ``petworkbench <args>`` with files in a private temporary folder.

    ``prepare(tmpdir) -> list of extra CLI args`` writes the inputs; ``finish(tmpdir, result) -> value`` reads the
    outputs into nodes. ``finish`` runs only when the command succeeded; the folder is removed afterwards.
    """

    def __init__(self, args, prepare=None, finish=None, progress=None, log=None, done=None, env=None):
        self.tmpdir = tempfile.mkdtemp(prefix="petworkbench-")
        self.finish_cb, self.done_cb = finish, done
        self.value = None
        self.error = None
        try:
            extra = prepare(self.tmpdir) if prepare else []
            self.job = run_cli(list(args) + list(extra), progress=progress, log=log, done=self._done,
                               python=python_executable(), env=env)
        except Exception:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise

    def _done(self, job):
        try:
            if job.error is None and self.finish_cb is not None:
                self.value = self.finish_cb(self.tmpdir, job.result)
            elif job.error is None:
                self.value = job.result
        except Exception as e:  # importing results failed: report like an engine error
            self.error = e
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if self.error is None:
            self.error = job.error
        if self.done_cb:
            self.done_cb(self)

    def poll(self):
        return self.job.poll()

    def cancel(self):
        self.job.cancel()

    @property
    def running(self):
        return self.job.running

    def wait(self, timeout=None):
        try:
            self.job.wait(timeout=timeout)
        except (EngineError, Cancelled):
            pass
        if self.error is not None:
            raise self.error
        return self.value


class ApplyButtonController:
    """Apply <-> Cancel, progress bar and status label for one module widget (Slicer GUI only)."""

    def __init__(self, applyButton, progressBar, statusLabel, applyText="Apply"):
        import qt
        self.button, self.bar, self.label, self.applyText = applyButton, progressBar, statusLabel, applyText
        self.run = None
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self._poll)
        self.bar.setVisible(False)

    @property
    def busy(self):
        return self.run is not None

    def start(self, run, on_success=None):
        self.run = run
        self.on_success = on_success
        self.button.text = "Cancel"
        self.button.toolTip = "Stop the running job; the scene is left as it was"
        self.bar.setVisible(True)
        self.bar.setValue(0)
        self.timer.start()

    def progress(self, fraction, message):
        self.bar.setValue(int(round(100 * fraction)))
        self.label.text = message

    def cancel(self):
        if self.run is not None:
            self.label.text = "Cancelling..."
            self.run.cancel()

    def _poll(self):
        if self.run is not None and not self.run.poll():
            self.finished(self.run)

    def finished(self, run):
        import slicer
        self.timer.stop()
        self.run = None
        self.button.text = self.applyText
        self.bar.setVisible(False)
        if run.error is None:
            self.label.text = "Done."
            if self.on_success is not None:
                self.on_success(run.value)
        elif isinstance(run.error, Cancelled):
            self.label.text = "Cancelled; nothing was changed."
        else:
            self.label.text = "Failed; nothing was changed."
            slicer.util.errorDisplay(str(run.error), detailedText=getattr(run.error, "log", "") or None)


class ModuleWidgetMixin:
    """Parameter-node lifecycle, model list, device choice and Apply/Cancel shared by the module widgets.

    The widget class defines ``moduleName``, ``family`` (model family or None), ``logicClass``,
    ``canApply(parameterNode) -> (bool, reason)``, ``startRun() -> EngineRun`` (started with ``wait=False`` and
    ``progress=self.controller.progress``) and ``onRunSucceeded(value)`` (GUI updates after success).
    ``modelFilter`` (optional): predicate on registry entries; models it rejects are not offered.
    """

    modelFilter = None

    def setupModuleUi(self):
        import slicer
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logicClass()
        self.controller = ApplyButtonController(self.ui.applyButton, self.ui.progressBar, self.ui.statusLabel)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        if self.family:
            self.fillModels()
        self.fillChoices()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.initializeParameterNode()

    def fillChoices(self):
        """Fill lists whose entries come from an engine's registry, before the parameter node is bound to them."""

    def fillModels(self):
        from PETWorkbenchLib import models
        self.ui.modelComboBox.clear()
        try:
            for e in models.registry(self.family):
                if self.modelFilter is not None and not self.modelFilter(e):
                    continue
                self.ui.modelComboBox.addItem(f"{e.title} ({models.status(e)})", e.id)
                if e.extra.get("default"):
                    self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.count - 1
        except Exception as err:  # a broken registry must not break the module GUI
            self.ui.statusLabel.text = f"Model registry problem: {err}"

    def selectedModel(self):
        return self.ui.modelComboBox.currentData

    def cleanup(self):
        if self.controller.busy:
            self.controller.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtkModifiedEvent(), self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self.controller.busy:
            self.controller.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtkModifiedEvent(), self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtkModifiedEvent(), self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        if self.controller.busy:
            self.ui.applyButton.enabled = True
            return
        ok, reason = self.canApply(self._parameterNode) if self._parameterNode else (False, "")
        self.ui.applyButton.enabled = ok
        self.ui.applyButton.toolTip = "Run" if ok else reason

    def onApplyButton(self):
        import slicer
        if self.controller.busy:
            self.controller.cancel()
            return
        try:
            ensure_dependencies(ask=True)
            run = self.startRun()
        except Exception as e:
            slicer.util.errorDisplay(f"Cannot start: {e}")
            return
        self.controller.start(run, self.onRunSucceeded)


# the units options of a logic, as its users know them (PETWorkbenchLib.dicom.units_conflicts names them)
LOGIC_UNITS_NAMES = {"units": "units", "weight_kg": "patient weight (kg)", "injected_dose_mbq": "injected dose (MBq)",
                     "decay_factor": "decay factor"}


def _carried_suv_units(volumeNode):
    """The words by which a volume node declares SUV voxels, '' when it does not: Slicer's PET-DICOM extension sets
    the voxel value quantity and units (e.g. 'Standardized Uptake Value', '{SUVbw}g/ml'), its older versions the
    attributes DICOM.MeasurementUnitsCodeValue/CodeMeaning."""
    texts = []
    for entry in (volumeNode.GetVoxelValueUnits(), volumeNode.GetVoxelValueQuantity()):
        if entry is not None:
            texts += [entry.GetCodeValue() or "", entry.GetCodeMeaning() or ""]
    texts += [volumeNode.GetAttribute(f"DICOM.MeasurementUnitsCode{k}") or "" for k in ("Value", "Meaning")]
    return "; ".join(t for t in texts if "suv" in t.lower() or "standardized uptake" in t.lower())


_OTHER_SUV = ("lbm", "lean body", "bsa", "body surface", "ibw", "ideal body")


def volume_suv_info(volumeNode):
    """How the voxels of a PET volume node become SUV, when the node says it: a dict with ``suv_factor`` and
    ``units`` ("GML" for SUV, "BQML") plus, for a DICOM series, what :func:`PETWorkbenchLib.dicom.suv_factor_of_files`
    found; None when the node says nothing (a volume loaded from a file: its units are the caller's to give).

    A node that carries SUV units gets factor 1 (SUVbw only: other SUV normalisations are refused). A node loaded
    from Slicer's DICOM database names its SOP instances in the attribute "DICOM.instanceUIDs"; their files come
    from ``slicer.dicomDatabase.fileForInstance`` and the factor from their tags."""
    import slicer
    from PETWorkbenchLib.dicom import suv_factor_of_files
    name = volumeNode.GetName()
    carried = _carried_suv_units(volumeNode)
    if carried:
        if any(k in carried.lower() for k in _OTHER_SUV):
            raise InputError(f"Volume '{name}' is in {carried}; the models expect SUV normalised by body weight "
                             "(SUVbw): load the series as SUVbw")
        return {"suv_factor": 1.0, "units": "GML", "source": f"the volume's units ({carried})"}
    uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    database = getattr(slicer, "dicomDatabase", None)
    if database is None:
        raise InputError(f"Volume '{name}' was loaded from DICOM, but Slicer's DICOM database is not open: the SUV "
                         "cannot be computed from the series' tags. Open the DICOM module (or save the volume in "
                         "SUV and load that file)")
    files = [database.fileForInstance(uid) for uid in uids]
    lost = [uid for uid, f in zip(uids, files) if not f]
    if lost:
        raise InputError(f"Volume '{name}': {len(lost)} of its {len(uids)} DICOM instances are not in the DICOM "
                         f"database (first: {lost[0]}); the SUV cannot be computed from the series' tags")
    info = suv_factor_of_files(files, where=f"PET DICOM series of volume '{name}'")
    return dict(info, source="the DICOM tags")


def pet_volume_in_suv(volumeNode, units="SUV", patientWeight=None, injectedDose=None, check=True):
    """(SimpleITK float32 image in SUV, factor SUV per voxel unit of the node, units of the node: "SUV" or
    "Bq/ml") of a PET volume node, checked by :func:`PETWorkbenchLib.units.check_pet_range` (unless ``check`` is
    False).

    A node that says its units (:func:`volume_suv_info`: loaded from DICOM, or carrying SUV units) is converted by
    what it says, and ``units``, ``patientWeight`` (kg) and ``injectedDose`` (MBq) that contradict it are refused,
    naming them; any other node is in ``units`` (Bq/ml needs the weight and the dose)."""
    import SimpleITK as sitk
    from PETWorkbenchLib import units as pet_units
    from PETWorkbenchLib.dicom import units_conflicts
    from . import mrml
    image = mrml.volume_to_image(volumeNode, dtype="float32")
    info = volume_suv_info(volumeNode)
    if info is None:
        scale, node_units = 1.0, units
        if pet_units.normalise_units(units) == "BQML":
            scale = pet_units.suv_factor(patientWeight, (injectedDose or 0) * 1e6)
    else:
        wrong = units_conflicts(info, units, patientWeight or None, injectedDose or None, names=LOGIC_UNITS_NAMES)
        if wrong:
            raise InputError(f"Volume '{volumeNode.GetName()}': its SUV comes from {info['source']}, and these "
                             f"settings contradict it: {'; '.join(wrong)}. Leave units at SUV and the patient weight "
                             "and injected dose empty")
        scale = info["suv_factor"]
        node_units = "SUV" if pet_units.normalise_units(info["units"]) == "SUV" else "Bq/ml"
    if scale != 1.0:
        image = sitk.Cast(image, sitk.sitkFloat32) * float(scale)
    if check:
        pet_units.check_pet_range(sitk.GetArrayViewFromImage(image), "SUV")
    return image, scale, node_units


def vtkModifiedEvent():
    import vtk
    return vtk.vtkCommand.ModifiedEvent


def register_sample_data():
    """Register PETWorkbench's sample data with Slicer's Sample Data module (URLs + SHA-256 checksums, from
    Resources/SampleData/SampleData.json). Called once Slicer has started, never at import."""
    import json
    import SampleData
    from PETWorkbenchLib.paths import resources_dir
    spec = json.loads((resources_dir() / "SampleData" / "SampleData.json").read_text())
    icon = str(resources_dir() / "Icons" / "PETWorkbench.png")
    for src in spec["sources"]:
        files = src["files"]
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=src["category"], sampleName=src["name"], thumbnailFileName=icon,
            uris=[f["url"] for f in files], fileNames=[f["url"].rsplit("/", 1)[-1] for f in files],
            nodeNames=[f["nodeName"] for f in files], checksums=[f"SHA256:{f['sha256']}" for f in files],
            loadFileTypes=[f["loadType"] for f in files])


def self_test_widget_apply(moduleName, select, timeout=900):
    """Module self-test step, as a user does it: open the module widget, check its selectors have the scene,
    choose inputs (``select(widget)``), press Apply and wait (processing Qt events) until the job ends.
    Returns the widget; raises AssertionError with the status text when Apply did not succeed."""
    import time

    import slicer
    widget = slicer.util.getModuleWidget(moduleName)
    widget.enter()
    for name in dir(widget.ui):
        w = getattr(widget.ui, name)
        if hasattr(w, "className") and w.className() == "qMRMLNodeComboBox":
            assert w.mrmlScene() is slicer.mrmlScene, f"{moduleName}: selector {name} has no scene"
    select(widget)
    assert widget.ui.applyButton.enabled, f"{moduleName}: Apply disabled: {widget.ui.applyButton.toolTip}"
    widget.ui.applyButton.click()
    end = time.monotonic() + timeout
    while widget.controller.busy:
        if time.monotonic() > end:
            widget.controller.cancel()
            raise AssertionError(f"{moduleName}: Apply did not finish in {timeout} s")
        slicer.app.processEvents()
        time.sleep(0.05)
    assert widget.ui.statusLabel.text.startswith("Done"), f"{moduleName}: {widget.ui.statusLabel.text}"
    return widget


def sample_data_path(*parts):
    """A file of the extension's embedded sample data (Resources/SampleData/...)."""
    from PETWorkbenchLib.paths import resources_dir
    return str(resources_dir().joinpath("SampleData", *parts))
