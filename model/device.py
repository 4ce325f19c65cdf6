"""Which torch device a name stands for: one rule for training and serving."""

import torch


def mps_available():
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(name):
    """The device `name` stands for (auto: cuda, then mps, then cpu), checked to exist on this machine.

    A name this machine cannot use is a ValueError saying so, before any model is built on it.
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:N, mps)") from None
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= cuda_count:
        raise ValueError(f"device {name!r}: no such CUDA device on this machine (auto picks one)")
    if device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine (auto picks one)")
    return name
