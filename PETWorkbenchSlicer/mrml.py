"""The only place that converts between MRML nodes and engine data (SimpleITK images, numpy arrays).

Works inside 3D Slicer and headless on slicer-core (PyPI). Conventions:

* Slicer stores geometry in RAS, SimpleITK/ITK in LPS: x and y change sign in origins, directions and vectors.
* numpy arrays are in (k, j, i) = (slice, row, column) order in both worlds.
* Volume geometry includes the node's *linear* parent transforms (so what the engine sees is what the user sees);
  a volume under a non-linear transform must be hardened first.
* Displacement fields from the engines map fixed points to moving points, ``x_m = x_f + u(x_f)`` (LPS mm, on the
  fixed grid). Stored in a grid transform node as its **from-parent** transform, so that placing the moving volume
  under the node shows it aligned with the fixed volume (Slicer resamples through the from-parent transform), the
  same convention SlicerElastix uses for elastix results.
"""

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support as nps

from PETWorkbenchLib.errors import InputError

LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def _scene(scene=None):
    return scene or slicer.mrmlScene


def _require(node, classes, what):
    if node is None:
        raise InputError(f"No {what} selected")
    if not any(node.IsA(c) for c in classes):
        raise InputError(f"{what} '{node.GetName()}' is a {node.GetClassName()}, expected {' or '.join(classes)}")


# ---------------------------------------------------------------- volumes

def volume_ijk_to_ras(volumeNode, include_parent=True):
    """4x4 IJK->RAS matrix of the node, including linear parent transforms."""
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
    parent = volumeNode.GetParentTransformNode() if include_parent else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"Volume '{volumeNode.GetName()}' is under a non-linear transform: harden the transform "
                             "first (Data module: right-click the transform, 'Harden transform')")
        w = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(w)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(w) @ ijk_to_ras
    return ijk_to_ras


def _geometry_from_ijk_to_ras(ijk_to_ras):
    a = np.asarray(ijk_to_ras, float)[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"Invalid voxel spacing {spacing}")
    direction_ras = a / spacing
    origin_lps = LPS_RAS @ np.asarray(ijk_to_ras, float)[:3, 3]
    direction_lps = LPS_RAS @ direction_ras
    return spacing, origin_lps, direction_lps


def volume_to_image(volumeNode, dtype=None):
    """Scalar or labelmap volume node -> SimpleITK.Image (LPS), geometry preserved. The node is not modified."""
    import SimpleITK as sitk
    _require(volumeNode, ("vtkMRMLScalarVolumeNode",), "volume")
    if volumeNode.IsA("vtkMRMLVectorVolumeNode") or volumeNode.IsA("vtkMRMLDiffusionTensorVolumeNode"):
        raise InputError(f"Volume '{volumeNode.GetName()}' has several components per voxel; a scalar volume "
                         "is needed")
    if volumeNode.GetImageData() is None:
        raise InputError(f"Volume '{volumeNode.GetName()}' is empty (no image data)")
    arr = slicer.util.arrayFromVolume(volumeNode)
    if arr.ndim != 3:
        raise InputError(f"Volume '{volumeNode.GetName()}' has {arr.ndim} dimensions; a 3D volume is needed")
    if arr.size == 0:
        raise InputError(f"Volume '{volumeNode.GetName()}' is empty (0 voxels)")
    arr = np.array(arr, dtype=dtype or arr.dtype, copy=True)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"Volume '{volumeNode.GetName()}' contains NaN or infinite values; engines need finite "
                         "voxel values")
    img = sitk.GetImageFromArray(arr)
    spacing, origin, direction = _geometry_from_ijk_to_ras(volume_ijk_to_ras(volumeNode))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection([float(d) for d in direction.flatten()])
    return img


def image_ijk_to_ras(image):
    """IJK->RAS 4x4 of a SimpleITK image."""
    spacing = np.array(image.GetSpacing(), float)
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_RAS @ direction @ np.diag(spacing)
    m[:3, 3] = LPS_RAS @ np.array(image.GetOrigin(), float)
    return m


def _as_3d(image):
    import SimpleITK as sitk
    if image.GetDimension() == 3:
        return image
    if image.GetDimension() == 2:
        return sitk.JoinSeries(image)
    raise InputError(f"Images of dimension {image.GetDimension()} cannot be shown as a volume")


