"""Scale check: a 7B-shaped model with random weights, decomposed in bfloat16 on this machine (issue 26).

    python benchmarks/scale_check.py --shape tiny                       # seconds: the CI smoke test
    python benchmarks/scale_check.py --shape llama-2-7b --record        # 13.5 GB of bf16 weights
    python benchmarks/scale_check.py --shape mistral-7b --record        # grouped-query attention, 8 KV heads
    python benchmarks/scale_check.py --shape moe-7b --record            # OLMoE-1B-7B: 64 experts, top 8
    python benchmarks/scale_check.py --shape llama-2-7b --layers 2      # the 7B widths, 2 of its 32 layers

What it proves at the shapes users run, without downloading weights:

- the model is built in the target dtype, never in float32: its modules are made on the meta device
  (accelerate's `init_empty_weights`, as transformers' own loading does), then each parameter is allocated
  in bf16 on the target device and drawn (normal, std `initializer_range` = 0.02; norm weights 1), one
  tensor at a time, so the resident memory grows to the bf16 size and no further;
- it is wrapped in the TransformerLens bridge by `parts.model.loading.from_hf`, as a local model is;
- `parts.experiments.runner.decompose_task` runs the real sst2 prompts (template 1, seed 0): 8 test prompts
  at 4 shots and 2 at 24 shots, with prefix reuse and `--batch-size auto`; the runs are saved with parts'
  own run saving into a temporary folder;
- it records, per prompt set: the batch size `auto` chose, the peak resident memory (VmHWM; on CUDA the
  peak allocation) against the estimate (weights + the batch planner's per-batch estimate + the process
  before the build), the run folder's size, the time per prompt, and the largest reconstruction error
  relative to the logit scale against parts' tolerance for the dtype (`parts.decomposition.exactness`).

Before anything is built the memory is estimated and a shape that will not fit is refused with one line
naming the estimate and the `--batch-size` or `--device` that would fit.

The tokenizer is the embedded SmolLM2 tokenizer cut to the shape's vocabulary (Llama-2 and Mistral: 32,000):
its byte-level BPE numbers every merge after its parts, so the first 32,000 tokens and the merges among them
are a complete tokenizer whose ids all stay below 32,000 (prompts get a few tokens longer than with the full
vocabulary). The MoE shape's vocabulary (50,304) is larger than the tokenizer's (49,152): used whole.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from parts.data.prompts import build_prompts
from parts.data.tasks import get_task
from parts.decomposition import decompose
from parts.decomposition.decompose import ESTIMATE_MARGIN, free_memory_bytes, prompt_memory_bytes
from parts.decomposition.exactness import reconstruction_tolerance, relative_reconstruction_error
from parts.errors import PartsError
from parts.model.loading import DTYPES, _embedded_checkpoint, from_hf
from parts.model.preflight import check_device

RESULTS = Path(__file__).with_name("results.md")
SECTION = "\n## Scale check: "  # the section of results.md the rows are appended to
GIB = 2**30
TASK = "sst2"
# (label, shots, test prompts): the prompt sets.
PROMPT_SETS = (("sst2 4-shot", 4, 8), ("sst2 24-shot", 24, 2))
# What the process adds to its size at the start (torch, transformers, the tokenizer, the prompts) besides the
# weights and a batch: the bridge's objects, the readout, the prefix cache's copies, the saved runs.
RUNTIME_BYTES = GIB // 4


@dataclass(frozen=True)
class Shape:
    """A model shape: its transformers config class and keywords, and why it is this one."""

    config_class: str
    config: dict[str, Any]
    about: str


LLAMA_2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
SHAPES: dict[str, Shape] = {
    "tiny": Shape("LlamaConfig", {**LLAMA_2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2},
                  "Llama, 2 layers x 4 heads (2 KV), d_model 64, Llama-2's vocabulary: the CI smoke test"),
    "llama-2-7b": Shape("LlamaConfig", LLAMA_2_7B, "Llama-2-7B: 32 layers x 32 heads, d_model 4096, d_mlp 11008"),
    # Mistral-7B-v0.1: grouped-query attention (8 KV heads), a 4,096-token sliding window, d_mlp 14336.
    "mistral-7b": Shape("MistralConfig", {**LLAMA_2_7B, "intermediate_size": 14336, "num_key_value_heads": 8,
                                          "sliding_window": 4096, "max_position_embeddings": 32768},
                        "Mistral-7B-v0.1: 32 layers x 32 heads (8 KV), d_model 4096, d_mlp 14336"),
    # OLMoE-1B-7B: 6.9B parameters in all (13.8 GB in bf16), the largest MoE release that fits this machine;
    # Mixtral-8x7B (47B) does not. OLMoE is a family parts splits exactly (tests/test_families.py, MOE_FAMILIES).
    "moe-7b": Shape("OlmoeConfig", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                        num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                        num_experts_per_tok=8, max_position_embeddings=4096, rms_norm_eps=1e-5),
                    "OLMoE-1B-7B: 16 layers x 16 heads, d_model 2048, 64 experts (d_mlp 1024), top 8"),
}


def shape_config(shape: str, layers: int | None = None) -> Any:
    """The transformers config of a shape (with `layers` of its layers, if given), untied, never pretrained."""
    import transformers

    spec = SHAPES[shape]
    keywords = {**spec.config, "tie_word_embeddings": False, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2}
    if layers is not None:
        if not 1 <= layers <= spec.config["num_hidden_layers"]:
            raise PartsError(f"--layers must be 1 to {spec.config['num_hidden_layers']} for {shape}, got {layers}")
        keywords["num_hidden_layers"] = layers
    config = getattr(transformers, spec.config_class)(**keywords)
    config.architectures = [spec.config_class.replace("Config", "ForCausalLM")]
    return config


# -- the tokenizer -------------------------------------------------------------------------------------------
def vocabulary_tokenizer(vocab_size: int, folder: Path) -> Any:
    """The embedded SmolLM2 tokenizer with only its first `vocab_size` tokens (and the merges among them),
    saved to `folder` (the bridge resolves a tokenizer by its folder, offline)."""
    from transformers import AutoTokenizer

    source = _embedded_checkpoint()
    if vocab_size >= len(json.loads((source / "tokenizer.json").read_text())["model"]["vocab"]):
        return AutoTokenizer.from_pretrained(source)
    spec = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: index for token, index in spec["model"]["vocab"].items() if index < vocab_size}
    # A byte-level BPE trained by `tokenizers` numbers merge k's result after every earlier token, so the merges
    # whose result is kept only combine kept tokens.
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [merge for merge in spec["model"]["merges"] if "".join(merge) in vocab]
    spec["added_tokens"] = [token for token in spec["added_tokens"] if token["id"] < vocab_size]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            (folder / name).write_text((source / name).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


# -- memory ---------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise PartsError(f"/proc/self/status has no {field}: the scale check measures memory on Linux only")


def reset_peak(device: torch.device) -> None:
    """Start a new peak: VmHWM back to the current resident size (on CUDA also the allocator's peak)."""
    Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def resident_bytes(device: torch.device) -> int:
    """What the process holds now: resident bytes on a CPU (freed heap the allocator kept included), allocated
    bytes on a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS")


def peak_bytes(device: torch.device) -> int:
    """The peak since `reset_peak`: resident bytes on a CPU, allocated bytes on a GPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return _status_bytes("VmHWM")


def meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model's modules with every parameter on the meta device (no memory), buffers real (rotary tables)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def planner_config(config: Any) -> SimpleNamespace:
    """The bridge config fields `prompt_memory_bytes` reads, from the transformers config (before any bridge)."""
    d_mlp = config.intermediate_size * getattr(config, "num_experts_per_tok", 1)  # an MoE token runs top-k experts
    return SimpleNamespace(n_heads=config.num_attention_heads, n_key_value_heads=config.num_key_value_heads,
                           d_head=config.hidden_size // config.num_attention_heads, d_model=config.hidden_size,
                           d_mlp=d_mlp, n_layers=config.num_hidden_layers, d_vocab=config.vocab_size)


def batch_bytes(cfg: Any, token_lists: Sequence[Sequence[int]], prefix_length: int, element_bytes: int,
                batch_size: int) -> int:
    """The batch planner's estimate for a batch of the longest prompts (`parts.decomposition.decompose`)."""
    longest = max(len(t) for t in token_lists) - prefix_length
    return batch_size * ESTIMATE_MARGIN * prompt_memory_bytes(cfg, longest, prefix_length, element_bytes)


def check_fits(shape: str, weights: int, batches: dict[int, int], base: int, available: int, device: str,
               batch_size: int | str) -> int:
    """The estimated peak (bytes) at `batch_size` (`batches`: batch size -> the planner's estimate for the longest
    prompt set), or a one-line refusal naming the estimate and the batch size or device that would fit."""
    requested = max(batches) if batch_size == "auto" else int(batch_size)
    need = base + weights + batches.get(requested, batches[max(batches)] * requested // max(batches))
    if need <= available:
        return need
    fitting = [size for size, extra in sorted(batches.items()) if base + weights + extra <= available]
    where = "free GPU memory" if device.startswith("cuda") else "available memory"
    smallest = (base + weights + batches[1]) / GIB
    on_gpu = (RUNTIME_BYTES + weights + batches[1]) / GIB  # the process's own memory stays on the host
    if fitting:
        fix = f"--batch-size {max(fitting)} fits"
    elif device == "cpu":
        fix = f"--device cuda on a GPU with {on_gpu:.1f} GiB free, or --batch-size 1 with {smallest:.1f} GiB free here"
    else:
        fix = f"a GPU with {smallest:.1f} GiB free"
    raise PartsError(
        f"shape {shape} does not fit: about {need / GIB:.1f} GiB needed (weights {weights / GIB:.1f} GiB, batch of "
        f"{requested} {batches.get(requested, 0) / GIB:.2f} GiB, process {base / GIB:.1f} GiB) against "
        f"{available / GIB:.1f} GiB of {where}: {fix}"
    )


# -- the model --------------------------------------------------------------------------------------------------
def materialise(model: nn.Module, dtype: torch.dtype, device: torch.device, std: float, seed: int) -> None:
    """Give every meta parameter storage in `dtype` on `device`, one tensor at a time, drawn as transformers
    initialises these families: norm weights 1, biases 0, every other weight normal(0, std)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        for name, parameter in list(module._parameters.items()):
            if parameter is None:
                continue
            value = torch.empty(parameter.shape, dtype=dtype, device=device)
            if is_norm and name == "weight":
                value.fill_(1.0)
            elif name == "bias":
                value.zero_()
            else:
                value.normal_(0.0, std, generator=generator)
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
    model.to(device)  # the buffers (rotary frequencies), made on the CPU


def build_model(shape: str, config: Any, tokenizer: Any, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """A bridge over the shape with random weights, built in `dtype` on `device` without a float32 copy."""
    hf_model = meta_model(config, dtype)
    materialise(hf_model, dtype, device, config.initializer_range, seed)
    hf_model.eval()
    return from_hf(hf_model, tokenizer, f"{shape}-shape+random-init-s{seed}")


# -- the check ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def recording_batch_size(chosen: list[dict[str, Any]]) -> Iterator[None]:
    """Record what the decomposer's batch planner decided (batch size, prefix, its estimate) for every call."""
    plan = decompose.resolve_batch_size

    def recorded(batch_size: Any, model: Any, token_lists: Sequence[Sequence[int]], prefix_length: int) -> int:
        size = plan(batch_size, model, token_lists, prefix_length)
        chosen.append({"batch_size": size, "prefix_length": prefix_length,
                       "estimate": batch_bytes(model.cfg, token_lists, prefix_length, model.W_U.element_size(), size)})
        return size

    decompose.resolve_batch_size = recorded
    try:
        yield
    finally:
        decompose.resolve_batch_size = plan


def say(message: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="build only this many of the shape's layers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch-size", default="auto", help="auto (default) or a number")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--available-gib", type=float, default=None,
                        help="memory to plan against instead of what is free now (to test the refusal)")
    parser.add_argument("--data-dir", default=os.environ.get("PARTS_DATA_DIR"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record", action="store_true", help=f"append the rows to {RESULTS.name}")
    args = parser.parse_args(argv)
    batch_size: int | str = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    check_device(args.device)  # `cuda` on a machine without one: refused in one line, as parts does
    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise PartsError(f"--device {args.device}: the scale check runs on cpu or cuda")
    element_bytes = torch.empty((), dtype=dtype).element_size()

    # 1. Everything but the weights: config, tokenizer, prompts, and the memory they will need.
    config = shape_config(args.shape, args.layers)
    workdir = Path(tempfile.mkdtemp(prefix="parts-scale-"))
    tokenizer = vocabulary_tokenizer(config.vocab_size, workdir / "tokenizer")
    task = get_task(TASK)
    prompt_sets = [(label, build_prompts(task, 1, args.seed, shots, "test", n, args.data_dir))
                   for label, shots, n in PROMPT_SETS]
    token_lists = {label: [tokenizer(p)["input_ids"] for p in prompts.prompts] for label, prompts in prompt_sets}
    out_of_range = max(max(max(t) for t in lists) for lists in token_lists.values())
    assert out_of_range < config.vocab_size, f"token id {out_of_range} >= vocabulary {config.vocab_size}"
    weights = parameter_bytes(meta_model(config, dtype), dtype)
    cfg = planner_config(config)
    cap = decompose.MAX_AUTO_BATCH_SIZE_CPU if device.type == "cpu" else decompose.MAX_AUTO_BATCH_SIZE
    batches = {size: max(batch_bytes(cfg, lists, len(os.path.commonprefix(lists)), element_bytes, min(size, len(lists)))
                         for lists in token_lists.values()) for size in range(1, cap + 1)}
    start = _status_bytes("VmRSS") if device.type == "cpu" else 0  # this process now (on a GPU: none of it)
    available = (int(args.available_gib * GIB) if args.available_gib is not None
                 else free_memory_bytes(device) + start)
    estimate = check_fits(args.shape, weights, batches, start + RUNTIME_BYTES, available, args.device, batch_size)

    # 2. The model, in the dtype from the start.
    say(f"{args.shape}: {weights / GIB:.1f} GiB of {args.dtype} weights, about {estimate / GIB:.1f} GiB in all "
        f"({available / GIB:.1f} GiB available); building")
    reset_peak(device)
    started = time.perf_counter()
    model = build_model(args.shape, config, tokenizer, dtype, device, args.seed)
    build_seconds = time.perf_counter() - started
    build_peak = peak_bytes(device)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"built in {build_seconds:.0f} s, peak {build_peak / GIB:.2f} GiB")

    # 3. The prompt sets, decomposed and saved as a sweep would.
    from parts.experiments.runner import decompose_task

    rows = []
    for label, prompts in prompt_sets:
        chosen: list[dict[str, Any]] = []
        say(f"decomposing {label} ({len(prompts)} prompts)")
        reset_peak(device)
        before = resident_bytes(device)
        started = time.perf_counter()
        with recording_batch_size(chosen):
            run = decompose_task(model, task, 1, args.seed, prompts.shots, "test", len(prompts), batch_size=batch_size,
                                 progress=False, data_dir=args.data_dir, allow_inexact=True)  # checked below, once recorded
        seconds = time.perf_counter() - started
        peak = max(peak_bytes(device), build_peak)
        folder = run.save(workdir / "runs" / label.replace(" ", "-"))
        error = float(relative_reconstruction_error(run.component_logits, run.remainder, run.model_logits).max())
        lengths = [len(t) for t in run.token_ids or []]
        rows.append({
            "prompts": label, "n": run.n_examples,
            "tokens": f"{min(lengths)}-{max(lengths)} ({chosen[0]['prefix_length']} shared)",
            "batch" if batch_size == "auto" else "batch (given)": chosen[0]["batch_size"],
            "resident before GiB": before / GIB, "peak GiB": peak / GIB,
            "estimate GiB": (start + weights + RUNTIME_BYTES + max(c["estimate"] for c in chosen)) / GIB,
            "batch estimate GiB": max(c["estimate"] for c in chosen) / GIB,
            "run folder MB": folder_bytes(folder) / 1e6, "s / prompt": seconds / run.n_examples,
            "max recon. error": error, "tolerance": reconstruction_tolerance(dtype),
        })
    result = {"shape": args.shape, "layers": config.num_hidden_layers, "params": n_params, "weights GiB": weights / GIB,
              "estimate GiB": estimate / GIB, "build s": build_seconds, "build peak GiB": build_peak / GIB,
              "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(), "rows": rows,
              "workdir": str(workdir)}
    table = markdown(result)
    print(table)
    if args.record:
        record(result, table, argv if argv is not None else sys.argv[1:])
    worst = max(rows, key=lambda row: row["max recon. error"])
    if worst["max recon. error"] > worst["tolerance"]:
        raise PartsError(f"{worst['prompts']}: the components miss the model's logits by {worst['max recon. error']:.2e} "
                         f"of the logit scale, over the {args.dtype} tolerance {worst['tolerance']:g}: a bug to fix")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The rows as a markdown table, one per prompt set."""
    layers = f"{result['layers']} of {SHAPES[result['shape']].config['num_hidden_layers']}"
    head = ["shape", "layers", "params", "dtype", "device", "build s", "build peak GiB", *result["rows"][0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        params = f"{result['params'] / 1e9:.2f}B" if result["params"] >= 1e9 else f"{result['params'] / 1e6:.1f}M"
        cells = [result["shape"], layers, params, result["dtype"], result["device"],
                 f"{result['build s']:.0f}", f"{result['build peak GiB']:.2f}"]
        cells += [f"{v:.2e}" if k == "max recon. error" else f"{v:.2f}" if isinstance(v, float) else str(v)
                  for k, v in row.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record(result: dict[str, Any], table: str, argv: Sequence[str]) -> None:
    """Append the table to benchmarks/results.md's scale check section with the command, date, machine and load."""
    import transformers

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    section = (f"\n### {when}: `python benchmarks/scale_check.py {' '.join(argv)}` on {platform.node()} "
               f"({platform.machine()}, {os.cpu_count()} CPUs), torch {torch.__version__}, transformers "
               f"{transformers.__version__}, torch threads {result['threads']}; load average {load}\n\n{table}\n")
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    start = text.find(SECTION)
    end = text.find("\n## ", start + 1) if start >= 0 else -1
    # At the end of the scale check's section, wherever later sections have been appended since.
    text = text + section if end < 0 else text[:end] + section + text[end:]
    RESULTS.write_text(text)


if __name__ == "__main__":
    try:
        main()
    except PartsError as err:
        sys.exit(f"error: {err}")
