"""Atomic file output: a run that stops midway leaves no half-written file."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary name beside ``path`` (same extensions, so writers pick the same
    format); it is renamed to ``path`` when the block succeeds and removed when it fails."""
    path = Path(path)
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name.removesuffix(suffix)}.partial{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