def image_to_volume(image, volumeNode=None, name=None, scene=None, className="vtkMRMLScalarVolumeNode"):
    """SimpleITK.Image -> volume node (new one unless ``volumeNode`` is given). Returns the node."""
    image = _as_3d(image)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("Only scalar images can be written into a volume node")
    import SimpleITK as sitk
    arr = sitk.GetArrayFromImage(image)
    if volumeNode is None:
        volumeNode = _scene(scene).AddNewNodeByClass(className, name or "")
        volumeNode.CreateDefaultDisplayNodes()
    elif name:
        volumeNode.SetName(name)
    slicer.util.updateVolumeFromArray(volumeNode, arr)
    volumeNode.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(image_ijk_to_ras(image)))
    volumeNode.Modified()
    return volumeNode


def reference_result(outputNode, inputNode, role="PETWorkbench.input"):
    """Record that ``outputNode`` was computed from ``inputNode`` and place it beside it in the subject hierarchy."""
    outputNode.SetNodeReferenceID(role, inputNode.GetID())
    sh = outputNode.GetScene().GetSubjectHierarchyNode() if outputNode.GetScene() else None
    if sh is not None:
        item = sh.GetItemByDataNode(inputNode)
        parent = sh.GetItemParent(item) if item else 0
        if parent:
            sh.SetItemParent(sh.GetItemByDataNode(outputNode), parent)
    return outputNode


# ---------------------------------------------------------------- segmentations

def terminology_string(entry):
    """Terminology spec dict -> Slicer's serialized terminology entry.

    ``entry`` has "category", "type" and optionally "typeModifier", "anatomicRegion", "anatomicRegionModifier",
    each {"codingScheme", "codeValue", "codeMeaning"}; "contextName" and "anatomicContextName" are optional
    (without "contextName" the entry names Slicer's General Anatomy list; the organ specs of
    :mod:`PETWorkbenchLib.terminology` name the PETWorkbench organs context).
    """
    if not entry:
        return ""
    if isinstance(entry, str):
        return entry

    def code(key):
        c = entry.get(key) or {}
        return "^".join([c.get("codingScheme", c.get("CodingSchemeDesignator", "")),
                         str(c.get("codeValue", c.get("CodeValue", ""))),
                         c.get("codeMeaning", c.get("CodeMeaning", ""))])

    return "~".join([entry.get("contextName", "Segmentation category and type - 3D Slicer General Anatomy list"),
                     code("category"), code("type"), code("typeModifier"),
                     entry.get("anatomicContextName", "Anatomic codes - DICOM master list"),
                     code("anatomicRegion"), code("anatomicRegionModifier")])


def labelmap_to_segmentation(labelImage, specs, segmentationNode=None, referenceVolumeNode=None, overwrite=False,
                             name=None, scene=None):
    """Integer label image + segment specs -> segments in a segmentation node.

    ``specs``: list of {"value", "name", "color" (0..1 RGB), "terminology" (see :func:`terminology_string`)}.
    Values absent from the image are skipped and returned in ``missing``. Segments already in the node are never
    changed, except that with ``overwrite=True`` a segment with the same name as a new one is replaced.
    Returns (segmentationNode, {value: segmentID}, missing_values).
    """
    import SimpleITK as sitk
    labelImage = _as_3d(labelImage)
    arr = sitk.GetArrayViewFromImage(labelImage)
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputError("Label image has non-integer values")
    seen = set(np.unique(arr).tolist()) - {0}
    sc = _scene(scene)
    created = segmentationNode is None
    if created:
        segmentationNode = sc.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "Segmentation")
        segmentationNode.CreateDefaultDisplayNodes()
    else:
        _require(segmentationNode, ("vtkMRMLSegmentationNode",), "segmentation")
    if referenceVolumeNode is not None:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
    segmentation = segmentationNode.GetSegmentation()
    from PETWorkbenchLib.terminology import CONTEXT_NAME
    if any(isinstance(s.get("terminology"), dict) and s["terminology"].get("contextName") == CONTEXT_NAME
           for s in specs):
        load_into_slicer()     # so that Slicer's Terminologies module finds the organ types the segments name
    ids, missing = {}, []
    logic = slicer.modules.segmentations.logic()
    for spec in specs:
        value = int(spec["value"])
        if value not in seen:
            missing.append(value)
            continue
        one = sc.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__pwb_tmp_one")
        try:
            image_to_volume(_binary(labelImage, value), one)
            if created and referenceVolumeNode is None and not ids:
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(one)   # the label map's grid
            before = set(segmentation.GetSegmentIDs())
            if not logic.ImportLabelmapToSegmentationNode(one, segmentationNode, ""):
                raise RuntimeError(f"Importing label {value} into the segmentation failed")
            new = [s for s in segmentation.GetSegmentIDs() if s not in before]
        finally:
            sc.RemoveNode(one)
        if len(new) != 1:
            raise RuntimeError(f"Importing label {value} produced {len(new)} segments")
        sid = new[0]
        if overwrite:
            for other in list(before):
                if segmentation.GetSegment(other).GetName() == spec["name"]:
                    segmentation.RemoveSegment(other)
        seg = segmentation.GetSegment(sid)
        seg.SetName(spec["name"])
        if seg.GetLabelValue() != value:   # label values live in shared layers: never re-label in place
            raise RuntimeError(f"Segment for label {value} got label value {seg.GetLabelValue()}")
        if spec.get("color") is not None:
            seg.SetColor(*[float(c) for c in spec["color"]])
        term = terminology_string(spec.get("terminology"))
        if term:
            seg.SetTerminology(term)
        ids[value] = sid
    return segmentationNode, ids, missing


