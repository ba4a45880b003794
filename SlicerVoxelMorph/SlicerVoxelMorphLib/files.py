"""Atomic file output: a run that stops midway leaves no half-written file and no stale one."""

import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_OUTPUTS = ("warped.nii.gz", "displacement.nii.gz", "inverse_displacement.nii.gz", "jacobian.nii.gz",
               "warped_labels.nii.gz", "report.json", "report.png")


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


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a hidden staging folder of its own inside ``out`` (same file system, unique per run); when
    the block succeeds, every known output of an earlier run is removed from ``out`` and the staged
    files move in, so the folder never mixes two runs. When it fails, the staging folder is removed,
    ``out`` keeps what it had, and an ``out`` this run created is removed again."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    succeeded = False
    try:
        yield stage
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
        for path in sorted(stage.iterdir()):
            path.replace(out / path.name)
        succeeded = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not succeeded:
            shutil.rmtree(out, ignore_errors=True)


class Background:
    """Run ``function(*args)`` in a thread; ``join`` waits, re-raises its exception, if any, and returns its result."""

    def __init__(self, function: Callable, *args) -> None:
        self.error: BaseException | None = None
        self.result = None

        def run() -> None:
            try:
                self.result = function(*args)
            except BaseException as exc:  # handed to the caller in join
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result
