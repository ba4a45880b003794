"""Image I/O, validation and geometry: the ONE place that knows origin, spacing, direction, LPS/RAS.

SimpleITK images live in physical LPS millimetres. Slicer works in RAS with arrays indexed (K, J, I).
"""

import gzip
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .files import atomic_path

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # read and written by SimpleITK
FREESURFER_SUFFIXES = (".mgz", ".mgh")  # read and written with nibabel (SimpleITK has no IO for them)
FREESURFER_TYPES = (np.uint8, np.int16, np.int32, np.float32)  # the voxel types an MGH file can hold


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read an image file that SimpleITK can read, or FreeSurfer's .mgz/.mgh; raise InputError naming the problem.

    Content is checked where it is used (``check_image``, ``check_labels``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    if path.name.lower().endswith(FREESURFER_SUFFIXES):
        return read_freesurfer(path, what)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {path}: {last_line(exc)}") from None
    return image


def last_line(exc: Exception) -> str:
    """The last line of an exception's message (ITK and nibabel put the reason there), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def read_freesurfer(path: Path, what: str = "image") -> sitk.Image:
    """A FreeSurfer .mgz/.mgh volume (one frame) through nibabel, its voxel-to-RAS affine made LPS geometry."""
    import nibabel as nib

    try:
        volume = nib.load(str(path))
        array = np.asanyarray(volume.dataobj)
    except Exception as exc:  # nibabel raises many kinds (header, gzip, size) for a damaged file
        raise InputError(f"cannot read {what} {path}: {last_line(exc)}") from None
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise InputError(f"{what} {path} has shape {array.shape}: one 3D frame is required")
    native = array.astype(array.dtype.newbyteorder("="))  # MGH stores big-endian; SimpleITK takes native order
    return image_from_array(native.transpose(2, 1, 0), volume.affine)


def check_image_output(path: str | Path, what: str = "output") -> Path:
    """The path of an image to write, refused (InputError) unless its type is one this package writes."""
    path = Path(path)
    if not path.name.lower().endswith(IMAGE_SUFFIXES + FREESURFER_SUFFIXES):
        raise InputError(f"{what} {path}: an image file name must end in "
                         f"{', '.join(IMAGE_SUFFIXES + FREESURFER_SUFFIXES)}")
    return path


def check_image(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Check a 3D scalar image with finite, non-constant voxels; return it unchanged."""
    if image.GetDimension() != 3:
        raise InputError(f"{what} is {image.GetDimension()}D; a 3D image is required")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "a scalar image is required")
    if min(image.GetSize()) < 2:
        raise InputError(f"{what} has size {image.GetSize()}: a 3D image needs at least 2 voxels per axis")
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{what} contains NaN or infinite voxels")
    if array.min() == array.max():
        raise InputError(f"{what} is constant ({array.min()}): nothing to register")
    return image


