"""A plan before a long run (`--dry-run`): what a command would forward, hold in memory, write and take, from the
model's config and tokenizer alone (no weights load).

The counting follows the decomposition step for step (`parts.decomposition.decompose`): the same prompts are
built and tokenised, the shared prefix is run once (`Decomposer.shared_prefix_length`, off past a sliding
window), the suffixes run longest first in batches of the size `auto` would choose (`planned_batch_size`, from the
memory left once the weights are in), each batch padded to its longest prompt, and the one full-prompt check that
prefix reuse is exact runs when a call pads more than any before it on the same model (`VERIFIED_PADDING`).
What is already on disk, made as asked (the commands' own reuse checks), is counted as done and not forwarded.

- `ModelShape`: the sizes a plan needs, from a Hugging Face config (parameters counted on the meta device);
  `NAMED_SHAPES` holds configs built in code (a Llama-2-7B or Mistral-7B shape) for planning without the hub.
- `check_fits`: refuse a model or batch that will not fit in memory before anything loads, naming the estimate
  and the `--batch-size`, `--dtype` or `--device` that would fit (`benchmarks/scale_check.py` calls it too).
- `DEVICES`: recorded rates for `--assume NAME`; `probe_rate`: a few-second probe of this device (one block).
- `Plan`: the settings, forward calls and files; `Plan.describe()` is what `--dry-run` prints.

Time is a cost model, not a measurement: the FLOPs of every forward (linear layers at the device's block rate,
attention's query-key pairs at `ATTENTION_EFFICIENCY` of it, from this project's CPU profile in
benchmarks/results.md), plus a fixed cost per batch, per call and per model load. The rate is probed here (one
random block of the model's width, a few seconds: other processes on the cores slow it as they slow the run) or
recorded for a named device.
"""

from __future__ import annotations

import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parts.components import component_names
from parts.data.prompts import LABEL_BUDGET, build_prompts, label_token_ids, many_shot_order
from parts.data.tasks import load_split
from parts.decomposition.decompose import (
    ESTIMATE_MARGIN,
    MEMORY_FRACTION,
    Decomposer,
    free_memory_bytes,
    planned_batch_size,
    prompt_memory_bytes,
)
from parts.decomposition.fingerprint import digest
from parts.decomposition.runs import FINAL_RESIDUAL, PROMPTS, SUMMARY, TENSORS, Decomposition, DecompositionRun
from parts.errors import PartsError
from parts.experiments.evaluate import NO_RESIDUAL, RESULTS_CSV, evaluation_table_path, many_shot_prompts, setting_fingerprint
from parts.experiments.results import (
    FINGERPRINTS,
    ORACLE_NOTE,
    TRANSFER_CSV,
    merge_results,
    read_results,
    result_row,
    results_frame,
)
from parts.experiments.runner import expected_fingerprint, model_label, model_slug, reusable_run, run_dir, transfer_run_dir
from parts.experiments.transfer import (
    SIDE_METHODS,
    TARGET_ONLY_METHODS,
    transfer_name,
    transfer_outputs,
    transfer_prompts,
)
from parts.methods import method_labels
from parts.model.loading import DTYPES, check_local_folder
from parts.model.locations import EMBEDDED_ALIASES, files_on_disk, resolve_model_name
from parts.reweighting.calibration import content_free_prompts
from parts.reweighting.reweight import weights_file

GIB = 1024**3

# Cost model (see the module docstring): the probed block rate counts a forward's linear layers fully; attention
# over a long cached prefix runs at a lower share of it (benchmarks/results.md: 1.5 us per query-key pair over the
# embedded model's 30 layers, 46 GFLOP/s a core, against 73 in the linear layers); fixed costs in seconds.
LINEAR_EFFICIENCY = 1.0
ATTENTION_EFFICIENCY = 0.6
SECONDS_PER_BATCH_LAYER = 0.0012  # hooks, cache copies and Python per layer per batch (CPU profile)
SECONDS_PER_CALL = 0.3  # tokenising, sorting, the readout, the reconstruction check, saving
SECONDS_PER_WEIGHT_BYTE = 1 / 0.4e9  # loading the weights (a converted checkpoint: ~0.4 GB/s here)


@dataclass(frozen=True)
class Device:
    """A device a plan can assume: its memory and its dense matmul rate (FLOP/s) per dtype."""

    name: str
    kind: str  # "cpu" or "cuda": which batch-size cap and memory share apply
    memory_bytes: int
    rates: dict[str, float]
    source: str  # where the numbers come from

    def rate(self, dtype: str) -> float:
        """Its rate in `dtype` (float32's where none is recorded)."""
        return self.rates.get(dtype, self.rates["float32"])


# Forward rates (FLOP/s of a transformer block, as `probe_rate` measures them). The CPU's: this project's 2-core VM
# idle, 73 GFLOP/s a core in the linear layers of a forward (benchmarks/results.md; bf16 and fp16 have no fast path
# there). The GPUs': half their dense matmul rate (an H200's ~790 TFLOP/s bf16 measured on a lent machine, the
# others' vendor figures; float32 without TF32), for a forward's smaller operations: not measured by parts.
DEVICES = {
    "cpu-2core": Device("cpu-2core", "cpu", 24 * GIB, {"float32": 146e9, "bfloat16": 40e9, "float16": 20e9},
                        "recorded: this project's 2-core VM, idle"),
    "cpu-1core": Device("cpu-1core", "cpu", 24 * GIB, {"float32": 73e9, "bfloat16": 20e9, "float16": 10e9},
                        "recorded: one core of this project's VM"),
    "h200": Device("h200", "cuda", 139 * GIB, {"float32": 33e12, "bfloat16": 395e12, "float16": 395e12},
                   "recorded: H200 141 GB, half the measured bf16 matmul rate"),
    "h100": Device("h100", "cuda", 79 * GIB, {"float32": 33e12, "bfloat16": 395e12, "float16": 395e12},
                   "vendor: H100 80 GB SXM, half the dense rate; not measured"),
    "a100": Device("a100", "cuda", 79 * GIB, {"float32": 10e12, "bfloat16": 156e12, "float16": 156e12},
                   "vendor: A100 80 GB, half the dense rate; not measured"),
    "a100-40gb": Device("a100-40gb", "cuda", 39 * GIB, {"float32": 10e12, "bfloat16": 156e12, "float16": 156e12},
                        "vendor: A100 40 GB, half the dense rate; not measured"),
    "l4": Device("l4", "cuda", 22 * GIB, {"float32": 15e12, "bfloat16": 60e12, "float16": 60e12},
                 "vendor: L4 24 GB, half the dense rate; not measured"),
}


