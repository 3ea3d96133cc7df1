"""Devices and dtypes: the decomposition is exact on every device parts runs on, in every dtype it loads,
and the hot path neither strays from the model's device nor waits on it.

The CUDA cases run where a GPU is present (benchmarks/gpu_check.sh runs this file there) and are skipped,
with the reason, elsewhere. What a CPU can check runs everywhere: bfloat16 and float16 weights through
the whole pipeline, and an audit of every tensor parts creates.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from parts.cli import main
from parts.decomposition.decompose import Decomposer
from parts.decomposition.exactness import reconstruction_tolerance, relative_reconstruction_error
from parts.decomposition.runs import DecompositionRun
from parts.experiments.runner import run_dir
from parts.model.loading import from_hf
from tests.conftest import FAMILIES, make_hf_model
from tests.prompts import SENTIMENT_PROMPTS

PARTS_ROOT = Path(__file__).resolve().parents[1] / "parts"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="no CUDA device here: the GPU checks run on a GPU machine (benchmarks/gpu_check.sh)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROMPTS = SENTIMENT_PROMPTS


def label_ids(model) -> list[int]:
    return [model.tokenizer.convert_tokens_to_ids(w) for w in ("negative", "positive", "yes")]


def own_logits(hf_model, tokenizer, prompt: str, ids: list[int]) -> torch.Tensor:
    """The Hugging Face model's own label-word logits at the last token, one unpadded prompt at a time."""
    device = next(hf_model.parameters()).device
    tokens = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
    with torch.no_grad():
        return hf_model(tokens).logits[0, -1, ids].float().cpu()


# -- exactness on every device and dtype -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("device", DEVICES)
def test_decomposition_is_exact_on_every_device_and_dtype(tokenizer, device, dtype, family):
    """float32: components + remainder equal the model's own logits to 1e-4. bfloat16 / float16 weights,
    read out in float32: within the dtype's reconstruction tolerance (parts.decomposition.exactness) of the
    logit scale, and the same components as the float32 model on the CPU to that tolerance."""
    reference_model = from_hf(make_hf_model(family, seed=1), tokenizer, f"tiny-{family}")
    reference = Decomposer(reference_model, label_ids(reference_model))(PROMPTS, batch_size=2, progress=False)
    model = from_hf(make_hf_model(family, seed=1).to(device=device, dtype=dtype), tokenizer, f"tiny-{family}-{dtype}")
    # The bridge's tokenizer (it may prepend BOS), as the decomposer's.
    own = torch.stack([own_logits(model.original_model, model.tokenizer, p, label_ids(model)) for p in PROMPTS])
    out = Decomposer(model, label_ids(model))(PROMPTS, batch_size=2, prefix_reuse=True, progress=False)

    assert out.component_logits.dtype == out.remainder.dtype == out.model_logits.dtype == torch.float32
    assert out.component_logits.device.type == "cpu"  # results come back to the host, once
    total = out.component_logits.sum(1) + out.remainder
    scale = own.abs().amax(-1, keepdim=True).clamp(min=1.0)
    if dtype == torch.float32:
        assert (total - own).abs().max() < 1e-4
        assert (out.model_logits - own).abs().max() < 1e-4
        assert (out.component_logits - reference.component_logits).abs().max() < 1e-4
        return
    tolerance = reconstruction_tolerance(dtype)
    relative = relative_reconstruction_error(out.component_logits, out.remainder, out.model_logits)
    assert relative.max() <= tolerance
    # The model's own logits in this dtype, batched with padding and a reused prefix, against one prompt at a time.
    assert ((out.model_logits - own).abs() / scale).max() <= tolerance
    # The low-precision model really ran (its logits differ from float32's), yet splits the same way.
    assert (out.model_logits - reference.model_logits).abs().max() > 0
    component_scale = reference.component_logits.abs().max().clamp(min=1.0)
    assert (out.component_logits - reference.component_logits).abs().max() <= tolerance * component_scale


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("device", DEVICES)
def test_engines_agree_on_every_device(tokenizer, device, family):
    """The HF engine and TransformerLens's run_with_cache give the same components on this device as on the CPU."""
    model = from_hf(make_hf_model(family, seed=2).to(device), tokenizer, f"tiny-{family}")
    ids = label_ids(model)
    fast = Decomposer(model, ids, "hf")(PROMPTS, batch_size=3, progress=False)
    reference = Decomposer(model, ids, "bridge")(PROMPTS, batch_size=3, progress=False)
    for name in ("component_logits", "remainder", "model_logits"):
        assert (getattr(fast, name) - getattr(reference, name)).abs().max() < 1e-4, name


# -- the hot path does not wait on the GPU ------------------------------------------------------


