"""The runtime's check that the loss kernel asked for can run on the run's device (opdgraph.runtime.training).

A failure means loss.kernel = "triton" on a machine without CUDA or triton ends as a RuntimeError traceback at the
first loss (after the weights loaded) instead of a DeviceError that says what to set, or that "auto" / "torch" are
refused where they run.
"""

from __future__ import annotations

import pytest
import torch

import opdgraph.kernels.divergence as divergence
from opdgraph.errors import DeviceError
from opdgraph.runtime.training import _use_triton, check_loss_kernel


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_triton_on_cpu_is_a_device_error(device):
    """If this fails, a CPU run asked for the Triton loss crashes with a traceback instead of naming the fix."""
    with pytest.raises(DeviceError, match="loss.kernel = 'triton' needs a CUDA device, but this run is on cpu; "
                                          "set loss.kernel = 'auto' or 'torch'"):
        check_loss_kernel("triton", device)


def test_triton_without_triton_is_a_device_error(monkeypatch):
    """If this fails, a CUDA machine without triton gets a traceback at the first loss instead of a DeviceError."""
    monkeypatch.setattr(divergence, "triton_available", lambda: False)
    with pytest.raises(DeviceError, match="needs triton.*set step_loss.kernel = 'auto' or 'torch'"):
        check_loss_kernel("triton", "cuda", where="step_loss.kernel")


def test_the_loss_step_raises_the_same_device_error():
    """If this fails, the loss step itself (when startup did not check) still raises a plain RuntimeError."""
    with pytest.raises(DeviceError, match="set loss.kernel = 'auto' or 'torch'"):
        _use_triton("triton", torch.device("cpu"))


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_auto_and_torch_run_anywhere(kernel):
    """If this fails, the portable kernels are refused on CPU, or pick Triton where it cannot run."""
    check_loss_kernel(kernel, "cpu")
    assert _use_triton(kernel, torch.device("cpu")) is False