def check_labels(labels: sitk.Image, image: sitk.Image, what: str = "labels") -> sitk.Image:
    """Check that a label map is integer, non-empty and on the same grid as its image."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar label map")
    if not same_grid(labels, image):
        raise InputError(f"{what} are on another grid (size, spacing, origin or direction) than their image")
    array = sitk.GetArrayViewFromImage(labels)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise InputError(f"{what} have non-integer values: a label map is required")
    if not array.any():
        raise InputError(f"{what} are empty (all background)")
    if array.min() < 0 or array.max() > np.iinfo(np.int32).max:
        raise InputError(f"{what} have label values outside 0..{np.iinfo(np.int32).max}")
    return sitk.Cast(labels, sitk.sitkInt32)


def check_mask(mask: sitk.Image, image: sitk.Image, what: str = "mask") -> sitk.Image:
    """A binary mask (non-zero = inside) on its image's grid, as uint8 0/1; InputError otherwise."""
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a 3D scalar image")
    if not same_grid(mask, image):
        raise InputError(f"{what} is on another grid (size, spacing, origin or direction) than its image")
    values = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise InputError(f"{what} has non-integer values: a mask (0 outside, non-zero inside) is required, not an "
                         "intensity or probability image (threshold it first)")
    inside = values != 0
    if not inside.any():
        raise InputError(f"{what} is empty: no voxel inside")
    out = sitk.GetImageFromArray(inside.astype(np.uint8))
    out.CopyInformation(image)
    return out


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    """True when two images share size, spacing, origin and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def index_to_physical(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping a continuous index (i, j, k, 1) to an LPS point."""
    matrix = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJKToRAS matrix of an image, as Slicer stores it for a volume node."""
    return LPS_TO_RAS @ index_to_physical(image)


def image_from_array(array_kji: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> sitk.Image:
    """SimpleITK image from a (K, J, I) array and a 4x4 IJKToRAS matrix (Slicer's layout)."""
    lps = LPS_TO_RAS @ np.asarray(ijk_to_ras_matrix, dtype=float)
    linear = lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def array_kji(image: sitk.Image) -> np.ndarray:
    """Voxel array of an image, indexed (k, j, i) like Slicer's arrayFromVolume (a copy)."""
    return sitk.GetArrayFromImage(image)


def affine_field(matrix: np.ndarray, image: sitk.Image, dtype: type = np.float64) -> np.ndarray:
    """``matrix`` (4x4) applied to the LPS point of every voxel centre of ``image``, shape (K, J, I, 3).

    Built as a sum of one broadcast term per axis, so no (K, J, I, 4) coordinate array is made.
    """
    linear = matrix @ index_to_physical(image)
    size = image.GetSize()
    field = np.empty((*size[::-1], 3), dtype=dtype)
    field[...] = linear[:3, 3]
    for axis, n in enumerate(size):  # i, j, k -> array axes 2, 1, 0
        shape = [1, 1, 1, 3]
        shape[2 - axis] = n
        field += (np.arange(n)[:, None] * linear[:3, axis]).reshape(shape).astype(dtype)
    return field


def downsampled_grid(grid: sitk.Image, factor: int) -> sitk.Image:
    """The grid that average pooling by ``factor`` makes of ``grid`` (same extent, centres moved)."""
    size = [n // factor for n in grid.GetSize()]
    coarse = sitk.Image(size, sitk.sitkFloat32)
    coarse.SetSpacing([s * factor for s in grid.GetSpacing()])
    coarse.SetDirection(grid.GetDirection())
    coarse.SetOrigin(grid.TransformContinuousIndexToPhysicalPoint([(factor - 1) / 2] * 3))
    return coarse


def index_in(source: sitk.Image, target: sitk.Image, dtype: type = np.float64) -> np.ndarray:
    """Continuous index (i, j, k) in ``source`` of every voxel centre of ``target``, shape (K, J, I, 3)."""
    return affine_field(np.linalg.inv(index_to_physical(source)), target, dtype)


def physical_points(image: sitk.Image) -> np.ndarray:
    """LPS coordinates of every voxel centre, shape (K, J, I, 3)."""
    return affine_field(np.eye(4), image)


def vectors_to_ras(vectors_lps: np.ndarray) -> np.ndarray:
    """Convert displacement vectors (..., 3) between LPS and RAS (the map is its own inverse)."""
    return vectors_lps * LPS_TO_RAS.diagonal()[:3]


def field_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """SimpleITK transform of a displacement field image (x -> x + u(x), linear interpolation)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def warp_on_field_grid(image: sitk.Image, field: sitk.Image, interpolator: int, fill: float,
                       pixel_type: int) -> sitk.Image:
    """``image`` resampled onto ``field``'s own grid at x + u(x) (as ``sitk.Resample`` through
    ``field_transform`` onto that grid, with ``fill`` outside ``image``), as ``pixel_type``: the field
    is read at its own voxels, not interpolated, which makes it faster."""
    warp = sitk.WarpImageFilter()
    warp.SetOutputParameteresFromImage(field)  # sic: SimpleITK's spelling
    warp.SetInterpolator(interpolator)
    warp.SetEdgePaddingValue(fill)
    return warp.Execute(sitk.Cast(image, pixel_type), field)


def displacement_image(vectors_kji: np.ndarray, reference: sitk.Image, dtype: type = np.float64) -> sitk.Image:
    """Vector image (LPS mm) with the geometry of ``reference`` from a (K, J, I, 3) array."""
    field = sitk.GetImageFromArray(vectors_kji.astype(dtype, copy=False), isVector=True)
    field.CopyInformation(reference)
    return field


def write_image(image: sitk.Image, path: str | Path, compression: int = 1) -> None:
    """Write atomically: to a temporary name in the same folder, then rename.

    A ``.gz`` file is gzip-compressed at level ``compression`` (0 = stored, fastest; 1 = fast, the
    default; 9 = smallest): SimpleITK writes it uncompressed and Python's gzip compresses it.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.name.lower().endswith(FREESURFER_SUFFIXES):
            write_freesurfer(image, tmp)
            return
        if path.suffix != ".gz":
            _write_itk(image, tmp, path, compression > 0)
            return
        plain = tmp.with_suffix("")  # .name.partial.nii beside .name.partial.nii.gz
        try:
            _write_itk(image, plain, path, False)
            with open(plain, "rb") as source, gzip.open(tmp, "wb", compresslevel=compression) as target:
                shutil.copyfileobj(source, target, 1 << 24)
        finally:
            plain.unlink(missing_ok=True)


def _write_itk(image: sitk.Image, target: Path, path: Path, compress: bool) -> None:
    """SimpleITK's writer, its failure (no space, no permission, no writer) an InputError naming ``path``."""
    try:
        sitk.WriteImage(image, str(target), useCompression=compress)
    except RuntimeError as exc:
        raise InputError(f"cannot write {path}: {last_line(exc)}") from None


def write_freesurfer(image: sitk.Image, path: Path) -> None:
    """A scalar image as a FreeSurfer .mgz/.mgh through nibabel, in the nearest voxel type MGH holds."""
    import nibabel as nib

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path.name}: FreeSurfer files hold scalar images here; write vectors as .nii.gz")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    if array.dtype.type not in FREESURFER_TYPES:
        fits = np.issubdtype(array.dtype, np.integer) and np.can_cast(array.dtype, np.int32)
        array = array.astype(np.int32 if fits else np.float32)
    nib.MGHImage(array, ijk_to_ras(image)).to_filename(str(path))


