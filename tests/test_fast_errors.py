"""Mistakes answered first, in one line, before the model loads (issue 28, section 3).

The wall times these checks save are benchmark rows (benchmarks/bench_cli.py, benchmarks/results.md),
not asserted here; what is asserted is the message, the exit status, and that torch and transformers
were not imported where the check does not need them.
"""

from __future__ import annotations

import pytest
import torch

from parts.errors import PartsError
from parts.model import preflight
from parts.model.preflight import check_device
from tests.test_fast_cli import probe

CPU_ONLY_TORCH = preflight._without_accelerators(preflight.torch_build())


# -- the device ---------------------------------------------------------------------------------


def test_the_torch_build_is_read_as_torch_reports_it():
    build = preflight.torch_build()
    assert build["__version__"] == torch.__version__
    assert [build.get(field) for field in ("cuda", "hip")] == [torch.version.cuda, torch.version.hip]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [d for d in preflight.available_devices() if d.startswith("cuda")] == [f"cuda:{i}" for i in range(gpus)]


def test_an_unknown_device_is_one_line_naming_the_devices_here():
    result = probe(["decompose", "--task", "sst2", "--out", "x", "--device", "gpu"])
    assert result["code"] == 2, result
    assert result["err"].splitlines() == [
        "parts decompose: error: unknown device 'gpu': use cpu, cuda, cuda:N (one GPU), mps, xpu or auto "
        f"(spread over every GPU); this machine has {preflight._one_of(preflight.available_devices())}"]
    if CPU_ONLY_TORCH:
        assert result["heavy"] == [], result


@pytest.mark.skipif(not CPU_ONLY_TORCH, reason="this torch is built with an accelerator: the case needs a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_refused_before_torch_is_imported():
    result = probe(["sweep", "--tasks", "sst2", "--out", "x", "--device", "cuda"])
    assert result["code"] == 2 and result["heavy"] == [], result
    assert result["err"].splitlines() == [
        f"parts sweep: error: device 'cuda' is not available here (this torch {torch.__version__} is built without "
        "CUDA: install a CUDA build of torch for a GPU): use cpu"]


def test_the_devices_of_a_gpu_machine(monkeypatch):
    """What a machine with two GPUs accepts and refuses (its device list stood in for)."""
    monkeypatch.setattr(preflight, "torch_build", lambda: {"__version__": "2.13.0+cu128", "cuda": "12.8"})
    monkeypatch.setattr(preflight, "available_devices", lambda: ["cpu", "cuda:0", "cuda:1", "auto"])
    for device in ("cpu", "cuda", "cuda:1", torch.device("cuda", 0), "auto", None):
        check_device(device)
    with pytest.raises(PartsError, match=r"^device 'cuda:2' is not available here: use cpu, cuda:0, cuda:1 or auto$"):
        check_device("cuda:2")
    with pytest.raises(PartsError, match=r"^device 'mps' is not available here: use cpu, cuda:0, cuda:1 or auto$"):
        check_device("mps")
    with pytest.raises(PartsError, match=r"^unknown device 'cuda:one': use cpu, cuda, cuda:N"):
        check_device("cuda:one")
    monkeypatch.setattr(preflight, "available_devices", lambda: ["cpu"])
    with pytest.raises(PartsError, match=r"^device 'cuda' is not available here \(torch sees no CUDA GPU: check the "
                                         r"driver and CUDA_VISIBLE_DEVICES\): use cpu$"):
        check_device("cuda")
    check_device("cuda:3", here=False)  # a Ray driver names its workers' device: the name is checked, not the GPU


def test_the_library_checks_the_device_before_loading():
    from parts.experiments.options import RunOptions
    from parts.model.loading import load_model

    with pytest.raises(PartsError, match="^unknown device 'gpu'"):
        RunOptions(device="gpu")
    with pytest.raises(PartsError, match="^unknown device 'gpu'"):
        load_model("/nonexistent-model-folder", device="gpu")  # the device is refused before the folder is read
