"""Compute device choice: CUDA when available, otherwise CPU; the precision the networks run in there."""

import torch

from .errors import InputError


def available_devices() -> list[str]:
    """Devices this machine can run on, e.g. ['cpu'] or ['cpu', 'cuda']."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA if present), 'cpu' or 'cuda' (an InputError when there is no GPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


def weight_layout(device: torch.device) -> torch.memory_format:
    """The memory layout of a network's weights on ``device``: channels-last on CPU, where oneDNN's 3D convolutions
    are faster so (synth_fine on 2 cores: inference 1.06 -> 0.94 s in a fresh process, its training recipe's steps
    8 % quicker; benchmarks/results/network_layout_2026-12-04), the default on CUDA (where it was not measured)."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


PRECISIONS = ("auto", "float32")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 convolutions in hardware (AVX512-BF16 or AMX; elsewhere oneDNN emulates
    bfloat16, slower than float32)."""
    detectors = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(detect() for detect in detectors if detect is not None)


def network_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The dtype the networks' convolutions run in under autocast on ``device`` at inference (None: float32, no
    autocast): bfloat16 with ``precision`` 'auto' on a CPU that has it natively, else float32 (on CUDA too, where
    it has not been measured yet). Velocities, sampling grids and integration stay float32
    (``networks.single_precision``, ``layers.at_least_single``), and so do the weights. On 2 cores with
    AVX512-BF16 synth_fine's velocity took 0.81 -> 0.43 s (README, Measured); inference was repeatable for every
    bundled network from 16 to 80 voxels a side (training: ``training_dtype``)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    native = device.type == "cpu" and cpu_has_native_bfloat16()
    return torch.bfloat16 if precision == "auto" and native else None


# a UNet's convolutions see its input's depth (first spatial size) halved by each of its poolings (networks.FEATURES)
UNET_POOLINGS = 4


def training_dtype(device: torch.device, depth: int, precision: str = "auto") -> torch.dtype | None:
    """The dtype of the networks' convolutions in a training step under autocast (None: float32) for a network input
    ``depth`` voxels deep: bfloat16 on CUDA (mixed precision, as before) and, with ``precision`` 'auto', on a CPU
    with native bfloat16 unless a UNet level is 2 voxels deep. There oneDNN's bfloat16 3D convolution backward
    pass returns garbage (values of 1e37, NaN; the forward pass is exact), whatever the other sizes; with depths of
    1 and 3 to 8 it was repeatable. A same_head training step on LPBA40 (80 voxels deep): 0.99 -> 0.70 s."""
    inference = network_dtype(device, precision)  # the CPU's rule (and the check of ``precision``)
    if device.type == "cuda":
        return torch.bfloat16
    return None if 2 in [depth // 2**level for level in range(UNET_POOLINGS + 1)] else inference


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast of the networks' convolutions to ``dtype`` on ``device``; off for None (float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
