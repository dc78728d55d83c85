"""Write a study's results as a 3D Slicer scene (MRML + data files) with everything referenced.

Inside Slicer the current scene is used; elsewhere a headless scene from slicer-core (PyPI) is created with
:func:`headless_scene`, which registers the module logics that segmentations and transforms need.
"""

import json
import os
import shutil
import types
from pathlib import Path

import slicer

from PETWorkbenchLib.errors import ResourceError, os_error_reason


def headless_scene():
    """A new MRML scene with Colors/Volumes/Segmentations/Transforms/SubjectHierarchy logics (slicer-core).

    Also points ``slicer.mrmlScene``/``slicer.modules``/``slicer.app`` at it so that ``slicer.util`` helpers work.
    Returns (scene, logics dict).
    """
    from vtkmodules.vtkCommonCore import vtkCollection
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    logics = {}
    for name, logic in (("Colors", app_logic.GetColorLogic()), ("Volumes", slicer.vtkSlicerVolumesLogic()),
                        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                        ("Transforms", slicer.vtkSlicerTransformLogic()),
                        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())):
        logic.SetMRMLScene(scene)              # Segmentations: registers the representation converters
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: types.SimpleNamespace(logic=(lambda lg=lg: lg))
                                              for k, lg in logics.items()})
    slicer.app = types.SimpleNamespace(applicationLogic=lambda: app_logic, mrmlScene=lambda: scene,
                                       testingEnabled=lambda: True, processEvents=lambda: None)
    return scene, logics


def _save(node, path):
    sn = node.GetStorageNode()
    if sn is None:
        sn = node.CreateDefaultStorageNode()
        node.GetScene().AddNode(sn)
        node.SetAndObserveStorageNodeID(sn.GetID())
    sn.SetFileName(str(path))
    if not sn.WriteData(node) or not Path(path).is_file() or Path(path).stat().st_size == 0:
        raise ResourceError(f"Cannot write {Path(path).name} of the scene (is the disk full?)")
    return path


def write_study_scene(study_dir, scene=None):
    """Build the scene of one pipeline study folder and save ``<study_dir>/scene/Scene.mrml`` with its data: written
    into a temporary folder beside it, checked, then put in place of the previous scene."""
    import tempfile
    from PETWorkbenchLib.imageio import current_umask
    study_dir = Path(study_dir).resolve()      # absolute, so that the scene stores paths relative to its folder
    final = study_dir / "scene"
    try:
        out = Path(tempfile.mkdtemp(prefix=".scene.part-", dir=study_dir))
        out.chmod(0o777 & ~current_umask())
    except OSError as e:
        raise ResourceError(f"Cannot write the scene in {study_dir}: {os_error_reason(e)}") from None
    try:
        scene_path, ids = _write_scene(study_dir, out, scene)
        _replace_folder(out, final)
    finally:
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
    return final / scene_path.name, ids


def _replace_folder(new, final):
    """Put the verified folder ``new`` in place of ``final``; the previous one is removed only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError as e:
        if old is not None:
            os.replace(old, final)
        raise ResourceError(f"Cannot write the scene {final}: {os_error_reason(e)}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_scene(study_dir, out, scene):
    import SimpleITK as sitk
    from PETWorkbenchLib.imageio import read_image
    from PETWorkbenchLib.terminology import organ_specs
    from . import mrml
    if scene is None:
        scene, _ = headless_scene()
    nodes = {}
    for key, title in (("ct", "CT"), ("low_dose", "PET low dose"), ("synthesized", "PET DRMC synthesized"),
                       ("full_dose", "PET full dose"), ("pet_on_ct", "PET registered to CT")):
        p = study_dir / f"{key}.nii.gz"
        if p.is_file():
            nodes[key] = mrml.image_to_volume(read_image(p, title), name=title, scene=scene)
            _save(nodes[key], out / f"{key}.nrrd")
    src = nodes.get("low_dose")
    for key in ("synthesized",):
        if key in nodes and src is not None:
            mrml.reference_result(nodes[key], src)
    if (study_dir / "organs_low.nii.gz").is_file() and src is not None:
        seg, _, _ = mrml.labelmap_to_segmentation(read_image(study_dir / "organs_low.nii.gz", "organ labels"),
                                                  organ_specs(), referenceVolumeNode=src, name="Organs (LDOS)",
                                                  scene=scene)
        mrml.reference_result(seg, src)
        _save(seg, out / "organs.seg.nrrd")
        nodes["organs"] = seg
        if (study_dir / "uptake.json").is_file():
            rows = json.loads((study_dir / "uptake.json").read_text())["rows"]
            table = mrml.table_from_rows(rows, name="Organ uptake", scene=scene)
            mrml.reference_result(table, nodes.get("synthesized", src))
            seg.SetNodeReferenceID("PETWorkbench.uptakeTable", table.GetID())
            _save(table, out / "organ_uptake.tsv")
            nodes["uptake"] = table
    if (study_dir / "field.nii.gz").is_file() and "ct" in nodes:
        moving = nodes.get("synthesized", src)
        field = read_image(study_dir / "field.nii.gz", "displacement field", pixel_type=sitk.sitkVectorFloat64)
        t = mrml.displacement_to_transform(field, name="PET to CT", scene=scene, fixedNode=nodes["ct"],
                                           movingNode=moving)
        _save(t, out / "pet_to_ct.h5")
        nodes["transform"] = t
    scene.SetRootDirectory(str(out))
    scene.SetURL(str(out / "Scene.mrml"))
    if not scene.Commit() or not (out / "Scene.mrml").is_file():
        raise ResourceError(f"Cannot write the scene {out / 'Scene.mrml'} (is the disk full?)")
    return out / "Scene.mrml", {k: n.GetID() for k, n in nodes.items()}


def load_scene(path):
    """Load a saved scene into a fresh headless scene (volumes, segmentation, table, transform read from disk)."""
    scene, _ = headless_scene()
    scene.SetURL(str(path))
    if not scene.Import():
        raise RuntimeError(f"Could not load the scene {path}")
    return scene