def assumed_device(name: str) -> Device:
    """The recorded device `--assume NAME` names; a one-line error listing the known ones otherwise."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise PartsError(f"unknown device {name!r} for --assume: use one of {', '.join(DEVICES)}")
    return DEVICES[key]


# -- the model's shape -------------------------------------------------------------------------------------------
# Configs built in code, for planning (and `benchmarks/scale_check.py`) without the hub: Hugging Face config
# class name and its keyword arguments.
NAMED_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("LlamaConfig", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                                   "max_position_embeddings": 4096, "tie_word_embeddings": False}),
    "mistral-7b": ("MistralConfig", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                                     "max_position_embeddings": 32768, "sliding_window": None,
                                     "tie_word_embeddings": False}),
    "llama-3-8b": ("LlamaConfig", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                                   "max_position_embeddings": 8192, "tie_word_embeddings": False}),
}


def named_config(name: str) -> Any:
    """The Hugging Face config of a named shape (`NAMED_SHAPES`); a one-line error listing them otherwise."""
    if name not in NAMED_SHAPES:
        raise PartsError(f"unknown model shape {name!r}: use one of {', '.join(NAMED_SHAPES)}")
    import transformers

    class_name, kwargs = NAMED_SHAPES[name]
    return getattr(transformers, class_name)(**kwargs)


@dataclass(frozen=True)
class ModelShape:
    """What a plan needs to know about a model: its sizes (TransformerLens's names, as `prompt_memory_bytes` reads
    them), its parameters (all, and those a token passes through in the blocks) and its sliding window."""

    name: str
    n_layers: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    parameters: int
    block_parameters: int  # per token: the blocks' weights, a mixture of experts' counted for the experts used
    sliding_window: int | None = None

    @property
    def components(self) -> int:
        """Heads and MLPs: one component each (experts kept whole)."""
        return self.n_layers * (self.n_heads + 1)

    def weights_bytes(self, element_bytes: int) -> int:
        """Memory of the weights at `element_bytes` a parameter."""
        return self.parameters * element_bytes

    @classmethod
    def from_config(cls, config: Any, name: str) -> ModelShape:
        """The shape of a Hugging Face config; parameters counted on a model built on the meta device (no memory)."""
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        outside = {id(model.get_input_embeddings().weight)}
        output = model.get_output_embeddings()
        if output is not None:
            outside.add(id(output.weight))
        n_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        used = getattr(config, "num_experts_per_tok", None) or n_experts
        block = 0.0
        for param_name, param in model.named_parameters():
            if id(param) in outside:
                continue
            share = used / n_experts if n_experts and ".experts." in param_name else 1.0
            block += param.numel() * share
        n_heads = int(config.num_attention_heads)
        d_head = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return cls(
            name=name, n_layers=int(config.num_hidden_layers), n_heads=n_heads,
            n_key_value_heads=int(getattr(config, "num_key_value_heads", None) or n_heads), d_head=d_head,
            d_model=int(config.hidden_size),
            d_mlp=int(getattr(config, "intermediate_size", None) or getattr(config, "moe_intermediate_size", 0) or
                      4 * config.hidden_size),
            d_vocab=int(config.vocab_size), n_ctx=int(getattr(config, "max_position_embeddings", 2048)),
            parameters=int(total), block_parameters=int(block),
            sliding_window=window if isinstance(window, int) else None,
        )


def element_bytes(dtype: str) -> int:
    """Bytes a weight of `dtype` takes (a canonical name: float32, bfloat16, float16)."""
    return 4 if dtype == "float32" else 2


# -- memory ------------------------------------------------------------------------------------------------------
def batch_bytes(shape: ModelShape, longest_suffix: int, prefix: int, batch_size: int, dtype: str) -> int:
    """Estimated peak memory of one batch beyond the weights: `ESTIMATE_MARGIN` x `prompt_memory_bytes` per prompt
    (what `auto` plans with), plus the shared prefix's keys and values."""

    size = element_bytes(dtype)
    prefix_cache = 2 * shape.n_layers * shape.n_key_value_heads * shape.d_head * prefix * size
    return batch_size * ESTIMATE_MARGIN * prompt_memory_bytes(shape, longest_suffix, prefix, size) + prefix_cache


def free_bytes_here(device: str | None) -> tuple[str, int]:
    """(kind, memory free now) of the device a command would run on: a GPU's free memory, else available RAM."""
    import torch


    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    return resolved.type, free_memory_bytes(resolved)


def check_fits(shape: ModelShape, dtype: str, device_kind: str, free_bytes: int, longest_suffix: int = 1,
               prefix: int = 0, batch_size: int = 1, where: str = "this device") -> None:
    """Refuse, before anything loads, a model whose weights and one batch (`batch_size` prompts of `longest_suffix`
    new tokens after a `prefix`) will not fit in `free_bytes`. The rule is `auto`'s own (`planned_batch_size`):
    the weights must fit in the free memory, and the batch's prompts in the share of what is left that `auto`
    plans with (80% on a GPU, half on a CPU), so a batch size `auto` chose always passes unless not even one
    prompt fits. The one-line error gives the estimate and what would fit: a smaller `--batch-size`, `--dtype
    bfloat16`, or a recorded device (`DEVICES`) with the memory."""

    fraction = MEMORY_FRACTION.get(device_kind, 0.5)
    weights = shape.weights_bytes(element_bytes(dtype))
    budget = int(max(0, free_bytes - weights) * fraction)  # what `auto` divides among a batch's prompts
    prefix_cache = batch_bytes(shape, longest_suffix, prefix, 0, dtype)  # shown in the estimate, as auto ignores it
    per_prompt = batch_bytes(shape, longest_suffix, prefix, 1, dtype) - prefix_cache
    batch = batch_bytes(shape, longest_suffix, prefix, batch_size, dtype)
    if weights < free_bytes and batch_size * per_prompt <= budget:
        return
    fixes = []
    if weights < free_bytes and per_prompt <= budget:
        fixes.append(f"--batch-size {budget // per_prompt}")
    else:
        small = shape.weights_bytes(2)
        small_prompt = (batch_bytes(shape, longest_suffix, prefix, 1, "bfloat16")
                        - batch_bytes(shape, longest_suffix, prefix, 0, "bfloat16"))
        if dtype == "float32" and small < free_bytes and small_prompt <= (free_bytes - small) * fraction:
            fixes.append("--dtype bfloat16")
        need = weights + per_prompt / MEMORY_FRACTION["cuda"]  # free memory that holds the weights and one prompt
        bigger = [d.name for d in DEVICES.values() if d.kind == "cuda" and need <= d.memory_bytes]
        fixes.append(f"--device cuda on a GPU of {need / GIB:.0f} GiB or more"
                     + (f" ({', '.join(bigger)})" if bigger else "") + ", or --device auto over several GPUs")
    raise PartsError(
        f"{shape.name} in {dtype} will not fit on {where}: about {(weights + batch) / GIB:.1f} GiB "
        f"({weights / GIB:.1f} GiB of weights + {batch / GIB:.2f} GiB for a batch of {batch_size} at "
        f"{prefix + longest_suffix} tokens) against {free_bytes / GIB:.1f} GiB free ({budget / GIB:.1f} GiB of it for "
        "batches once the weights are in): "
        f"use {' or '.join(fixes)}"
    )


