"""Model files: a self-describing checkpoint loadable with ``torch.load(weights_only=True)``."""

import hashlib
import json
import platform
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .errors import InputError
from .files import atomic_path
from .networks import VxmDense

FORMAT = "slicer-voxelmorph-model"
FORMAT_VERSION = 2  # 2: the hash also covers the architecture, spacing and normalisation
SEALED = ("config", "spacing_mm", "normalisation")  # what the network's output depends on besides weights
BUNDLED_DIR = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "synth_cerebellum"  # the file bundled/<name>.pt that --model bundled means
BUNDLED = BUNDLED_DIR / f"{DEFAULT_MODEL}.pt"
SAME_HEAD_MODEL = "same_head"  # the bundled model that --model bundled uses for two scans of one head


def versions() -> dict[str, str]:
    """Library versions recorded in model files and reports."""
    return {"slicer_voxelmorph": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
            "simpleitk": sitk.Version_VersionString(), "python": platform.python_version()}


def content_hash(state_dict: dict[str, torch.Tensor], sealed: dict | None = None) -> str:
    """SHA-256 over parameter names and float32 values, then ``sealed`` metadata as canonical JSON:
    identifies the model (weights, architecture, working spacing), not the file."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().cpu().float().contiguous().numpy().tobytes())
    if sealed is not None:
        digest.update(json.dumps(sealed, sort_keys=True).encode())
    return digest.hexdigest()


def _sealed(record: dict) -> dict | None:
    """The metadata a format-2 hash covers (format 1 hashed the weights only)."""
    return {key: record.get(key) for key in SEALED} if record.get("format_version", 1) >= 2 else None


def save_model(path: str | Path, net: VxmDense, spacing_mm: float, metadata: dict) -> str:
    """Save weights with their architecture, working grid and metadata; return the content hash."""
    state = {k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}  # whatever the layout
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": dict(net.config),
              "spacing_mm": float(spacing_mm), "normalisation": "percentile 0.5-99.5 to [0, 1]",
              "state_dict": state, "versions": versions(), **metadata}
    digest = record["sha256"] = content_hash(state, _sealed(record))
    with atomic_path(path) as tmp:
        torch.save(record, tmp)
    return digest


def read_model_file(path: str | Path) -> dict:
    """Load and check a model file's record; InputError for anything that is not such a model."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for foreign files, with long messages about its internals
        if not zipfile.is_zipfile(path):
            reason = "not a PyTorch file, or one damaged or truncated"
        elif "weights only" in str(exc).lower():
            reason = "it holds Python objects besides tensors and settings; they are never loaded, for safety"
        else:
            reason = "a PyTorch file, but damaged or truncated"
        raise InputError(f"{path} is not a SlicerVoxelMorph model file ({reason})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"{path} is not a SlicerVoxelMorph model file (no '{FORMAT}' record)")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise InputError(f"{path} needs a newer SlicerVoxelMorph (format {record['format_version']})")
    state = record.get("state_dict")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no network weights (no 'state_dict' of tensors)")
    if content_hash(state, _sealed(record)) != record.get("sha256"):
        raise InputError(f"{path} is corrupt: its weights or settings do not match their recorded hash")
    return record


def load_model(path: str | Path) -> tuple[VxmDense, dict]:
    """Network (eval mode, CPU) and its record from a model file."""
    record = read_model_file(path)
    try:
        net = VxmDense(**record["config"])
        net.load_state_dict(record["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{path}: weights do not fit the recorded architecture ({str(exc)[:120]})") from None
    return net.eval(), record


def bundled_names() -> list[str]:
    """Names of the bundled models (files bundled/<name>.pt)."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.pt"))


def same_head_model(model: str | Path | None) -> Path | None:
    """The network for two scans of one head that goes with a ``--model`` value: the bundled one for 'bundled'
    (a follow-up, a deformed copy: trained on such pairs only, its card), none for any other choice."""
    path = BUNDLED_DIR / f"{SAME_HEAD_MODEL}.pt"
    return path if str(model) == "bundled" and path.is_file() else None


def trained_on_one_head_pairs(record: dict) -> bool:
    """Whether a model file's network was trained on two scans of one head only (``train --rescan-fraction 1``)."""
    return record.get("training", {}).get("config", {}).get("rescan_fraction", 0) >= 1


def resolve_model(model: str | Path | None) -> Path | None:
    """Model path for a ``--model`` value: 'bundled' (the default model), the name of a bundled model
    (e.g. 'lpba40'), 'none', or a file."""
    if model is None or str(model) == "none":
        return None
    if str(model) == "bundled":
        if not BUNDLED.is_file():
            raise InputError("no bundled model is installed; use --model none or a model file")
        return BUNDLED
    if str(model) in bundled_names():
        return BUNDLED_DIR / f"{model}.pt"
    return Path(model)
