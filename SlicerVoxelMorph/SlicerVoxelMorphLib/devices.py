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
