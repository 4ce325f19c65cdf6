"""Which torch device a name stands for: one rule for training and serving."""

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)


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


def nvml_capabilities():
    """Every NVIDIA GPU's compute capability (major, minor), in NVML's order (PCI bus order), or None where NVML
    (the driver's libnvidia-ml) cannot say. NVML, not torch.cuda: get_device_capability and is_bf16_supported
    run torch.cuda._lazy_init, which initialises CUDA in this process, and the server's parent process only
    picks the dtype for its engine processes (torch itself counts devices through NVML to avoid that)."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
    except (OSError, AttributeError):  # no NVIDIA driver here, or one without these calls
        return None
    try:
        count, caps = ctypes.c_uint(), []
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        for i in range(count.value):
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            caps.append((major.value, minor.value))
        return caps or None
    except AttributeError:
        return None
    finally:
        nvml.nvmlShutdown()


def cuda_capability(device):
    """The compute capability of CUDA device `device` (cuda, cuda:N), or None where NVML cannot say."""
    caps = nvml_capabilities()
    if not caps or len(set(caps)) == 1:
        return caps[0] if caps else None
    # GPUs that differ: CUDA numbers them fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, and only then is
    # cuda:N (after CUDA_VISIBLE_DEVICES) NVML's device N; otherwise the slowest GPU decides
    if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            order = [int(v) for v in visible.split(",")] if visible else range(len(caps))
            return caps[order[torch.device(device).index or 0]]
        except (ValueError, IndexError):  # GPU UUIDs or MIG names, or an index past the list
            pass
    return min(caps)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name, device):
    """The torch dtype `name` stands for on `device`. auto: bfloat16 on a CUDA GPU of compute capability 8.0 or
    more (Ampere on), where it is native, else float32: older GPUs (T4, V100) emulate bfloat16 slowly, a CPU's
    bfloat16 matrix products are emulated on most CPUs, and MPS's bfloat16 is partial. Decided without
    initialising CUDA in this process (nvml_capabilities)."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        if torch.version.hip:  # ROCm's GPUs have bfloat16 (as torch.cuda.is_bf16_supported says), and no NVML
            return torch.bfloat16
        capability = cuda_capability(device)
        if capability is None:
            log.warning(
                "auto dtype: cannot read %s's compute capability through NVML (libnvidia-ml.so.1); float32. "
                "On a GPU of compute capability 8.0 or more, set QUILL_DTYPE=bfloat16 (train: --dtype bfloat16)",
                device,
            )
        return torch.bfloat16 if capability is not None and capability >= (8, 0) else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def poisoned(error):
    """Whether `error` leaves the device unusable by this process (a CUDA device-side assert, an illegal address):
    every later CUDA call fails too. Running out of memory is not such an error."""
    return not isinstance(error, torch.OutOfMemoryError) and "CUDA error" in str(error)
