"""Compute device choice: CUDA when available, otherwise CPU."""

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
