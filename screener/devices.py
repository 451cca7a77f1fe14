"""Where model inference runs: the configured ``device`` resolved to ``cpu`` or ``cuda``, with why.

One home for the choice: the protocols load their bundles on :func:`resolve_device`'s
device, training wraps it in ``torch.device``, and ``screener serve`` logs
:func:`inference_device`'s reason at start-up.
"""
from __future__ import annotations

import glob
from typing import Any

__all__ = ["inference_device", "resolve_device"]


def inference_device(setting: str) -> tuple[str, str]:
    """The device model inference will use for a ``device`` setting, and why.

    Parameters
    ----------
    setting : str
        The config key ``device``: ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    device : str
        ``"cpu"`` or ``"cuda"``.
    reason : str
        In words, e.g. ``device = auto: no /dev/nvidia* device is visible to this process
        (systemd PrivateDevices=yes hides them; see deploy/README.md)``.
    """
    if setting == "cpu":
        return "cpu", "device = cpu in the configuration"
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return "cpu", f"torch cannot be imported ({exc})"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return "cuda", (f"device = {setting}: CUDA GPU found ({name}, "
                        f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda})")
    if torch.version.cuda is None:
        why = "this torch build has no CUDA support (a CPU wheel): install a CUDA build"
    elif not glob.glob("/dev/nvidia[0-9]*"):
        why = ("no /dev/nvidia* device is visible to this process (systemd PrivateDevices=yes "
               "or a missing DeviceAllow hides them; see deploy/README.md, GPU)")
    else:
        why = "torch.cuda.is_available() is false (driver missing or too old for this torch?)"
    if setting == "cuda":
        return "cuda", f"device = cuda but CUDA is not usable: {why}; model jobs will fail"
    return "cpu", f"device = auto, running on the CPU: {why}"


def resolve_device(device: Any = "auto") -> str:
    """The torch device for the configured ``device``: ``"auto"`` -> ``"cuda"`` when available,
    else ``"cpu"``; other values unchanged (a ``torch.device`` as its string).

    Raises
    ------
    RuntimeError
        ``"cuda"`` requested with no usable CUDA GPU; the message says why
        (:func:`inference_device`) and which settings work.
    """
    device = str(device)
    if device != "auto" and not device.startswith("cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    # only a refusal needs the reason (the device probe runs on every model protocol's run)
    why = (inference_device("cuda")[1] if device == "cuda"
           else f"device {device!r} requested but no CUDA GPU is available")
    raise RuntimeError(f"{why}; use device = \"auto\" or \"cpu\"")