def voxel_flow_to_physical(flow: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Displacement in voxels, channels (dk, dj, di) as the network gives it, shape (3, K, J, I),
    to physical LPS millimetres on the grid of ``image``, shape (K, J, I, 3)."""
    linear = index_to_physical(image)[:3, :3]
    ijk = np.moveaxis(np.asarray(flow)[::-1], 0, -1)
    return ijk @ linear.T


def affine_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix (LPS) of a SimpleITK affine-like transform: point p -> A (p - c) + c + t."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    t = np.array(transform.GetTranslation())
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = c + t - a @ c
    return matrix


def working_grid(fixed: sitk.Image, mask: np.ndarray, spacing: float = 1.0, multiple: int = 16,
                 margin_mm: float = 4.0, direction: np.ndarray | None = None) -> sitk.Image:
    """Empty float image on a grid of ``spacing`` mm whose axes point along the columns of ``direction``
    (LPS; identity when None), whose size is a multiple of ``multiple``, centred on the bounding box of
    ``mask`` (a (K, J, I) foreground of fixed) plus ``margin_mm``, the box taken along the grid's axes."""
    mask = np.array(mask, dtype=bool)
    if not mask.any():
        mask[:] = True
    axes = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    k, j, i = np.nonzero(mask)
    corners = np.array([[a, b, c, 1.0] for a in (i.min() - 0.5, i.max() + 0.5)
                        for b in (j.min() - 0.5, j.max() + 0.5) for c in (k.min() - 0.5, k.max() + 0.5)])
    points = (corners @ index_to_physical(fixed).T)[:, :3] @ axes  # coordinates along the grid's axes
    low, high = points.min(0) - margin_mm, points.max(0) + margin_mm
    size = np.ceil((high - low) / spacing / multiple).astype(int) * multiple
    centre = (low + high) / 2
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(axes.flatten().tolist())
    grid.SetOrigin((axes @ (centre - (size - 1) * spacing / 2)).tolist())
    return grid


def world_ijk_to_ras(ijk_to_ras: np.ndarray, parent_to_world: np.ndarray | None) -> np.ndarray:
    """IJKToRAS of a volume in world coordinates: its own matrix under a linear parent transform (4x4)."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if parent_to_world is None:
        return matrix.copy()
    return np.asarray(parent_to_world, dtype=float) @ matrix


def labels_on_grid(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label map resampled (nearest neighbour, outside = 0) onto the grid of ``reference``, as int32.

    Returns the labels unchanged (cast to int32) when they are already on that grid.
    """
    if same_grid(labels, reference):
        return sitk.Cast(labels, sitk.sitkInt32)
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