# -- the rate --------------------------------------------------------------------------------------------------
def probe_rate(shape: ModelShape, dtype: str, device: str | None = None, seconds: float = 1.0, tokens: int = 256
               ) -> float:
    """This device's rate (FLOP/s) on one transformer block of the model's width, in its dtype, timed for about
    `seconds`: norm, query/key/value/output projections, causal attention over `tokens`, a gated MLP. Random weights
    of one block only (at most 2,048 wide: a 7B block's shape, narrowed), never the model's. A block rather than a
    bare matmul, so the norms, softmax and small operations (and other processes sharing the cores) are counted as
    a forward pass meets them."""
    import torch


    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = min(1.0, 2048 / shape.d_model)
    d_model, d_mlp = int(shape.d_model * scale), int(shape.d_mlp * scale)
    n_heads, d_head = max(1, int(shape.n_heads * scale)), shape.d_head
    n_kv = max(1, min(n_heads, int(shape.n_key_value_heads * scale)))
    kind, torch_dtype = torch.device(device).type, DTYPES[dtype]
    generator = torch.Generator(device="cpu").manual_seed(0)

    def weight(rows: int, columns: int) -> Any:
        return (torch.randn(rows, columns, generator=generator) / rows**0.5).to(device=device, dtype=torch_dtype)

    w_q, w_kv, w_o = weight(d_model, n_heads * d_head), weight(d_model, 2 * n_kv * d_head), weight(n_heads * d_head, d_model)
    w_gate_up, w_down = weight(d_model, 2 * d_mlp), weight(d_mlp, d_model)
    x = torch.randn(tokens, d_model, generator=generator).to(device=device, dtype=torch_dtype)
    params = d_model * (n_heads + 2 * n_kv) * d_head + n_heads * d_head * d_model + 3 * d_model * d_mlp
    flops_each = 2 * tokens * params + 4 * n_heads * d_head * tokens * (tokens + 1) // 2

    def block(x: Any) -> Any:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)
        q = (h @ w_q).view(1, tokens, n_heads, d_head).transpose(1, 2)
        k, v = (h @ w_kv).view(1, tokens, 2, n_kv, d_head).permute(2, 0, 3, 1, 4)
        k, v = k.repeat_interleave(n_heads // n_kv, 1), v.repeat_interleave(n_heads // n_kv, 1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + attended.transpose(1, 2).reshape(tokens, n_heads * d_head) @ w_o
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)
        gate, up = (h @ w_gate_up).chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(gate) * up) @ w_down

    def sync() -> None:
        if kind == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        block(x)  # warm-up
        sync()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            block(x)
            runs += 1
            if runs % 4 == 0:
                sync()
        sync()
        elapsed = time.perf_counter() - start
    return flops_each * runs / elapsed


