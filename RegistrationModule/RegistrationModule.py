"""PET Registration: deformable registration by instance optimisation of the field with implicit regularisation
(weight-free; not neural instance optimisation, which needs a pretrained network), or the deformable
cross-attention network (TM-DCA) with optional refinement at full resolution; results as grid transforms.

Scripting from Slicer's Python console::

    logic = slicer.util.getModuleLogic("RegistrationModule")
    t = logic.register(slicer.util.getNode("CT"), slicer.util.getNode("PET"), similarity="mind")
    slicer.util.getNode("PET").SetAndObserveTransformNodeID(t.GetID())    # PET shown aligned to the CT

The output transform maps the moving volume into the fixed volume's space (its from-parent transform is the
fixed -> moving resampling transform) and references both volumes ("fixedVolume", "movingVolume").
"""

import json
import os
from typing import Annotated

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from PETWorkbenchSlicer.slicer_bridge import ModuleWidgetMixin
from RegistrationModuleLib.similarities import describe as describe_similarities
from RegistrationModuleLib.similarities import similarity_names


class RegistrationModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PET Registration")
        self.parent.categories = ["PETWorkbench"]
        self.parent.dependencies = []
        self.parent.contributors = ["PETWorkbench developers"]
        self.parent.helpText = _(
            "Deformable registration of PET, CT and MR volumes without trained weights: instance optimisation of "
            "the displacement field itself over a multi-resolution pyramid, with an implicitly solved FFT "
            "regulariser (curvature by default). This is the plain instance-optimisation baseline of the NIO "
            "paper, not neural instance optimisation (no network weights are optimised). With trained weights: "
            "the deformable cross-attention network (TM-DCA), refined at full resolution. Output: a grid transform "
            "node, optionally the warped moving volume and the Jacobian determinant, and folding statistics. "
            "Research use only.")
        self.parent.acknowledgementText = _(
            "Methods (MLMI 2023): the instance-optimisation baseline and schedule of 'Deformable Medical Image "
            "Registration Under Distribution Shifts with Neural Instance Optimization'; 'Implicitly Solved "
            "Regularization for Learning-Based Image Registration'; "
            "'Deformable Cross-Attention Transformer for Medical Image Registration' (Chen et al.).")


@parameterNodeWrapper
class RegistrationModuleParameterNode:
    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLLabelMapVolumeNode
    fixedLabels: vtkMRMLLabelMapVolumeNode
    movingLabels: vtkMRMLLabelMapVolumeNode
    method: Annotated[str, Choice(["instance", "dca"])] = "instance"
    similarity: Annotated[str, Choice(similarity_names(ui_only=True))] = "lncc"
    smoothness: Annotated[float, WithinRange(0.0, 500.0)] = 64.0
    iterations: Annotated[int, WithinRange(10, 2000)] = 100
    diffeomorphic: bool = False
    petCtPreset: bool = False
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"


class RegistrationModuleWidget(ModuleWidgetMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    moduleName = "RegistrationModule"
    family = None

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logicClass = RegistrationModuleLogic

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.setupModuleUi()
        self.ui.similarityComboBox.connect("currentTextChanged(QString)", self.onSimilarityChanged)
        self.ui.petCtPresetCheckBox.connect("toggled(bool)", self.onPresetToggled)

    def onPresetToggled(self, on):
        """Under the PET to CT preset the panel's own registration settings are not used: they are disabled."""
        for name in ("methodComboBox", "similarityComboBox", "smoothnessSliderWidget", "iterationsSpinBox",
                     "diffeomorphicCheckBox"):
            getattr(self.ui, name).enabled = not on

    def onSimilarityChanged(self, name):
        """The smoothness slider follows the chosen term's default (curvature 64; diffusion 1 for mind)."""
        from RegistrationModuleLib.similarities import SIMILARITIES
        if self._parameterNode is not None and name in SIMILARITIES:
            self._parameterNode.smoothness = SIMILARITIES[name].smoothness

    def fillChoices(self):
        self.ui.similarityComboBox.clear()
        for name in similarity_names(ui_only=True):
            self.ui.similarityComboBox.addItem(name)
        self.ui.similarityComboBox.toolTip = describe_similarities(ui_only=True)

    def canApply(self, p):
        if not p.fixedVolume or not p.movingVolume:
            return False, "Select fixed and moving volumes"
        if p.fixedVolume == p.movingVolume:
            return False, "Fixed and moving volumes must differ"
        if bool(p.fixedLabels) != bool(p.movingLabels):
            return False, "Give label maps for both images, or for neither"
        if p.petCtPreset and (p.fixedLabels or p.movingLabels):
            return False, "The PET to CT preset does not use label maps"
        return True, ""

    def startRun(self):
        p = self._parameterNode
        if p.petCtPreset:       # the preset sets the registration itself; only the mask and the outputs are ours
            return self.logic.register(p.fixedVolume, p.movingVolume, p.outputTransform, preset="pet-ct",
                                       fixedMaskNode=p.fixedMask, outputVolumeNode=p.outputVolume,
                                       jacobianVolumeNode=p.jacobianVolume, warpVolume=bool(p.outputVolume),
                                       jacobian=bool(p.jacobianVolume), device=p.device, wait=False,
                                       progress=self.controller.progress)
        return self.logic.register(p.fixedVolume, p.movingVolume, p.outputTransform, method=p.method,
                                   similarity=p.similarity, smoothness=p.smoothness, iterations=p.iterations,
                                   diffeomorphic=p.diffeomorphic, fixedMaskNode=p.fixedMask,
                                   fixedLabelsNode=p.fixedLabels, movingLabelsNode=p.movingLabels,
                                   outputVolumeNode=p.outputVolume, jacobianVolumeNode=p.jacobianVolume,
                                   warpVolume=bool(p.outputVolume), jacobian=bool(p.jacobianVolume),
                                   device=p.device, wait=False, progress=self.controller.progress)

    def onRunSucceeded(self, transformNode):
        p = self._parameterNode
        p.outputTransform = transformNode
        summary = json.loads(transformNode.GetAttribute("PETWorkbench.summary") or "{}")
        self.ui.summaryLabel.text = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                              for k, v in summary.items() if not isinstance(v, (dict, list)))
        if p.outputVolume:
            slicer.util.setSliceViewerLayers(background=p.fixedVolume, foreground=p.outputVolume,
                                             foregroundOpacity=0.5)


