"""Module logics on a PET loaded from Slicer's DICOM database: the SUV factor comes from the series' tags (the files
found through the node's "DICOM.instanceUIDs" and slicer.dicomDatabase.fileForInstance), a volume that carries SUV
units is taken as it is, and settings that contradict the tags are refused. The worker is replaced by an in-process
engine that records what the logic sends, so these tests stay fast."""

import os
import shutil
import tempfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_series import expected_geometry, stored_volume, suv_factor, write_series
from headless import DICOMDatabaseStandIn


@pytest.fixture
def dicom_pet(mrml, tmp_path, monkeypatch):
    """(volume node in Bq/ml as Slicer's DICOM module loads it, expected SUV array, files by SOP instance UID);
    ``slicer.dicomDatabase`` is the strict stand-in holding the series."""
    import slicer
    from PETWorkbenchSlicer import mrml as bridge
    paths = write_series(tmp_path / "pet")
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    stored, slopes = stored_volume()
    bqml = (stored * slopes[:, None, None]).astype(np.float32)
    img = sitk.GetImageFromArray(bqml)
    origin, spacing, direction = expected_geometry()
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    node = bridge.image_to_volume(img, name="PET AC")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(by_uid))
    monkeypatch.setattr(slicer, "dicomDatabase", DICOMDatabaseStandIn(by_uid), raising=False)
    return node, bqml * suv_factor(), by_uid


def test_dicom_volume_is_converted_with_its_tags(dicom_pet, monkeypatch):
    import slicer
    from PETWorkbenchLib.errors import InputError
    from PETWorkbenchSlicer.slicer_bridge import pet_volume_in_suv
    node, suv, by_uid = dicom_pet
    image, scale, units = pet_volume_in_suv(node)
    assert scale == pytest.approx(suv_factor(), rel=1e-9) and units == "Bq/ml"
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), suv, rtol=1e-5)
    with pytest.raises(InputError) as err:
        pet_volume_in_suv(node, units="Bq/ml", patientWeight=80.0, injectedDose=370.0)
    assert "patient weight (kg) 80 (PatientWeight 75 kg)" in str(err.value) and "injected dose (MBq) 370" in str(
        err.value)
    lost = dict(by_uid)
    lost.pop(next(iter(lost)))
    monkeypatch.setattr(slicer, "dicomDatabase", DICOMDatabaseStandIn(lost))
    with pytest.raises(InputError, match="1 of its 8 DICOM instances are not in the DICOM database"):
        pet_volume_in_suv(node)
    monkeypatch.delattr(slicer, "dicomDatabase")
    with pytest.raises(InputError, match="DICOM database is not open"):
        pet_volume_in_suv(node)


def test_volume_carrying_suv_units_is_taken_as_it_is(dicom_pet):
    import slicer
    from PETWorkbenchLib.errors import InputError
    from PETWorkbenchSlicer.slicer_bridge import pet_volume_in_suv
    from PETWorkbenchSlicer import mrml as bridge
    node, _, _ = dicom_pet
    bridge.image_to_volume(bridge.volume_to_image(node) * suv_factor(), node)      # as the PET-DICOM extension loads
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning("{SUVbw}g/ml", "UCUM", "Standardized Uptake Value body weight")
    node.SetVoxelValueUnits(units)
    image, scale, node_units = pet_volume_in_suv(node)
    assert scale == 1.0 and node_units == "SUV"
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(bridge.volume_to_image(node)))
    with pytest.raises(InputError, match="these settings contradict it: units Bq/ml"):
        pet_volume_in_suv(node, units="Bq/ml", patientWeight=75.0, injectedDose=370.0)
    units.SetValueSchemeMeaning("{SUVlbm}g/ml", "UCUM", "Standardized Uptake Value lean body mass")
    node.SetVoxelValueUnits(units)
    with pytest.raises(InputError, match="SUVbw"):
        pet_volume_in_suv(node)


def _in_process_engine(outputs):
    """An EngineRun stand-in: prepare() writes the inputs, ``outputs(tmp)`` plays the engine, finish() reads;
    what was sent is kept in ``sent`` (file name -> array)."""
    sent = {}

    class InProcessRun:
        def __init__(self, args, prepare=None, finish=None, progress=None, log=None):
            self.args, self.prepare, self.finish = args, prepare, finish

        def wait(self):
            tmp = tempfile.mkdtemp()
            try:
                self.prepare(tmp)
                for name in os.listdir(tmp):
                    sent[name] = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(tmp, name)))
                outputs(tmp)
                return self.finish(tmp, {})
            finally:
                shutil.rmtree(tmp)

    return InProcessRun, sent


def test_synthesis_logic_sends_suv_and_returns_the_input_units(dicom_pet, monkeypatch):
    import PETWorkbenchSlicer.slicer_bridge as bridge_module
    from PETWorkbenchSlicer import mrml as bridge
    from SynthesisModule import SynthesisModuleLogic
    node, suv, _ = dicom_pet
    run, sent = _in_process_engine(lambda tmp: shutil.copy(os.path.join(tmp, "input.nii"),
                                                           os.path.join(tmp, "output.nii")))
    monkeypatch.setattr(bridge_module, "EngineRun", run)
    out = SynthesisModuleLogic().synthesize(node, model="unused.pt")
    np.testing.assert_allclose(sent["input.nii"], suv, rtol=1e-5)
    back = sitk.GetArrayFromImage(bridge.volume_to_image(out))
    np.testing.assert_allclose(back, sitk.GetArrayFromImage(bridge.volume_to_image(node)), rtol=1e-5)
    assert out.GetAttribute("PETWorkbench.units") == "Bq/ml"


def test_segmentation_logic_sends_suv_and_tables_suv(dicom_pet, monkeypatch):
    import PETWorkbenchSlicer.slicer_bridge as bridge_module
    from SegmentationModule import SegmentationModuleLogic
    node, suv, _ = dicom_pet
    labels = np.zeros(suv.shape, np.uint8)
    labels[2:6, 4:12, 4:12] = 14                                          # liver: the hot region

    def engine(tmp):
        pet = sitk.ReadImage(os.path.join(tmp, "pet.nii"))
        lab = sitk.GetImageFromArray(labels)
        lab.CopyInformation(pet)
        sitk.WriteImage(lab, os.path.join(tmp, "labels.nii"))

    run, sent = _in_process_engine(engine)
    monkeypatch.setattr(bridge_module, "EngineRun", run)
    seg = SegmentationModuleLogic().segment(node, organs=["liver"], model="unused.pt")
    np.testing.assert_allclose(sent["pet.nii"], suv, rtol=1e-5)
    t = seg.GetNodeReference("PETWorkbench.uptakeTable").GetTable()
    assert t.GetColumnByName("name").GetValue(0) == "liver"
    assert t.GetColumnByName("suv_mean").GetValue(0) == pytest.approx(suv[labels == 14].mean(), rel=1e-4)
