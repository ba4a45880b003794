"""The command-line process's memory policy (``cli.keep_freed_memory``), checked by the kernel's count of
the process's resident pages."""

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import os
import sys
import numpy as np
from SlicerVoxelMorphLib.cli import keep_freed_memory

def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
block = np.ones(256 * 2**20, np.uint8)  # touched: 256 MB resident
peak = resident_mb()
del block
print(applied, peak - resident_mb())
"""


def _freed_mb(mode: str) -> tuple[str, float]:
    package = Path(__file__).resolve().parents[1] / "SlicerVoxelMorph"
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(package), "PATH": ""})
    assert done.returncode == 0, done.stderr
    applied, freed = done.stdout.split()
    return applied, float(freed)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc")
def test_freed_arrays_stay_with_the_process_for_reuse():
    applied, freed = _freed_mb("keep")
    if applied != "True":
        pytest.skip("not glibc")
    assert freed < 16  # the 256 MB stay resident, ready for the next array
    assert _freed_mb("default")[1] > 240  # glibc's default unmaps a block that large at once
