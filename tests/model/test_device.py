"""QUILL_DTYPE=auto (and train's --dtype auto) on CUDA: bfloat16 where the GPU has it natively, decided from the
chosen device's compute capability through NVML, never by initialising CUDA in this process."""

import ctypes
import logging
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from model import device as device_module
from model.device import cuda_capability, nvml_capabilities, pick_dtype
from train.loop import make_autocast


@pytest.fixture
def cuda_init_calls(monkeypatch):
    """torch.cuda's initialisation, recorded (and refused) instead of run; torch.cuda claims a GPU is there."""
    calls = []

    def lazy_init():
        calls.append("torch.cuda._lazy_init")
        raise AssertionError("CUDA initialised")

    monkeypatch.setattr(torch.cuda, "_lazy_init", lazy_init)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    return calls


def gpus(monkeypatch, *caps):
    monkeypatch.setattr(device_module, "nvml_capabilities", lambda: list(caps) if caps else None)


@pytest.mark.parametrize(
    ("capability", "dtype"),
    [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
    ids=["V100", "T4", "A100", "H100"],
)
def test_auto_on_cuda_is_bfloat16_from_capability_8_0_without_initialising_cuda(
    monkeypatch, cuda_init_calls, capability, dtype
):
    gpus(monkeypatch, capability)
    assert pick_dtype("auto", "cuda") is dtype
    assert pick_dtype("auto", "cuda:0") is dtype
    assert cuda_init_calls == [] and not torch.cuda.is_initialized()


def test_auto_is_float32_and_says_how_to_choose_when_nvml_cannot_tell(monkeypatch, cuda_init_calls, caplog):
    gpus(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="model.device"):
        assert pick_dtype("auto", "cuda") is torch.float32
    assert "QUILL_DTYPE=bfloat16" in caplog.text and "--dtype bfloat16" in caplog.text
    assert cuda_init_calls == []


def test_auto_off_cuda_and_named_dtypes_ask_nothing_of_the_gpu(monkeypatch, cuda_init_calls):
    monkeypatch.setattr(device_module, "nvml_capabilities", lambda: pytest.fail("NVML asked"))
    assert pick_dtype("auto", "cpu") is torch.float32 and pick_dtype("auto", "mps") is torch.float32
    assert pick_dtype("bfloat16", "cuda") is torch.bfloat16 and pick_dtype("float32", "cuda") is torch.float32
    assert cuda_init_calls == []


def test_the_chosen_gpu_decides_where_cuda_numbers_gpus_as_nvml_does(monkeypatch, cuda_init_calls):
    gpus(monkeypatch, (7, 5), (8, 0), (9, 0))
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [cuda_capability(f"cuda:{i}") for i in range(3)] == [(7, 5), (8, 0), (9, 0)]
    assert pick_dtype("auto", "cuda") is torch.float32 and pick_dtype("auto", "cuda:1") is torch.bfloat16
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert cuda_capability("cuda") == (9, 0) and cuda_capability("cuda:1") == (7, 5)
    assert cuda_init_calls == []


def test_the_slowest_gpu_decides_where_cuda_may_number_them_otherwise(monkeypatch, cuda_init_calls):
    gpus(monkeypatch, (8, 0), (7, 5))
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)  # CUDA's default: fastest first
    assert pick_dtype("auto", "cuda:0") is torch.float32 and pick_dtype("auto", "cuda:1") is torch.float32
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-4b1c")  # a UUID: not mapped here
    assert cuda_capability("cuda") == (7, 5)
    gpus(monkeypatch, (9, 0), (9, 0))
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    assert pick_dtype("auto", "cuda:1") is torch.bfloat16  # GPUs alike: the order does not matter
    assert cuda_init_calls == []


class FakeNvml:
    """libnvidia-ml's calls that nvml_capabilities makes, over a list of capabilities; 0 is NVML_SUCCESS."""

    def __init__(self, caps, fail=None, missing=None):
        self.caps, self.fail, self.missing, self.calls = caps, fail, missing, []

    def __getattr__(self, name):
        if name == self.missing:
            raise AttributeError(f"undefined symbol: {name}")

        def call(*args):
            self.calls.append(name)
            if name == self.fail:
                return 999
            if name == "nvmlDeviceGetCount_v2":
                args[0]._obj.value = len(self.caps)
            elif name == "nvmlDeviceGetHandleByIndex_v2":
                args[1]._obj.value = 1000 + args[0]
            elif name == "nvmlDeviceGetCudaComputeCapability":
                args[1]._obj.value, args[2]._obj.value = self.caps[args[0].value - 1000]
            return 0

        return call


def test_nvml_capabilities_reads_every_gpu_from_the_drivers_library_and_shuts_nvml_down(monkeypatch):
    nvml = FakeNvml([(8, 6), (7, 5)])
    monkeypatch.setattr(ctypes, "CDLL", lambda name: nvml if name == "libnvidia-ml.so.1" else pytest.fail(name))
    assert nvml_capabilities() == [(8, 6), (7, 5)]
    assert nvml.calls[0] == "nvmlInit_v2" and nvml.calls[-1] == "nvmlShutdown"
    nvml = FakeNvml([(8, 6)], fail="nvmlDeviceGetCudaComputeCapability")
    assert nvml_capabilities() is None and nvml.calls[-1] == "nvmlShutdown"
    nvml = FakeNvml([(8, 6)], fail="nvmlInit_v2")
    assert nvml_capabilities() is None and nvml.calls == ["nvmlInit_v2"]
    nvml = FakeNvml([(8, 6)], missing="nvmlDeviceGetCudaComputeCapability")  # a driver without the call
    assert nvml_capabilities() is None and nvml.calls[-1] == "nvmlShutdown"


def test_nvml_capabilities_is_none_without_the_nvidia_driver(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert nvml_capabilities() is None


def test_training_autocasts_to_bfloat16_on_cuda_only_where_it_is_native(monkeypatch):
    # (the trainer's own process trains on the GPU, so torch.autocast may initialise CUDA there, as it does)
    gpus(monkeypatch, (8, 0))
    with pytest.warns(UserWarning, match="CUDA"):  # this CPU build of torch disables the CUDA autocast it makes
        autocast = make_autocast("auto", "cuda")
    assert isinstance(autocast, torch.autocast) and autocast.fast_dtype is torch.bfloat16
    gpus(monkeypatch, (7, 5))
    assert not isinstance(make_autocast("auto", "cuda"), torch.autocast)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_auto_follows_the_devices_capability_and_leaves_cuda_uninitialised():
    code = (
        "import torch; from model.device import pick_dtype; dtype = pick_dtype('auto', 'cuda'); "
        "initialised = torch.cuda.is_initialized(); "
        "print(dtype is torch.bfloat16, initialised, torch.cuda.get_device_capability() >= (8, 0))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    bfloat16, initialised, native = out.stdout.split()
    assert initialised == "False" and bfloat16 == native