def _binary(image, value):
    """Voxels of one label, keeping the label value (so the imported segment keeps it too)."""
    import SimpleITK as sitk
    return sitk.Cast(image == value, sitk.sitkInt32) * int(value)


def segmentation_to_labelmap(segmentationNode, referenceVolumeNode, segmentIds=None):
    """Segments -> (label SimpleITK.Image on the reference volume's grid, specs). Label values are kept when they
    are set and distinct; otherwise segments are numbered 1..N in order. Later segments win where they overlap."""
    import SimpleITK as sitk
    _require(segmentationNode, ("vtkMRMLSegmentationNode",), "segmentation")
    _require(referenceVolumeNode, ("vtkMRMLScalarVolumeNode",), "reference volume")
    segmentation = segmentationNode.GetSegmentation()
    ids = list(segmentIds) if segmentIds is not None else list(segmentation.GetSegmentIDs())
    if not ids:
        raise InputError(f"Segmentation '{segmentationNode.GetName()}' has no segments")
    values = [segmentation.GetSegment(i).GetLabelValue() for i in ids]
    if any(v <= 0 for v in values) or len(set(values)) != len(values):
        values = list(range(1, len(ids) + 1))
    ref = volume_to_image(referenceVolumeNode)
    labels = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.int32)
    specs = []
    for sid, value in zip(ids, values):
        seg = segmentation.GetSegment(sid)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, sid, referenceVolumeNode)
        labels[mask > 0] = value
        specs.append({"value": int(value), "name": seg.GetName(), "color": list(seg.GetColor()),
                      "terminology": seg.GetTerminology() if seg.HasTerminology() else "", "segmentId": sid})
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(ref)
    return out, specs


# ---------------------------------------------------------------- transforms

def displacement_to_transform(field, transformNode=None, name=None, scene=None, fixedNode=None, movingNode=None):
    """Engine displacement field (SimpleITK vector image, LPS, x_m = x_f + u(x_f)) -> grid transform node.

    The field becomes the node's from-parent transform (fixed -> moving, RAS). ``fixedNode``/``movingNode`` are
    recorded as node references ("fixedVolume"/"movingVolume"), as Slicer's registration modules do.
    """
    import SimpleITK as sitk
    if field.GetNumberOfComponentsPerPixel() != field.GetDimension() or field.GetDimension() not in (2, 3):
        raise InputError("Displacement field must have one vector component per image dimension (2D or 3D)")
    u = sitk.GetArrayFromImage(field).astype(np.float64)          # (k, j, i, 3) LPS or (j, i, 2)
    spacing = list(field.GetSpacing())
    origin = list(field.GetOrigin())
    direction = np.array(field.GetDirection(), float).reshape(field.GetDimension(), field.GetDimension())
    if field.GetDimension() == 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,))], axis=-1)[None]
        spacing, origin = spacing + [1.0], origin + [0.0]
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction = d3
    u_ras = u * np.array([-1.0, -1.0, 1.0])
    grid = vtk.vtkImageData()
    grid.SetDimensions(u.shape[2], u.shape[1], u.shape[0])
    grid.SetSpacing(*spacing)
    origin_ras = LPS_RAS @ np.array(origin)
    grid.SetOrigin(*origin_ras)
    grid.GetPointData().SetScalars(nps.numpy_to_vtk(u_ras.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE))
    dmat = vtk.vtkMatrix4x4()
    dir_ras = LPS_RAS @ direction
    for r in range(3):
        for c in range(3):
            dmat.SetElement(r, c, dir_ras[r, c])
    t = slicer.vtkOrientedGridTransform()
    t.SetDisplacementGridData(grid)
    t.SetGridDirectionMatrix(dmat)
    t.SetInterpolationModeToLinear()
    if transformNode is None:
        transformNode = _scene(scene).AddNewNodeByClass("vtkMRMLGridTransformNode", name or "Registration")
    else:
        _require(transformNode, ("vtkMRMLTransformNode",), "output transform")
        if name:
            transformNode.SetName(name)
    transformNode.SetAndObserveTransformFromParent(t)
    if fixedNode is not None:
        transformNode.SetNodeReferenceID("fixedVolume", fixedNode.GetID())
    if movingNode is not None:
        transformNode.SetNodeReferenceID("movingVolume", movingNode.GetID())
    return transformNode


