"""Registration metrics: Dice overlap and the Jacobian determinant of a displacement field."""

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LOOKUP_LIMIT = 1 << 20  # ids below this are compacted through a lookup table, larger ones by binary search
JOINT_LIMIT = 1 << 22  # Dice from one joint histogram up to this many (label, label) bins (2047 labels)


def label_ids(labels: np.ndarray) -> list[int]:
    """Sorted non-zero label ids present in a label map (by counting when the ids are small integers)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "iub" and labels.size and 0 <= labels.min() and labels.max() < LOOKUP_LIMIT:
        return [int(v) for v in np.flatnonzero(np.bincount(labels.ravel())) if v != 0]
    return [int(v) for v in np.unique(labels) if v != 0]


def compact_labels(labels: np.ndarray, ids: list[int], small: bool = False) -> np.ndarray:
    """Position + 1 of each voxel's id in ``ids`` (0 for ids not listed), flat int64 (with ``small`` the
    smallest unsigned type that holds len(ids) + 1): lets counts use ``len(ids)`` bins whatever the id
    values (an id of 6e8 does not ask for gigabytes)."""
    table = np.asarray(sorted(ids), dtype=np.int64)
    dtype = np.min_scalar_type(table.size) if small else np.int64
    flat = np.asarray(labels).ravel()
    if not table.size:
        return np.zeros(flat.shape, dtype=dtype)
    if table[-1] < LOOKUP_LIMIT and table[0] >= 0:  # small ids: one table lookup (fast)
        lookup = np.zeros(int(table[-1]) + 2, dtype=dtype)
        lookup[table] = np.arange(1, table.size + 1)
        return lookup[np.clip(flat, 0, table[-1] + 1)]
    flat = flat.astype(np.int64)
    position = np.searchsorted(table, flat).clip(max=table.size - 1)
    return np.where(table[position] == flat, position + 1, 0).astype(dtype, copy=False)


def label_counts(labels: np.ndarray, ids: list[int]) -> dict[int, int]:
    """Number of voxels of each id."""
    counts = np.bincount(compact_labels(labels, ids), minlength=len(ids) + 1)
    return {i: int(counts[n + 1]) for n, i in enumerate(sorted(ids))}


def dice(a: np.ndarray, b: np.ndarray, ids: list[int]) -> dict[int, float]:
    """Dice coefficient per label id between two label maps (NaN where a label is in neither)."""
    ids = sorted(ids)
    bins = len(ids) + 1
    a, b = compact_labels(a, ids, small=True), compact_labels(b, ids, small=True)
    if bins * bins <= JOINT_LIMIT:  # one pass: voxel counts of (label in a, label in b)
        joint = np.bincount(a.astype(np.intp) * bins + b, minlength=bins * bins).reshape(bins, bins)
        a_count, b_count, both = joint.sum(1), joint.sum(0), np.diagonal(joint)
    else:
        a_count, b_count = np.bincount(a, minlength=bins), np.bincount(b, minlength=bins)
        both = np.bincount(np.where(a == b, a, 0), minlength=bins)
    out = {}
    for n, i in enumerate(ids, start=1):
        denominator = a_count[n] + b_count[n]
        out[i] = float(2 * both[n] / denominator) if denominator else float("nan")
    return out


def jacobian_determinant(vectors: np.ndarray, index_to_physical_linear: np.ndarray, slab: int = 8) -> np.ndarray:
    """det of the Jacobian of x -> x + u(x) in physical space, float32, shape (K, J, I).

    ``vectors``: u in physical units, shape (K, J, I, 3) on a grid whose index (i, j, k) maps to
    physical space through the 3x3 matrix ``index_to_physical_linear`` (direction @ diag(spacing)).
    Central differences inside, one-sided at the borders (as numpy.gradient), in torch (multithreaded),
    ``slab`` slices of K at a time (with one slice either side), so the working buffers stay small.
    """
    import torch

    inverse = np.linalg.inv(index_to_physical_linear)
    with warnings.catch_warnings():  # a read-only view is fine: it is only read
        warnings.simplefilter("ignore", UserWarning)
        u = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
    depth = u.shape[0]
    det = torch.empty(u.shape[:3])
    for first in range(0, depth, slab):
        last = min(depth, first + slab)
        low, high = max(0, first - 1), min(depth, last + 1)  # neighbours for central differences in k
        block = _determinant(u[low:high].permute(3, 0, 1, 2).contiguous(), inverse)
        det[first:last] = block[first - low:last - low]
    return det.numpy()


def _determinant(components: "torch.Tensor", inverse: np.ndarray) -> "torch.Tensor":
    """det J of a block of u (3, K, J, I); ``inverse`` maps physical to index directions (see above)."""
    import torch

    jac = [[None] * 3 for _ in range(3)]
    for a in range(3):
        for c, dim in enumerate((2, 1, 0)):  # d u_a / d index c (i, j, k), then by the chain rule into b
            targets = [b for b in range(3) if inverse[c, b] != 0]  # one for axis-aligned grids
            if not targets:
                continue
            derivative = _difference(components[a], dim)
            for n, b in enumerate(targets):
                term = derivative if n == len(targets) - 1 else derivative.clone()
                term.mul_(float(inverse[c, b]))
                jac[a][b] = term if jac[a][b] is None else jac[a][b].add_(term)
        for b in range(3):
            jac[a][b] = torch.zeros_like(components[0]) if jac[a][b] is None else jac[a][b]
        jac[a][a].add_(1.0)
    (j00, j01, j02), (j10, j11, j12), (j20, j21, j22) = jac
    minor = torch.mul(j11, j22).addcmul_(j12, j21, value=-1)
    det = minor.mul_(j00)
    minor = torch.mul(j10, j22).addcmul_(j12, j20, value=-1)
    det.addcmul_(j01, minor, value=-1)
    torch.mul(j10, j21, out=minor).addcmul_(j11, j20, value=-1)
    return det.addcmul_(j02, minor)


def _difference(volume: "torch.Tensor", dim: int) -> "torch.Tensor":
    """numpy.gradient of a torch volume along ``dim`` (central inside, one-sided at the ends)."""
    import torch

    out = volume.new_empty(volume.shape)
    n = volume.shape[dim]
    if n < 2:
        return out.zero_()
    torch.sub(volume.narrow(dim, 2, n - 2), volume.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    out.narrow(dim, 1, n - 2).mul_(0.5)
    torch.sub(volume.narrow(dim, 1, 1), volume.narrow(dim, 0, 1), out=out.narrow(dim, 0, 1))
    torch.sub(volume.narrow(dim, n - 1, 1), volume.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1, 1))
    return out


def folding_percent(det: np.ndarray, mask: np.ndarray) -> float:
    """Percentage of voxels in ``mask`` whose Jacobian determinant is <= 0."""
    n = int(mask.sum())
    return float(100.0 * ((det <= 0) & mask).sum() / n) if n else float("nan")


def std_log_jacobian(det: np.ndarray, mask: np.ndarray) -> float:
    """Standard deviation of log det J inside ``mask`` (determinants clipped at 1e-9)."""
    values = det[mask]
    return float(np.log(np.clip(values, 1e-9, None)).std()) if values.size else float("nan")