# -- counting one decomposition call ---------------------------------------------------------------------------------
@dataclass
class Call:
    """One `Decomposer` call of a plan (a run, or a set of full-model logits): what it forwards.

    `batches` are (prompts, padded width) after the shared prefix; `check_tokens` the one full prompt run alone to
    check that prefix reuse is exact (0 when an earlier call on the model already padded as much)."""

    label: str
    prompts: int
    tokens: int  # the prompts' own tokens
    prefix: int
    batch_size: int
    batches: list[tuple[int, int]]
    check_tokens: int
    longest: int

    @property
    def forwarded(self) -> int:
        """Token positions run through the model: the prefix once, every batch's padded rows, the check."""
        return self.prefix + sum(rows * width for rows, width in self.batches) + self.check_tokens

    @property
    def query_keys(self) -> int:
        """Query-key pairs of attention (padding included: it is computed, then masked)."""
        pairs = self.prefix * (self.prefix + 1) // 2 + self.check_tokens * (self.check_tokens + 1) // 2
        for rows, width in self.batches:
            pairs += rows * (width * self.prefix + width * (width + 1) // 2)
        return pairs

    @property
    def logit_rows(self) -> int:
        """Positions unembedded (the last one of each forward only)."""
        return (1 if self.prefix else 0) + sum(rows for rows, _ in self.batches) + (1 if self.check_tokens else 0)


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """`Decomposer.shared_prefix_length` (imported, so the plan counts as the decomposition does)."""

    return Decomposer.shared_prefix_length(token_lists)


@dataclass
class Planner:
    """Counts calls on one model as the decomposition would run them, in order: the exactness check of prefix reuse
    is run once per model and again only for a call that pads more (`VERIFIED_PADDING`), so the state is kept here."""

    shape: ModelShape
    dtype: str
    device_kind: str
    free_bytes: int  # memory the batches may use once the weights are in
    batch_size: int | str | None
    prefix_reuse: bool = True
    verified_padding: int = 0
    tokenizer: Any = None  # the model's, as a `CachedTokenizer` (`new_plan` gives it)

    def call(self, label: str, token_lists: Sequence[Sequence[int]]) -> Call:

        prefix = shared_prefix_length(token_lists) if self.prefix_reuse and len(token_lists) > 1 else 0
        window = self.shape.sliding_window
        if prefix and window is not None and max(len(t) for t in token_lists) > window:
            prefix = 0
        if self.batch_size is None or self.batch_size == "auto":
            size = planned_batch_size(self.shape, self.device_kind, element_bytes(self.dtype), token_lists, prefix,
                                      self.free_bytes)
        else:
            size = int(self.batch_size)
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        lengths = [len(token_lists[i]) for i in order]
        batches, padding = [], {}
        for start in range(0, len(order), size):
            stop = min(start + size, len(order))
            batches.append((stop - start, lengths[start] - prefix))
            for row in range(start, stop):
                padding[order[row]] = lengths[start] - lengths[row]
        check = 0
        if prefix:
            example = max(padding, key=lambda i: padding[i])
            if padding[example] > self.verified_padding:
                check = len(token_lists[example])
                self.verified_padding = padding[example]
        return Call(label, len(token_lists), sum(lengths), prefix, size, batches, check, lengths[0])


# -- files -----------------------------------------------------------------------------------------------------------
def safetensors_bytes(tensors: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None) -> int:
    """The exact size of a float32 safetensors file of these shapes (its header written by the library itself)."""
    import torch
    from safetensors.torch import save

    return len(save({name: torch.zeros(shape, device="cpu") for name, shape in tensors.items()}, metadata=metadata))


def run_folder_files(prompts: Any, token_lists: Sequence[Sequence[int]], components: int, d_model: int,
                     summary_estimate: int) -> dict[str, int]:
    """Bytes of a run folder's files: tensors.safetensors and prompts.jsonl exact (`DecompositionRun.save` writes
    these shapes and rows), summary.json estimated (its accuracies' digits are known only after the run)."""

    n, labels = len(prompts.prompts), len(prompts.label_words)
    tensors = safetensors_bytes({"component_logits": (n, components, labels), "remainder": (n, labels),
                                 "model_logits": (n, labels), "final_residual": (n, d_model)})
    rows = "".join(json.dumps({"index": index, "label": label, "prompt": prompt, "token_ids": list(tokens)}) + "\n"
                   for index, prompt, label, tokens in zip(prompts.example_indices, prompts.prompts, prompts.labels,
                                                          token_lists, strict=True))
    return {TENSORS: tensors, PROMPTS: len(rows.encode()), SUMMARY: summary_estimate}


def summary_estimate(model: str, prompts: Any, label_token_ids: list[int], shape: ModelShape,
                     fingerprint: dict[str, Any] | None, info: dict[str, Any]) -> int:
    """summary.json's size with typical numbers in the places the run fills (accuracies of 6 decimals)."""
    import torch


    n, labels = len(prompts.prompts), len(prompts.label_words)
    names = component_names(shape.n_layers, shape.n_heads)
    empty = Decomposition(torch.zeros(n, len(names), labels, device="cpu"), torch.zeros(n, labels, device="cpu"),
                          torch.zeros(n, labels, device="cpu"))
    run = DecompositionRun.from_decomposition(model, prompts, label_token_ids, names, shape.n_layers, shape.n_heads,
                                              empty, None, fingerprint, **info)
    summary = run.summary()
    # Accuracies are k / n, most components near chance: two thirds at n // 2, a third one example either side.
    middle = n // 2
    typical = [round(k / max(n, 1), 6) for k in (middle, middle, middle - 1, middle, middle, middle + 1)]
    summary.update(chance=typical[0], full_accuracy=typical[0], max_reconstruction_error=3.814697265625e-06,
                   component_accuracy=[typical[i % len(typical)] for i in range(len(names))])
    return len(json.dumps(summary, indent=1).encode())


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """One setting of a command's plan: done (reused as the real command would), or its calls and files."""

    label: str
    done: bool
    calls: list[Call] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # path -> bytes
    reused: int = 0  # calls whose output is on disk already (a shared run, a cached file)


@dataclass
class Plan:
    """What a command would do: its settings, forward calls and files, on one model and device."""

    command: str
    shape: ModelShape
    dtype: str
    device: str  # what the estimate assumes: "cpu (this machine)", "h200 (assumed)"...
    device_kind: str
    free_bytes: int  # memory free on it before the weights load
    rate: float  # matmul FLOP/s on it at this dtype
    rate_source: str
    settings: list[Setting] = field(default_factory=list)
    tokenizer_note: str = ""
    loads: int = 1  # model loads the command would make (0 when everything is done)
    auto: bool = True  # the batch size is `auto`'s choice
    fixed_seconds: float = 0.0  # work beside the forwards (fitting weights, writing tables): a command's own estimate
    notes: list[str] = field(default_factory=list)  # what the plan does not count, printed last

    @property
    def calls(self) -> list[Call]:
        return [call for setting in self.settings for call in setting.calls]

    @property
    def forwarded(self) -> int:
        return sum(call.forwarded for call in self.calls)

    @property
    def files(self) -> dict[str, int]:
        return {path: size for setting in self.settings for path, size in setting.files.items()}

    @property
    def disk_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def peak_bytes(self) -> int:
        """Weights plus the largest batch's estimate."""
        weights = self.shape.weights_bytes(element_bytes(self.dtype))
        batch = max((batch_bytes(self.shape, call.longest - call.prefix, call.prefix, call.batch_size, self.dtype)
                     for call in self.calls), default=0)
        return weights + batch

    def flops(self) -> tuple[float, float]:
        """(linear-layer and unembedding FLOPs, attention FLOPs) of every call."""
        shape = self.shape
        linear = sum(2 * shape.block_parameters * c.forwarded + 2 * shape.d_model * shape.d_vocab * c.logit_rows
                     for c in self.calls)
        attention = sum(4 * shape.n_layers * shape.n_heads * shape.d_head * c.query_keys for c in self.calls)
        return float(linear), float(attention)

    def seconds(self) -> float:
        """The cost model's estimate of the whole command's time (see the module docstring)."""
        linear, attention = self.flops()
        batches = sum(len(c.batches) + (1 if c.prefix else 0) + (1 if c.check_tokens else 0) for c in self.calls)
        load = self.loads * self.shape.weights_bytes(element_bytes(self.dtype)) * SECONDS_PER_WEIGHT_BYTE
        return (linear / (self.rate * LINEAR_EFFICIENCY) + attention / (self.rate * ATTENTION_EFFICIENCY)
                + batches * self.shape.n_layers * SECONDS_PER_BATCH_LAYER + len(self.calls) * SECONDS_PER_CALL + load
                + self.fixed_seconds)

    def check_fits(self) -> None:
        """`check_fits` for the plan's largest batch."""
        if not self.calls:
            return
        call = max(self.calls, key=lambda c: batch_bytes(self.shape, c.longest - c.prefix, c.prefix, c.batch_size,
                                                          self.dtype))
        check_fits(self.shape, self.dtype, self.device_kind, self.free_bytes, call.longest - call.prefix,
                   call.prefix, call.batch_size, self.device)

    def describe(self) -> str:
        """The plan as `--dry-run` prints it."""
        shape, done = self.shape, [s for s in self.settings if s.done]
        todo = [s for s in self.settings if not s.done]
        calls = self.calls
        sizes = [c.batch_size for c in calls]
        weights = shape.weights_bytes(element_bytes(self.dtype))
        lines = [
            f"parts {self.command} --dry-run: {shape.name}, {self.dtype}, on {self.device} (no weights loaded)",
            f"settings     {len(self.settings)}: {len(todo)} to run, {len(done)} already done"
            + (f" ({sum(s.reused for s in todo)} of the to-run settings' calls reuse files on disk)"
               if any(s.reused for s in todo) else ""),
        ]
        if todo:
            lines.append("to run       " + ", ".join(s.label for s in todo[:6]) + (" ..." if len(todo) > 6 else ""))
        lines += [
            f"components   {shape.components} ({shape.n_layers} layers x {shape.n_heads} heads + {shape.n_layers} MLPs)",
            f"forwards     {len(calls)} calls, {sum(c.prompts for c in calls):,} prompts, {self.forwarded:,} tokens "
            f"forwarded ({sum(c.tokens for c in calls):,} prompt tokens; shared prefixes run once: "
            f"{sum(c.prefix for c in calls):,}; longest prompt {max((c.longest for c in calls), default=0):,})"
            + self.tokenizer_note,
            f"memory       {weights / GIB:.2f} GiB of weights + {(self.peak_bytes - weights) / GIB:.2f} GiB for the "
            f"largest batch = {self.peak_bytes / GIB:.2f} GiB peak; batch size {batch_sizes_text(sizes)} "
            f"({'auto' if self.auto else 'given'}) of {self.free_bytes / GIB:.1f} GiB free",
            f"disk         {self.disk_bytes / 1e6:,.2f} MB in {len(self.files)} files (run folders: tensors.safetensors "
            "and prompts.jsonl exact, summary.json and weights estimated)",
            f"time         about {format_seconds(self.seconds())} at {self.rate / 1e9:,.0f} GFLOP/s "
            f"({self.rate_source}); cost model: parts.experiments.plan",
        ]
        lines += [f"not counted  {note}" for note in dict.fromkeys(self.notes)]
        return "\n".join(lines)


def batch_sizes_text(sizes: Iterable[int]) -> str:
    """The batch sizes of a plan's calls in a few characters: '8', or their range '3-8' ('-': none)."""
    known = sorted(set(sizes))
    if not known:
        return "-"
    return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"


def format_seconds(seconds: float) -> str:
    """'45 s', '12 min', '2.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# -- building a plan for a command -----------------------------------------------------------------------------------
@dataclass
class Target:
    """The model and device a plan is made for: its shape and tokenizer, the memory and rate assumed."""

    shape: ModelShape
    tokenizer: Any
    dtype: str
    device: str
    device_kind: str
    free_bytes: int
    rate: float
    rate_source: str
    label: str  # the model's label as runs record it
    tokenizer_note: str = ""


def model_files_folder(name: str | None, revision: str | None) -> Path:
    """The folder of a model's config and tokenizer, or a one-line error saying how to get them without weights."""

    if name not in EMBEDDED_ALIASES:
        check_local_folder(resolve_model_name(name))  # a path that is no model folder: load_model's own error
    folder = files_on_disk(name, revision)
    if folder is None:
        if name in EMBEDDED_ALIASES:
            raise PartsError("the embedded model is not converted yet: run any parts command on it once "
                             "(e.g. parts decompose --task sst2 --limit 2) before --dry-run")
        raise PartsError(f"no config.json of {name!r} on this disk: download its config and tokenizer only "
                         f"(huggingface-cli download {name} config.json tokenizer.json tokenizer_config.json), or "
                         "plan a named shape with --shape")
    return folder


def bridge_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer as the loaded model holds it: TransformerLens's bridge sets it up at boot (a BOS token prepended
    where the tokenizer has one, a pad token), so the plan tokenises exactly as `Decomposer.tokenize` will."""
    from transformer_lens.model_bridge.sources._hf_format import setup_tokenizer

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # as `parts.model.loading.from_hf` does first
    return setup_tokenizer(tokenizer)


def load_target(name: str | None, revision: str | None, dtype: str, device: str | None, assume: str | None,
                shape_name: str | None = None, probe_seconds: float = 1.0) -> Target:
    """The model's shape and tokenizer (config files only; `shape_name`: a `NAMED_SHAPES` config, tokenised with the
    embedded model's tokenizer) and the device: `assume` a recorded one, else this machine's, probed (not with
    `probe_seconds` 0: a rate of 0, for a plan that only checks memory)."""
    from transformers import AutoConfig, AutoTokenizer


    if shape_name is not None:
        config, label = named_config(shape_name), f"{shape_name} (shape)"
        folder = model_files_folder(None, None)
        note = " [tokens counted with the embedded model's tokenizer]"
    else:
        folder = model_files_folder(name, revision)
        label, note = str(model_label(resolve_model_name(name), revision)), ""
    try:
        if shape_name is None:
            config = AutoConfig.from_pretrained(folder)
        tokenizer = bridge_tokenizer(AutoTokenizer.from_pretrained(folder))
    except (OSError, ValueError, KeyError) as err:  # as load_model: a bad folder or config is the user's to fix
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PartsError(f"cannot load model {name!r}: {first_line} (check the name or folder; omit --model for "
                         "the offline default)") from err
    shape = ModelShape.from_config(config, label)
    if assume is not None:
        known = assumed_device(assume)
        kind, free = known.kind, known.memory_bytes
        rate, source, where = known.rate(dtype), known.source, f"{known.name} (assumed)"
    else:
        kind, free = free_bytes_here(device)
        rate = probe_rate(shape, dtype, device if device != "auto" else None, probe_seconds) if probe_seconds else 0.0
        source, where = f"probed here for {probe_seconds:.0f} s", f"{kind} (this machine)"
    return Target(shape, tokenizer, dtype, where, kind, free, rate, source, label, note)


def new_plan(command: str, target: Target, batch_size: int | str | None, prefix_reuse: bool) -> tuple[Plan, Planner]:
    """An empty plan for `command` on `target`, and the planner that counts its calls (the batches get the memory
    left once the weights are in)."""
    weights = target.shape.weights_bytes(element_bytes(target.dtype))
    plan = Plan(command, target.shape, target.dtype, target.device, target.device_kind, target.free_bytes,
                target.rate, target.rate_source, tokenizer_note=target.tokenizer_note,
                auto=batch_size in (None, "auto"))
    planner = Planner(target.shape, target.dtype, target.device_kind, max(0, target.free_bytes - weights), batch_size,
                      prefix_reuse, tokenizer=CachedTokenizer(target.tokenizer))
    return plan, planner


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """The ids `Decomposer.tokenize` gives (one prompt at a time), from one batch call of the tokenizer: no padding,
    so the same ids (tests/test_plan.py), without a Python round trip per prompt."""
    return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]] if prompts else []


CACHED_TOKENS = 4_000_000  # ~150 MB of Python lists: several 24-shot prompt sets of 200 at the longest


@dataclass
class CachedTokenizer:
    """The model's tokenizer called on a list of prompts (`tokenize`: one batch call), each prompt's ids kept by its
    text for the plan: the L-shot prompts are tokenised to check that they fit the context window
    (`many_shot_prompts`) and counted next, and settings share runs. Past `CACHED_TOKENS` the oldest are let go (a
    120-setting plan tokenises 52 M tokens, too many to hold)."""

    tokenizer: Any
    known: OrderedDict[str, list[int]] = field(default_factory=OrderedDict)
    held: int = 0  # tokens in `known`

    def __call__(self, prompts: Sequence[str]) -> dict[str, list[list[int]]]:
        """{"input_ids": each prompt's ids}, as the tokenizer's own batch call returns them."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.known]
        for prompt, ids in zip(new, tokenize(self.tokenizer, new), strict=True):
            self.known[prompt] = ids
            self.held += len(ids)
        token_lists = [self.known[p] for p in prompts]
        while self.held > CACHED_TOKENS and self.known:
            self.held -= len(self.known.popitem(last=False)[1])
        return {"input_ids": token_lists}


def run_call(planner: Planner, target: Target, label: str, prompts: Any, fingerprint: dict[str, Any] | None,
             path: Path, options: Any, **more_info: Any) -> tuple[Call, dict[str, int]]:
    """The call and files of one decomposition run saved at `path` (`more_info`: what the command adds to the run's
    info before saving it)."""

    tokens = planner.tokenizer(prompts.prompts)["input_ids"]
    call = planner.call(label, tokens)
    ids = label_token_ids(target.tokenizer, prompts.label_words)
    bos = getattr(target.tokenizer, "bos_token_id", None)
    info = {"dtype": target.dtype, "prefix_reuse": options.prefix_reuse, "engine": options.engine,
            "bos_prepended": bos is not None and all(t[0] == bos for t in tokens), **more_info}
    summary = summary_estimate(target.label, prompts, ids,
                               target.shape, None if fingerprint is None else {**fingerprint, "label_token_ids": ids},
                               info)
    files = {str(path / name): size for name, size in
             run_folder_files(prompts, tokens, target.shape.components, target.shape.d_model, summary).items()}
    return call, files


def sweep_plan(target: Target, planned: Sequence[Any], options: Any) -> Plan:
    """The plan of `parts sweep`: each `PlannedRun` done (reused as the sweep would) or one call and its folder."""

    plan, planner = new_plan("sweep", target, options.batch_size, options.prefix_reuse)
    for run in planned:
        if run.is_done(options):
            plan.settings.append(Setting(run.label, True))
            continue
        prompts = build_prompts(run.task, run.template, run.seed, run.shots, run.split, run.limit, options.data_dir)
        call, files = run_call(planner, target, run.label, prompts, run.fingerprint(options), run.path, options)
        plan.settings.append(Setting(run.label, False, [call], files))
    plan.loads = int(any(not s.done for s in plan.settings))
    return plan


# -- parts evaluate ---------------------------------------------------------------------------------------------------
# Per to-run setting of `parts evaluate`, the work beside the forwards (reweighting and the oracle's descent, the
# probes' leave-one-out, Calib+, the masks, writing results.csv and the table), in seconds on one CPU core at n = 200
# (measured on the embedded model: benchmarks/results.md's main table less its forwards); scaled by the test size.
SECONDS_PER_EVALUATE_SETTING = 4.0
TYPICAL_EPOCHS = 1000  # a weights file's length grows with its descent's epochs (100 to 2,000 in the main table)


def logits_file_bytes(rows: int, labels: int, metadata: dict[str, str]) -> int:
    """Exact bytes of a cached logits file (`parts.experiments.evaluate._cached_logits`: float32 `logits` and its
    metadata as one sorted JSON string)."""
    return safetensors_bytes({"logits": (rows, labels)}, {"parts": json.dumps(metadata, sort_keys=True)})


def weights_file_bytes(shape: ModelShape, info: dict[str, Any]) -> int:
    """Estimated bytes of a weights file (`parts.reweighting.reweight.save_weights`): its losses' count is the
    descent's epochs, known only after it ran (`TYPICAL_EPOCHS` assumed)."""
    record = {"component_names": component_names(shape.n_layers, shape.n_heads), "epochs": TYPICAL_EPOCHS,
              "stopped_because": "plateau", "train_accuracy": 0.85, "losses": [0.512345] * TYPICAL_EPOCHS,
              "info": info}
    return safetensors_bytes({"weights": (shape.components,)}, {"parts": json.dumps(record, sort_keys=True)})


def stores_final_residual(path: Path) -> bool:
    """Whether a saved run's tensors hold the final residual (runs saved before parts stored it do not)."""
    from safetensors import safe_open

    with safe_open(str(path / TENSORS), framework="pt") as handle:
        return FINAL_RESIDUAL in handle.keys()  # noqa: SIM118 (a safetensors handle is no dict)


def reused_run(path: Path, fingerprint: dict[str, Any], options: Any) -> bool:
    """Whether evaluate/transfer would reuse the run at `path` (`reusable_run`), refusing as they would a reused
    run without the final residual the residual probe needs (with `--recompute-changed`: to redo)."""
    if not reusable_run(path, fingerprint, options):
        return False
    if stores_final_residual(path):
        return True
    if not options.recompute_changed:
        raise PartsError(f"{path} {NO_RESIDUAL}")
    return False


def planned_run(planner: Planner, target: Target, entry: Setting, path: Path, prompts: Any,
                fingerprint: dict[str, Any], options: Any, residual: bool = True, **info: Any) -> None:
    """A decomposition run of `entry`: reused when on disk as the command would reuse it (`reused_run`; `residual`
    False: a run without the final residual too), else its call and files (`info`: what the command adds to the
    run's summary)."""
    if (reused_run if residual else reusable_run)(path, fingerprint, options):
        entry.reused += 1
        return
    call, files = run_call(planner, target, f"{entry.label} {prompts.split}", prompts, fingerprint, path, options,
                           **info)
    entry.calls.append(call)
    entry.files.update(files)


def planned_task_run(planner: Planner, target: Target, entry: Setting, root: Path, where: dict[str, Any], split: str,
                     limit: int | None, options: Any, residual: bool = True) -> Any:
    """The run of `where`'s task, template, seed and shots on `split` under `root` (`run_dir`), as `planned_run`;
    returns its prompts."""
    task, template, seed, shots = where["task"], where["template"], where["seed"], where["shots"]
    prompts = build_prompts(task, template, seed, shots, split, limit, options.data_dir)
    fingerprint = expected_fingerprint(where["model"], task, template, seed, shots, split, limit, options)
    planned_run(planner, target, entry, run_dir(root, split=split, limit=limit, **where), prompts, fingerprint, options,
                residual)
    return prompts


def planned_logits(planner: Planner, target: Target, entry: Setting, path: Path, prompts: Sequence[str], labels: int,
                   metadata: dict[str, str]) -> None:
    """A cached logits file of `entry` (the full model's label logits of `prompts`): reused when on disk, else its
    call and the file."""
    if path.is_file():
        entry.reused += 1
        return
    entry.calls.append(planner.call(f"{entry.label} {path.stem}", planner.tokenizer(prompts)["input_ids"]))
    entry.files[str(path)] = logits_file_bytes(len(prompts), labels, metadata)


def results_files(root: Path, table: Path, rows: list[dict[str, Any]], fingerprints: dict[str, Any],
                  csv_name: str) -> dict[str, int]:
    """Estimated bytes of a results table as the command leaves it: the rows already there merged with `rows`
    (notes and accuracies of typical length), its fingerprints file, and the markdown table (a row per method)."""
    csv_path = root / csv_name
    merged = merge_results(read_results(csv_path), results_frame(rows))
    csv_text = merged.to_csv(index=False, lineterminator="\r\n")
    recorded = {}
    fingerprint_path = csv_path.with_name(csv_path.stem + FINGERPRINTS)
    if fingerprint_path.is_file():
        recorded = json.loads(fingerprint_path.read_text())
    known = {**recorded, **fingerprints}
    fingerprint_text = json.dumps({d: known[d] for d in sorted(set(merged["fingerprint"])) if d in known}, indent=1)
    methods = merged[["task", "method", "labels"]].drop_duplicates()
    return {str(csv_path): len(csv_text.encode()), str(fingerprint_path): len(fingerprint_text.encode()),
            str(table): 300 + 40 * len(methods)}


def settings_to_run(plan: Plan, works: Sequence[Any], options: Any, task_of: Callable[[Any], Any]
                    ) -> Iterator[tuple[Any, Setting, dict[str, Any]]]:
    """The settings of `works` (evaluate's or transfer's items) to run, in order, each with its entry in `plan` (to
    fill with its calls and files) and where its runs are (`run_dir`'s keywords; `task_of(setting)`: the task whose
    runs they are, a transfer's source); a setting whose rows are in the results table is entered as done."""
    for work in works:
        entry = Setting(work.label, work.is_done(options))
        plan.settings.append(entry)
        if not entry.done:
            setting = work.setting
            yield work, entry, {"model": work.model.label, "task": task_of(setting), "template": setting.template,
                                "seed": setting.seed, "shots": setting.k, "options": options}


def with_results_files(plan: Plan, root: Path, table: Path, rows: list[dict[str, Any]], fingerprints: dict[str, Any],
                       csv_name: str) -> Plan:
    """`plan` with the results table's files (`results_files`: rewritten after each setting, counted once, on the
    last setting to run) and its model loads (none when every setting is done or reuses files on disk)."""
    todo = [s for s in plan.settings if not s.done]
    if todo:
        todo[-1].files.update(results_files(root, table, rows, fingerprints, csv_name))
    plan.loads = int(any(s.calls for s in plan.settings))
    return plan


def typical_note(method: str) -> str:
    """A note of the length `parts evaluate` writes for `method` (`parts.experiments.results.NOTE_PATTERNS`)."""
    trained = "train acc 0.850; plateau after 1000 epochs"
    return {"contextual": "prior 0.500 0.500", "calib+": "class weights 1.000 1.000",
            "oracle": f"{ORACLE_NOTE}; {trained}", "comprw": trained, "comprw-signed": f"{trained}; 12 weights below 0",
            "mask-biased": "masked 12 of 300 components", "probe-resid": "C 1 by leave-one-out; train acc 0.850",
            "probe-logits": "C 1 by leave-one-out; train acc 0.850",
            "calib-affine": "C 1 by leave-one-out; train acc 0.850"}.get(method, "")


def evaluate_plan(target: Target, works: Sequence[Any], options: Any) -> Plan:
    """The plan of `parts evaluate` (`works`: its `EvaluateWork` items): a setting whose rows are in results.csv
    is done; the others decompose, as `evaluate_setting` does and in its order, whatever is not on disk: the k-shot
    test run, the content-free prompts (contextual calibration; logits cached beside the test run), and per label
    budget the seed's L - k labelled examples' run and the L-shot ICL prompts (logits cached). The residual probe
    reads the runs' final residual (no forward of its own); `--gates` trains by backpropagation through the model,
    which is not counted here (`Plan` prints that)."""
    plan, planner = new_plan("evaluate", target, options.batch_size, options.prefix_reuse)
    data_dir, rows = options.data_dir, []
    fingerprints: dict[str, Any] = {}
    for work, entry, where in settings_to_run(plan, works, options, lambda setting: setting.task):
        setting, label = work.setting, work.model.label
        task, k, template = setting.task, setting.k, setting.template
        test = planned_task_run(planner, target, entry, work.root, where, "test", setting.limit, options)
        test_dir = run_dir(work.root, split="test", limit=setting.limit, **where)
        n_labels = len(test.label_words)
        train_rows, test_rows = load_split(task, "train", data_dir), load_split(task, "test", data_dir)
        demonstrations = [train_rows[i] for i in test.demonstrations]
        chosen = task.template(template)
        planned_logits(planner, target, entry, test_dir / "content-free.safetensors",
                       content_free_prompts(chosen, demonstrations), n_labels, {})
        entry.files[str(weights_file(test_dir, "oracle"))] = weights_file_bytes(
            target.shape, {"trained_on": "test set (optimistic reference)"})
        for budget in setting.labels:
            train = planned_task_run(planner, target, entry, work.root, where, "train", budget - k, options)
            entry.files[str(weights_file(test_dir, budget))] = weights_file_bytes(
                target.shape, {"labels": budget, "train_run": str(run_dir(".", split="train", limit=budget - k,
                                                                          **where))})
            drawn = demonstrations + [train_rows[i] for i in train.example_indices]
            labelled = [drawn[i] for i in many_shot_order(task, setting.seed, [d["label"] for d in drawn])]
            queries = [test_rows[i] for i in test.example_indices]
            with warnings.catch_warnings():  # the real run warns of dropped demonstrations; the metadata says it
                warnings.simplefilter("ignore")
                prompts, dropped = many_shot_prompts(planner.tokenizer, chosen, labelled, queries, target.shape.n_ctx)
            planned_logits(planner, target, entry, test_dir / f"icl-labels{budget}.safetensors", prompts, n_labels,
                           {"dropped": str(dropped), "shown": str(len(labelled) - dropped)})
        fingerprint = setting_fingerprint(label, setting, options)
        made_of = digest(fingerprint)
        fingerprints[made_of] = fingerprint
        name = model_slug(label, options)
        rows += [result_row(name, task.name, template, setting.seed, k, setting.limit, method, labels, 0.512345,
                            len(test.prompts), typical_note(method), made_of)
                 for method, labels in sorted(setting.expected_methods())]
        if setting.gates:
            plan.notes.append("gates (--gates): backpropagation through the model per setting and budget, not "
                              "counted in the forwards or the time")
        plan.fixed_seconds += SECONDS_PER_EVALUATE_SETTING * len(test.prompts) / 200
    return with_results_files(plan, works[0].root, evaluation_table_path(works, options), rows, fingerprints,
                              RESULTS_CSV)


# -- parts transfer ---------------------------------------------------------------------------------------------------
SECONDS_PER_TRANSFER_SETTING = 1.0  # CompRW's and Calib+'s training on 20 examples, the rows and the table


def transfer_plan(target: Target, works: Sequence[Any], options: Any) -> Plan:
    """The plan of `parts transfer` (`works`: its `TransferWork` items): a setting whose rows are in transfer.csv is
    done; the others decompose, as `evaluate_transfer` does and in its order, whatever is not on disk: the source's
    test run and its 24 - k labelled examples' run (shared with `parts evaluate` under the same root), and the
    target's test examples after the source's template and demonstrations (under `transfer/`)."""
    plan, planner = new_plan("transfer", target, options.batch_size, options.prefix_reuse)
    rows: list[dict[str, Any]] = []
    fingerprints: dict[str, Any] = {}
    for work, entry, where in settings_to_run(plan, works, options, lambda setting: setting.source):
        setting, label = work.setting, work.model.label
        source, k = setting.source, setting.k
        source_test = planned_task_run(planner, target, entry, work.root, where, "test", setting.source_limit, options,
                                       False)
        planned_task_run(planner, target, entry, work.root, where, "train", LABEL_BUDGET - k, options, False)
        prompts = transfer_prompts(source, setting.target, setting.template, setting.seed, k, setting.target_limit,
                                   options.data_dir)
        planned_run(planner, target, entry,
                    transfer_run_dir(work.root, label, source, setting.target, setting.template, setting.seed, k,
                                     setting.target_limit, options),
                    prompts, setting.target_fingerprint(label, options), options, False,
                    demonstrations_from=source.name)
        fingerprint = setting.fingerprint(label, options)
        made_of = digest(fingerprint)
        fingerprints[made_of] = fingerprint
        name, shifted = model_slug(label, options), transfer_name(source, setting.target)
        sides = [(source.name, setting.source_limit, len(source_test.prompts), SIDE_METHODS),
                 (shifted, setting.target_limit, len(prompts.prompts), SIDE_METHODS + TARGET_ONLY_METHODS)]
        rows += [result_row(name, task_name, setting.template, setting.seed, k, limit, method,
                            method_labels(method, k, LABEL_BUDGET), 0.512345, n, typical_note(method), made_of)
                 for task_name, limit, n, methods in sides for method in methods]
        plan.fixed_seconds += SECONDS_PER_TRANSFER_SETTING
    root = works[0].root
    return with_results_files(plan, root, transfer_outputs(works[0].model, root, options)[1], rows, fingerprints,
                              TRANSFER_CSV)


# -- the real commands' check ----------------------------------------------------------------------------------------
def check_command_fits(plan_of: Any, works: Sequence[Any], options: Any, name: str | None, revision: str | None,
                       device: str | None) -> None:
    """Refuse a real command, before its weights load, whose model or largest batch will not fit in the memory
    free on `device` now (`check_fits`: one line, the estimate and the `--batch-size` or `--device` that would fit).

    `plan_of(target, works, options)` is the command's plan (`sweep_plan`, `evaluate_plan`, `transfer_plan`), made
    here for the first setting to run of each task (a task's prompts are about as long in every template and seed),
    without probing the rate. Nothing is checked when everything is done, when the model's files are not on this
    disk yet (the load fetches them), or on `--device auto` over several GPUs (the weights are spread)."""
    import torch

    if device == "auto" and torch.cuda.device_count() > 1:
        return
    if files_on_disk(name, revision) is None:
        return
    first: dict[str, Any] = {}
    for work in works:
        if not work.is_done(options):
            first.setdefault(work.label.rsplit(" t", 1)[0], work)  # "sst2 t1 s0", "sst2 -> yelp t1 s0"
    if not first:
        return
    target = load_target(name, revision, options.dtype, device, None, probe_seconds=0)
    with warnings.catch_warnings():  # the run that follows says them (e.g. a --limit above the data) once
        warnings.simplefilter("ignore")
        plan = plan_of(target, list(first.values()), options)
    plan.check_fits()