class RegistrationModuleLogic(ScriptedLoadableModuleLogic):
    """MRML <-> registration engine. The engine's displacement field becomes a grid transform node."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return RegistrationModuleParameterNode(super().getParameterNode())

    def register(self, fixedVolumeNode, movingVolumeNode, outputTransformNode=None, method="instance",
                 similarity="lncc", smoothness=None, iterations=100, diffeomorphic=False, fixedMaskNode=None,
                 fixedLabelsNode=None, movingLabelsNode=None, outputVolumeNode=None, jacobianVolumeNode=None,
                 warpVolume=False, jacobian=False, device="auto", preset=None, wait=True, progress=None, log=None):
        """Register moving to fixed. Returns the transform node (``wait=True``) or an EngineRun.

        ``preset="pet-ct"``: fixed is a CT and moving a PET of the same PET/CT study; the main job's settings
        (the CT smoothed and mapped to the PET's intensities locally, LNCC in the CT's body or ``fixedMaskNode``);
        the method, similarity, smoothness, iterations, diffeomorphic and label-map arguments must then stay at
        their defaults.

        With ``warpVolume`` (or an output volume node) the moving volume is also resampled onto the fixed grid;
        with ``jacobian`` the Jacobian determinant volume is added. The summary (folding %, std(log J), Dice
        when labels are given, time) is stored as JSON in the transform's attribute "PETWorkbench.summary".
        """
        import SimpleITK as sitk
        from PETWorkbenchLib import imageio
        from PETWorkbenchSlicer import mrml
        from PETWorkbenchLib.errors import InputError
        from PETWorkbenchLib.requests import to_argv
        from PETWorkbenchSlicer.slicer_bridge import EngineRun
        from RegistrationModuleLib.cli import RegisterRequest

        fixed = mrml.volume_to_image(fixedVolumeNode, dtype="float32")
        moving = mrml.volume_to_image(movingVolumeNode, dtype="float32")
        extra = {}
        for flag, node in (("fixed_mask", fixedMaskNode), ("fixed_labels", fixedLabelsNode),
                           ("moving_labels", movingLabelsNode)):
            if node is not None:
                extra[flag] = mrml.volume_to_image(node)
        if ("fixed_labels" in extra) != ("moving_labels" in extra):
            raise InputError("Label-driven registration needs label maps for both the fixed and the moving image")
        warpVolume = warpVolume or outputVolumeNode is not None
        jacobian = jacobian or jacobianVolumeNode is not None

        def prepare(tmp):
            p = lambda n: os.path.join(tmp, n)
            imageio.write_image(fixed, p("fixed.nii"))
            imageio.write_image(moving, p("moving.nii"))
            if not iterations:
                levels = {}                                       # the engine's default schedule
            elif isinstance(iterations, str):
                levels = tuple(int(v) for v in iterations.split(",") if v.strip())
            elif hasattr(iterations, "__len__"):
                levels = tuple(int(i) for i in iterations)
            else:
                # one number: the coarsest level's count, the finer levels 60 % and 25 % of it (100: the engine's
                # default schedule)
                n = int(iterations)
                levels = (n, max(n * 6 // 10, 1), max(n // 4, 1))
            levels = {"iterations": levels} if levels else {}
            files = {}
            for flag, img in extra.items():
                files[flag] = p(flag + ".nii")
                imageio.write_image(img, files[flag])
            request = RegisterRequest(fixed=p("fixed.nii"), moving=p("moving.nii"), output=p("field.nii"),
                                      method=method, similarity=similarity,
                                      smoothness=None if smoothness is None else float(smoothness),
                                      diffeomorphic=bool(diffeomorphic), device=device, preset=preset, **levels,
                                      warped=p("warped.nii") if warpVolume else None,
                                      jacobian=p("jacobian.nii") if jacobian else None, **files)
            return to_argv(request)

        def finish(tmp, result):
            p = lambda n: os.path.join(tmp, n)
            field = imageio.read_image(p("field.nii"), "engine output", pixel_type=sitk.sitkVectorFloat64)
            name = f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()}"
            transform = mrml.displacement_to_transform(field, outputTransformNode, name=None if outputTransformNode
                                                       else name, fixedNode=fixedVolumeNode,
                                                       movingNode=movingVolumeNode)
            summary = dict(result or {})
            transform.SetAttribute("PETWorkbench.summary", json.dumps(summary))
            if warpVolume:
                out = mrml.image_to_volume(imageio.read_image(p("warped.nii"), "engine output"), outputVolumeNode,
                                           name=None if outputVolumeNode else f"{movingVolumeNode.GetName()} warped")
                mrml.reference_result(out, movingVolumeNode)
                transform.SetNodeReferenceID("PETWorkbench.warpedVolume", out.GetID())
            if jacobian:
                jac = mrml.image_to_volume(imageio.read_image(p("jacobian.nii"), "engine output"), jacobianVolumeNode,
                                           name=None if jacobianVolumeNode else f"{name} Jacobian")
                mrml.reference_result(jac, fixedVolumeNode)
                transform.SetNodeReferenceID("PETWorkbench.jacobianVolume", jac.GetID())
            return transform

        run = EngineRun(["register"], prepare=prepare, finish=finish, progress=progress, log=log)
        return run.wait() if wait else run


class RegistrationModuleTest(ScriptedLoadableModuleTest):
    """Slicer self-test: recover a known smooth shift between two copies of a blob."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_recovers_known_shift()
        self.test_widget_apply()

    def test_recovers_known_shift(self):
        import numpy as np
        import SimpleITK as sitk
        from PETWorkbenchSlicer import mrml
        z, y, x = np.mgrid[:24, :32, :32]
        fixed_arr = np.exp(-((x - 16) ** 2 + (y - 16) ** 2 + (z - 12) ** 2) / 40.0).astype(np.float32)
        moving_arr = np.exp(-((x - 18) ** 2 + (y - 16) ** 2 + (z - 12) ** 2) / 40.0).astype(np.float32)
        fixed = mrml.image_to_volume(sitk.GetImageFromArray(fixed_arr), name="fixed")
        moving = mrml.image_to_volume(sitk.GetImageFromArray(moving_arr), name="moving")
        t = RegistrationModuleLogic().register(fixed, moving, iterations=50, device="cpu")
        moved = mrml.transform_points_ras(t, np.array([[-16.0, -16.0, 12.0]]))[0]
        assert abs(moved[0] - (-18.0)) < 1.0, moved
        self.delayDisplay("Registration test passed")

    def test_widget_apply(self):
        import numpy as np
        from PETWorkbenchSlicer.slicer_bridge import self_test_widget_apply
        z, y, x = np.mgrid[:20, :32, :32].astype(np.float32)
        nodes = []
        for name, shift in (("Fixed", 0.0), ("Moving", 2.0)):
            n = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            n.SetSpacing(3.0, 3.0, 3.0)
            slicer.util.updateVolumeFromArray(n, np.exp(-(((z - 10) / 5) ** 2 + ((y - 16 - shift) / 6) ** 2
                                                          + ((x - 16) / 7) ** 2)).astype(np.float32))
            nodes.append(n)

        def select(widget):
            widget.ui.fixedSelector.setCurrentNode(nodes[0])
            widget.ui.movingSelector.setCurrentNode(nodes[1])
            widget._parameterNode.iterations = 20
            widget._parameterNode.device = "cpu"

        widget = self_test_widget_apply("RegistrationModule", select)
        t = widget._parameterNode.outputTransform
        assert t is not None and t.GetNodeReference("fixedVolume") is nodes[0]
        assert widget.ui.outputTransformSelector.currentNode() is t
        self.delayDisplay("Registration widget test passed")