def transform_to_displacement(transformNode, referenceImage):
    """Any transform node -> displacement field (LPS, x_m = x_f + u) sampled on ``referenceImage``'s grid.

    Uses the node's from-parent transform (world -> local), which for a registration result maps fixed to moving
    points; works for linear, B-spline, grid and composite transforms alike.
    """
    import SimpleITK as sitk
    _require(transformNode, ("vtkMRMLTransformNode",), "transform")
    ref = _as_3d(referenceImage)
    size = ref.GetSize()
    kk, jj, ii = np.meshgrid(*(np.arange(n, dtype=float) for n in size[::-1]), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel(), np.ones(ii.size)], 0)
    ras = (image_ijk_to_ras(ref) @ ijk)[:3].T
    out = transform_points_ras(transformNode, ras, from_parent=True)
    u_lps = (out - ras) * np.array([-1.0, -1.0, 1.0])
    field = sitk.GetImageFromArray(u_lps.reshape(tuple(size[::-1]) + (3,)), isVector=True)
    field.CopyInformation(ref)
    return field


def transform_points_ras(transformNode, points_ras, from_parent=True):
    """Transform an (N, 3) array of RAS points through the node (from-parent by default), vectorized in VTK."""
    pts = vtk.vtkPoints()
    pts.SetData(nps.numpy_to_vtk(np.ascontiguousarray(points_ras, dtype=np.float64), deep=True))
    out = vtk.vtkPoints()
    t = transformNode.GetTransformFromParent() if from_parent else transformNode.GetTransformToParent()
    t.TransformPoints(pts, out)
    return nps.vtk_to_numpy(out.GetData()).astype(np.float64).copy()


# ---------------------------------------------------------------- tables

def table_from_rows(rows, tableNode=None, name=None, scene=None, columns=None):
    """List of dicts -> table node (one row per dict, columns in order of ``columns`` or first-seen keys)."""
    if tableNode is None:
        tableNode = _scene(scene).AddNewNodeByClass("vtkMRMLTableNode", name or "Table")
    else:
        _require(tableNode, ("vtkMRMLTableNode",), "table")
        tableNode.RemoveAllColumns()
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    table = tableNode.GetTable()
    for c in cols:
        numeric = all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) and rows
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(c)
        table.AddColumn(arr)
    table.SetNumberOfRows(len(rows))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            v = r.get(c)
            col = table.GetColumn(j)
            if isinstance(col, vtk.vtkDoubleArray):
                col.SetValue(i, float("nan") if v is None else float(v))
            else:
                col.SetValue(i, "" if v is None else str(v))
    table.Modified()
    return tableNode


def points_to_markups(points_lps, labels, markupsNode=None, name=None, scene=None, locked=True):
    """Markups point list of ``points_lps`` (mm, LPS as ITK/DICOM) with ``labels``; converted to Slicer's RAS."""
    if markupsNode is None:
        markupsNode = _scene(scene).AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name or "Points")
    else:
        _require(markupsNode, ("vtkMRMLMarkupsFiducialNode",), "point list")
        markupsNode.RemoveAllControlPoints()
    for p, label in zip(points_lps, labels):
        markupsNode.AddControlPoint(-float(p[0]), -float(p[1]), float(p[2]), str(label))
    markupsNode.SetLocked(bool(locked))
    return markupsNode


def load_into_slicer(logic=None):
    """Load the organ terminology context into Slicer's Terminologies module logic (once) so that Slicer finds the
    types our segments name. ``logic``: a ``vtkSlicerTerminologiesModuleLogic``; by default Slicer's own, and
    nothing is done (None is returned) where there is none (engine use, headless scenes). Returns the context
    name when it is loaded."""
    if logic is None:
        try:
            import slicer
            logic = slicer.modules.terminologies.logic()
        except (ImportError, AttributeError):
            return None
    from PETWorkbenchLib.terminology import context_name, terminology_path
    name = context_name()
    if logic.IsTerminologyContextLoaded(name):
        return name
    loaded = logic.LoadTerminologyFromFile(str(terminology_path()))
    if loaded != name:
        raise RuntimeError(f"Slicer could not load the terminology {terminology_path()} (got {loaded!r})")
    return name
