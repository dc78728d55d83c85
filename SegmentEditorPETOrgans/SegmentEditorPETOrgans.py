"""Hidden module that registers the "PET organs" and "PET lesion" Segment Editor effects (as Slicer's extra-effects
extensions do)."""

import os

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

EFFECT_FILES = ("SegmentEditorEffect.py", "SegmentEditorPETLesionEffect.py")


class SegmentEditorPETOrgans(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Segment Editor PET organs")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["PETWorkbench developers"]
        self.parent.hidden = True
        self.parent.helpText = _("Adds two effects to the Segment Editor. 'PET organs': click inside an organ on "
                                 "a PET slice to add the organ predicted by LDOS there to the selected segment. "
                                 "'PET lesion': click on a lesion (Ctrl or right click removes) to delineate it "
                                 "with PE-MED or a threshold, and measure SUVmax, SUVpeak, SUVmean, MTV and TLG. "
                                 "Research use only.")
        self.parent.acknowledgementText = _("LDOS organ segmentation on low-dose PET (PETWorkbench).")
        slicer.app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects
        for name in EFFECT_FILES:
            instance = effects.qSlicerSegmentEditorScriptedEffect(None)
            source = os.path.join(os.path.dirname(__file__), "SegmentEditorPETOrgansEffects", name)
            instance.setPythonSource(source.replace("\\", "/"))
            instance.self().register()


class SegmentEditorPETOrgansTest(ScriptedLoadableModuleTest):
    def runTest(self):
        slicer.mrmlScene.Clear()
        import SegmentEditorEffects  # noqa: F401  (available inside Slicer)
        self.delayDisplay("Effect module loaded")