def synchronisations(decomposer: Decomposer, prompts: list[str]) -> Counter[str]:
    """Where each synchronising call happened (file:line of the Python caller), one prompt per batch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            decomposer(prompts, batch_size=1, prefix_reuse=True, progress=False)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).name}:{w.lineno}" if PARTS_ROOT in Path(w.filename).resolve().parents
                   else f"(outside parts) {Path(w.filename).name}:{w.lineno}"
                   for w in caught if "synchroniz" in str(w.message).lower())


@CUDA
@pytest.mark.parametrize("family", FAMILIES)
def test_no_synchronising_host_copy_per_batch_on_cuda(tokenizer, family):
    """torch's sync debug mode flags every call that makes the host wait for the GPU (a device-to-host copy,
    `.item()`, a pageable host-to-device copy...). parts may wait a fixed number of times per call (the
    results come back once), never once per batch: 2 and 6 batches must synchronise equally often in parts'
    own code. Synchronisations inside transformers or torch are listed in the message, not counted."""
    model = from_hf(make_hf_model(family, seed=3).to("cuda"), tokenizer, f"tiny-{family}")
    decomposer = Decomposer(model, label_ids(model))
    decomposer(PROMPTS, batch_size=2, progress=False)  # warm-up: one-off set-up may synchronise
    few, many = synchronisations(decomposer, PROMPTS[:2]), synchronisations(decomposer, PROMPTS)
    ours = {k: v for k, v in many.items() if not k.startswith("(outside")}
    ours_few = {k: v for k, v in few.items() if not k.startswith("(outside")}
    assert ours == ours_few, f"parts synchronises per batch: 2 batches {dict(few)}, 6 batches {dict(many)}"


# -- every tensor parts creates is placed explicitly ------------------------------------------

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.randn, torch.rand, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.scalar_tensor}


class FactoryAudit(TorchFunctionMode):
    """Records every tensor factory called from parts' own code without an explicit `device=`: such a tensor
    lands on torch's default device, wherever the model is (a mismatch, or a silent host copy, on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: Counter[str] = Counter()
        self.placed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in FACTORIES:
            caller = sys._getframe(1)
            path = Path(caller.f_code.co_filename).resolve()
            if PARTS_ROOT in path.parents:
                if kwargs.get("device") is None:
                    self.unplaced[f"{path.relative_to(PARTS_ROOT.parent)}:{caller.f_lineno}"] += 1
                else:
                    self.placed += 1
        return func(*args, **kwargs)


def test_every_tensor_parts_creates_names_its_device(tmp_path, tiny_model_dir, tiny_task_file):
    """`parts evaluate` end to end (decomposition of test and training prompts with prefix reuse, content-free
    and L-shot prompts, CompRW, Calib+ and the calibrations, saving) under the audit."""
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0", "--limit", "6", "--labels", "8", "--shots", "2", "--out", str(tmp_path),
            "--device", "cpu", "--batch-size", "4"]
    with FactoryAudit() as audit:
        assert main(argv) == 0
    assert audit.placed > 0  # the audit saw parts create tensors
    assert not audit.unplaced, f"tensors created without device= (file:line: calls): {dict(audit.unplaced)}"


def test_the_audit_catches_a_tensor_without_a_device():
    from parts.experiments.runner import first_non_finite_component

    assert first_non_finite_component  # a parts module is loaded; now a parts-like frame creating a tensor:
    code = compile("import torch\nvalue = torch.zeros(3)\n", str(PARTS_ROOT / "fake_module.py"), "exec")
    with FactoryAudit() as audit:
        exec(code, {})
    assert audit.unplaced == Counter({"parts/fake_module.py:2": 1})


# -- bfloat16 and float16 weights through the whole pipeline on the CPU ----------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_weights_through_parts_evaluate(tmp_path, tiny_model_dir, tiny_task_file, dtype):
    """`parts evaluate --dtype` runs every method in half precision; each saved decomposition records its dtype,
    is float32, and sums to the model's logits within the dtype's tolerance (the loud check let it through)."""
    argv = ["evaluate", "--model", str(tiny_model_dir), "--tasks", str(tiny_task_file), "--templates", "1",
            "--seeds", "0", "--limit", "6", "--labels", "8", "--shots", "2", "--out", str(tmp_path),
            "--device", "cpu", "--dtype", dtype, "--batch-size", "4"]
    assert main(argv) == 0
    folders = [p.parent for p in tmp_path.rglob("summary.json")]
    assert {f.name.split("-")[3] for f in folders} == {"test", "train"}
    for folder in folders:
        run = DecompositionRun.load(folder)
        assert run.component_logits.dtype == torch.float32
        assert run.info["dtype"] == dtype
        relative = relative_reconstruction_error(run.component_logits, run.remainder, run.model_logits)
        assert 0 < relative.max() <= reconstruction_tolerance(dtype)
    assert run_dir  # folders are found by their files, whatever the variant suffix
