"""Training on a GPU, checked by its logic here (no GPU): batches reach a CUDA device in one copy from pinned
memory that does not block, and under torchrun the model is wrapped for DDP before it is compiled."""

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_gpt

from train.data import TokenFile, get_batch
from train.loop import stepped_model


@pytest.fixture
def copies(monkeypatch):
    """Tensor.pin_memory and Tensor.to recorded (this CPU build of torch has neither pinned memory nor CUDA):
    each returns the tensor itself, so the batch's values are still checked."""
    calls = []

    def pin_memory(self):
        calls.append(("pin_memory", tuple(self.shape)))
        return self

    def to(self, device, non_blocking=False):
        calls.append(("to", tuple(self.shape), str(device), non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_a_batch_for_cuda_is_copied_once_from_pinned_memory_without_blocking(copies):
    data = torch.arange(1000)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(3), "cuda:1")
    # the (B, T+1) windows pinned and sent in one copy that does not wait; x and y are views of it made there
    assert copies[:2] == [("pin_memory", (4, 17)), ("to", (4, 17), "cuda:1", True)]
    assert all(not call[-1] for call in copies[2:])  # x.to, y.to: already there
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones(4, 16, dtype=x.dtype))


def test_a_batch_from_a_prepared_file_for_cuda_is_pinned_too(copies, tmp_path):
    (tmp_path / "train.bin").write_bytes(torch.arange(500, dtype=torch.int32).numpy().tobytes())
    get_batch(TokenFile(tmp_path / "train.bin", "int32", 500), 2, 8, torch.Generator().manual_seed(0), "cuda")
    assert copies[:2] == [("pin_memory", (2, 9)), ("to", (2, 9), "cuda", True)]


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_a_batch_for_another_device_is_copied_as_before(copies, device):
    get_batch(torch.arange(1000), 4, 16, torch.Generator().manual_seed(3), device)
    assert copies == [("to", (4, 16), device, False), ("to", (4, 16), device, False)]


@pytest.fixture
def order(monkeypatch):
    """torch.compile and DDP recorded, each wrapping what it is given."""
    calls = []

    def compile(model):
        calls.append(("compile", model))
        return SimpleNamespace(compiled=model)

    def ddp(model, device_ids=None):
        calls.append(("ddp", model, device_ids))
        return SimpleNamespace(ddp=model)

    monkeypatch.setattr(torch, "compile", compile)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", ddp)
    return calls


def test_under_torchrun_the_model_is_wrapped_for_ddp_then_compiled(order):
    model = tiny_gpt()
    stepped = stepped_model(model, SimpleNamespace(compile=True), "cuda:1", 2)
    assert [call[0] for call in order] == ["ddp", "compile"]
    assert order[0][1:] == (model, ["cuda:1"])
    assert stepped.compiled.ddp is model  # the compiled module is the DDP wrapper around the raw model


def test_alone_the_model_is_compiled_or_left_as_it_is(order):
    model = tiny_gpt()
    assert stepped_model(model, SimpleNamespace(compile=True), "cpu", 1).compiled is model
    assert stepped_model(model, SimpleNamespace(compile=False), "cpu", 1) is model
    assert [call[0] for call in order] == ["compile"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch importing DDP
def test_a_compiled_ddp_model_still_turns_the_gradient_sync_off_for_accumulation(tmp_path):
    # real DDP (a gloo group of one) and a real torch.compile, which compiles nothing until it is called
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        stepped = stepped_model(tiny_gpt(), SimpleNamespace(compile=True), "cpu", 2)
        ddp = stepped._orig_mod
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        with stepped.no_sync():  # what train_step does for every micro-batch but the last
            assert not ddp.require_backward_grad_sync
        assert ddp.require_backward_grad_sync
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_batch_arrives_whole_on_the_device():
    data = torch.arange(5000) % 97
    x, y = get_batch(data, 8, 32, torch.Generator().manual_seed(5), "cuda")
    cpu_x, cpu_y = get_batch(data, 8, 32, torch.Generator().manual_seed(5), "cpu")
    assert x.is_cuda and y.is_cuda and x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x.cpu(), cpu_x) and torch.equal(y.cpu(), cpu_y)
