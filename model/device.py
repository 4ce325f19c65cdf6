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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The torch dtype `name` stands for on `device`; auto: bfloat16 on a CUDA GPU that supports it, else
    float32 (a CPU's bfloat16 matrix products are emulated on most CPUs, and MPS's bfloat16 is partial)."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
