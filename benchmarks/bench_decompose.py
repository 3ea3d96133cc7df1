"""Benchmark: decomposition against a plain forward pass, with and without demonstration-prefix reuse.

    python benchmarks/bench_decompose.py                       # embedded model, CPU: sst2:4, rte:4, sst2:24
    python benchmarks/bench_decompose.py --model llama-2-7b-shape --device cuda --dtype bfloat16 --batch-size 32

Paths, all over the same test prompts (template 1, seed 0), the same batches (sorted by length,
left-padded) and the same dtype:

- plain: the Hugging Face model's own forward (a pristine copy, no bridge, no hooks), logits at the
  last position only (`logits_to_keep=1`, the cheapest honest way to get an ICL prediction);
- plain-all: the same with logits at every position;
- decomposition: `parts.decomposition.decompose.Decomposer` over full prompts (everything up to component_logits),
  with its default engine (the model's own modules, SDPA attention, torch hooks at the last position);
- bridge: the same through TransformerLens's `run_with_cache` (`engine="bridge"`, the reference);
- prefix reuse: the default engine with the shared demonstrations' keys and values computed once.

Times are medians over `--repeats` rounds that interleave the paths, so load from other processes
hits them alike. Peak memory is measured per path in a fresh subprocess: on CPU the peak resident
set size (VmHWM, reset after the model is loaded) minus the resident size before the path runs; on
CUDA `torch.cuda.max_memory_allocated` minus the allocation before. The table is printed and
appended, with the date, machine, versions and load average, to benchmarks/results.md.

`--model llama-2-7b-shape` builds a randomly initialised Llama-2-7B-shaped model (32 layers, 32 heads,
d_model 4096, d_mlp 11008) with the embedded model's tokenizer (so its vocabulary, 49,152 tokens,
instead of Llama's 32,000), for GPU timing without downloading weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from parts.data.prompts import build_prompts, label_token_ids
from parts.data.tasks import get_task
from parts.decomposition.decompose import Decomposer, resolve_batch_size
from parts.errors import PartsError
from parts.model.loading import DTYPES, from_hf
from parts.model.locations import EMBEDDED_ALIASES, EMBEDDED_MODEL

RESULTS = Path(__file__).with_name("results.md")
LLAMA_7B_SHAPE = "llama-2-7b-shape"
PATHS = ("plain", "plain-all", "decomposition", "bridge", "prefix-reuse")
MEMORY_PATHS = PATHS


@dataclass(frozen=True)
class Case:
    task: str
    shots: int
    examples: int


def parse_cases(tasks: str | None, shots: str | None, examples: int | None) -> list[Case]:
    """The issue's cases (4-shot sst2, 16 examples of 130 tokens; 4-shot rte, 8 of 420; 24-shot
    sst2, 8 of 840), or tasks x shots with `examples` each (default 16)."""
    if tasks is None and shots is None:
        return [Case("sst2", 4, examples or 16), Case("rte", 4, examples or 8), Case("sst2", 24, examples or 8)]
    task_names = (tasks or "sst2,rte").split(",")
    shot_counts = [int(s) for s in (shots or "4").split(",")]
    return [Case(t.strip(), k, examples or 16) for t in task_names for k in shot_counts]


# -- models ------------------------------------------------------------------------------


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """A pristine Hugging Face model (the plain baseline) and a bridge over an identical copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parts.model.loading import _embedded_checkpoint, _randomize

    dtype = DTYPES[args.dtype]
    device = torch.device(args.device)
    if args.model == LLAMA_7B_SHAPE:
        from transformers import LlamaConfig

        tokenizer = AutoTokenizer.from_pretrained(_embedded_checkpoint())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
            tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)
        with device:  # initialise on the device: a 7B model's init on CPU takes minutes
            hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        name = f"{LLAMA_7B_SHAPE}+random-init"
    else:
        source = _embedded_checkpoint() if args.model in EMBEDDED_ALIASES else args.model
        tokenizer = AutoTokenizer.from_pretrained(source)
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
        name = EMBEDDED_MODEL if args.model in EMBEDDED_ALIASES else args.model
        if args.random_init:
            hf_model = _randomize(hf_model, seed=0)
            name += "+random-init"
    hf_model.eval()
    # The bridge replaces the model's modules with its own: wrap a copy, keep the original pristine.
    bridge = from_hf(copy.deepcopy(hf_model), tokenizer, name)
    return hf_model, bridge


# -- the paths -----------------------------------------------------------------------------


def plain_forward(
    hf_model: Any, token_lists: Sequence[Sequence[int]], batch_size: int, pad_token_id: int, logits_to_keep: int
) -> torch.Tensor:
    """Last-position logits of every prompt from the model's own forward, batched like the decomposer."""
    device = next(hf_model.parameters()).device
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    last = torch.empty(len(token_lists), hf_model.config.vocab_size, dtype=torch.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(token_lists[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(token_lists[i]):] = torch.tensor(token_lists[i])
                mask[row, width - len(token_lists[i]):] = 1
            logits = hf_model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False,
                logits_to_keep=logits_to_keep,
            ).logits
            last[torch.tensor(batch)] = logits[:, -1].float().cpu()
    return last


@dataclass
class Workload:
    """One case, ready to run: prompts, their tokens, and a callable per path."""

    case: Case
    prompts: list[str]
    token_lists: list[list[int]]
    prefix_length: int
    label_ids: list[int]
    batch_size: int
    paths: dict[str, Callable[[], Any]]


def make_workload(hf_model: Any, bridge: Any, case: Case, args: argparse.Namespace) -> Workload:
    task = get_task(case.task)
    prompt_set = build_prompts(task, 1, 0, case.shots, "test", case.examples, args.data_dir)
    label_ids = label_token_ids(bridge.tokenizer, prompt_set.label_words)
    decomposer = Decomposer(bridge, label_ids)
    reference = Decomposer(bridge, label_ids, engine="bridge")
    token_lists = decomposer.tokenize(prompt_set.prompts)
    prefix_length = decomposer.shared_prefix_length(token_lists)
    batch_size = resolve_batch_size(args.batch_size, bridge, token_lists, prefix_length)
    pad = decomposer.pad_token_id

    def run(prefix_reuse: bool, engine: Decomposer = decomposer) -> Callable[[], Any]:
        return lambda: engine(prompt_set.prompts, batch_size=batch_size, prefix_reuse=prefix_reuse, progress=False)

    def plain(logits_to_keep: int) -> Callable[[], Any]:
        return lambda: plain_forward(hf_model, decomposer.tokenize(prompt_set.prompts), batch_size, pad, logits_to_keep)

    paths: dict[str, Callable[[], Any]] = {
        "plain": plain(1),
        "plain-all": plain(0),
        "decomposition": run(False),
        "bridge": run(False, reference),
        "prefix-reuse": run(True),
    }
    return Workload(case, prompt_set.prompts, token_lists, prefix_length, label_ids, batch_size, paths)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_paths(
    workload: Workload, warmup: Workload, device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Median wall and CPU seconds per path over `repeats` interleaved rounds, and each path's
    output in the first round. A two-prompt round first warms up allocators, kernels and weights.

    CPU time (this process's) is what a path costs on a loaded machine, where wall time also counts
    waiting for the other processes' turns."""
    for name in PATHS:
        warmup.paths[name]()
    wall: dict[str, list[float]] = {name: [] for name in PATHS}
    cpu: dict[str, list[float]] = {name: [] for name in PATHS}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name in PATHS:
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            output = workload.paths[name]()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            outputs.setdefault(name, output)

    def median(values: dict[str, list[float]]) -> dict[str, float]:
        return {name: statistics.median(v) for name, v in values.items()}

    return median(wall), median(cpu), outputs


def differences(workload: Workload, outputs: dict[str, Any]) -> dict[str, float]:
    """Max abs differences: reuse vs full prompts, the engines, decomposition vs the plain model, reconstruction."""
    full, reused, bridge = outputs["decomposition"], outputs["prefix-reuse"], outputs["bridge"]
    plain = outputs["plain"][:, workload.label_ids]
    return {
        "reuse_vs_full": float((reused.component_logits - full.component_logits).abs().max()),
        "hf_vs_bridge": float((full.component_logits - bridge.component_logits).abs().max()),
        "logits_vs_plain": float((full.model_logits - plain).abs().max()),
        "reconstruction": float(torch.maximum(full.reconstruction_error, reused.reconstruction_error).max()),
    }


# -- peak memory, one path per process -------------------------------------------------------


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory_here(workload: Workload, warmup: Workload, path: str, device: torch.device) -> float:
    """Peak extra memory (MB) of one run of `path`, in this process, after a one-prompt warm-up
    (which pages in the memory-mapped weights and does any lazy set-up)."""
    warmup.paths[path]()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        workload.paths[path]()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    before = _proc_status_kb("VmRSS")
    workload.paths[path]()
    return (_proc_status_kb("VmHWM") - before) / 1024


def measure_memory(case: Case, path: str, args: argparse.Namespace) -> float:
    """Run one path in a fresh process so no other path's allocations linger in its peak."""
    command = [sys.executable, __file__, "--memory-worker", path, "--tasks", case.task, "--shots", str(case.shots)]
    command += ["--model", str(args.model or "embedded"), "--device", args.device, "--dtype", args.dtype]
    command += ["--batch-size", str(args.batch_size), "--examples", str(case.examples)]
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--random-init"] if args.random_init else []
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    # A fixed mmap threshold makes glibc return every large freed tensor to the system at once, so
    # the resident size follows live memory instead of the allocator's history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(json.loads(output.strip().splitlines()[-1])["peak_mb"])


# -- the table -------------------------------------------------------------------------------

COLUMNS = [
    "model", "device", "dtype", "task", "shots", "batch", "examples", "tokens (prefix)", "plain s", "plain-all s",
    "decomp s", "ratio (CPU time)", "bridge s", "reuse s", "speed-up (CPU time)",
    "plain MB", "plain-all MB", "decomp MB", "mem ratio", "bridge MB", "reuse MB",
    "max diff reuse-full", "max diff hf-bridge", "max diff decomp-plain", "max recon err",
]


def table_row(args: argparse.Namespace, workload: Workload, seconds: dict[str, float], cpu: dict[str, float],
              memory: dict[str, float], diffs: dict[str, float]) -> list[str]:
    mean_tokens = sum(len(t) for t in workload.token_lists) / len(workload.token_lists)
    return [
        str(args.model or "embedded"), args.device, args.dtype, workload.case.task, str(workload.case.shots),
        str(workload.batch_size), str(len(workload.prompts)), f"{mean_tokens:.0f} ({workload.prefix_length})",
        *(f"{seconds[p]:.3f}" for p in ("plain", "plain-all", "decomposition")),
        f"{seconds['decomposition'] / seconds['plain']:.2f}x ({cpu['decomposition'] / cpu['plain']:.2f}x)",
        f"{seconds['bridge']:.3f}", f"{seconds['prefix-reuse']:.3f}",
        f"{seconds['plain'] / seconds['prefix-reuse']:.1f}x ({cpu['plain'] / cpu['prefix-reuse']:.1f}x)",
        *(f"{memory[p]:.0f}" for p in ("plain", "plain-all", "decomposition")),
        f"{memory['decomposition'] / max(memory['plain'], 1e-9):.2f}x", f"{memory['bridge']:.0f}",
        f"{memory['prefix-reuse']:.0f}", f"{diffs['reuse_vs_full']:.1e}", f"{diffs['hf_vs_bridge']:.1e}",
        f"{diffs['logits_vs_plain']:.1e}", f"{diffs['reconstruction']:.1e}",
    ]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def environment(device: torch.device) -> str:
    from importlib.metadata import version

    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine}; torch {torch.__version__}, "
        f"transformer-lens {version('transformer-lens')}, transformers {version('transformers')}, "
        f"torch threads {torch.get_num_threads()}; load average {load}"
    )


def append_results(text: str) -> None:
    """Append to benchmarks/results.md, atomically (`parts.io`): never half-written."""
    from parts import io

    previous = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nAppended by benchmarks/bench_*.py.\n"
    io.write_text(RESULTS, previous.rstrip("\n") + "\n\n" + text + "\n", legacy=io.starts_with("# Benchmark results"))


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help=f"Hugging Face name or folder, {LLAMA_7B_SHAPE}, or the embedded default")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype")
    parser.add_argument("--random-init", action="store_true", help="re-draw the weights (a named model's architecture)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks (default: sst2:4, rte:4, sst2:24)")
    parser.add_argument("--shots", default=None, help="comma-separated shot counts, crossed with --tasks")
    parser.add_argument("--batch-size", default="8", help="prompts per forward pass, or auto (default 8)")
    parser.add_argument("--examples", type=int, default=None, help="test prompts per case (default 16; 8 for rte and 24 shots)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per case; the median is reported (default 3)")
    parser.add_argument("--data-dir", default=os.environ.get("PARTS_DATA_DIR"), help="task data (default $PARTS_DATA_DIR)")
    parser.add_argument("--no-save", action="store_true", help="print the table without appending it to results.md")
    parser.add_argument("--note", default="", help="a line saved above the table")
    parser.add_argument("--memory-worker", choices=MEMORY_PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size != "auto":
        args.batch_size = int(args.batch_size)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cases = parse_cases(args.tasks, args.shots, args.examples)
    hf_model, bridge = load_models(args)
    if args.memory_worker:
        workload = make_workload(hf_model, bridge, cases[0], args)
        warmup = make_workload(hf_model, bridge, Case(cases[0].task, cases[0].shots, 2), args)
        print(json.dumps({"peak_mb": measure_memory_here(workload, warmup, args.memory_worker, device)}))
        return 0
    header = environment(device)
    print(header, flush=True)
    rows = []
    for case in cases:
        workload = make_workload(hf_model, bridge, case, args)
        print(f"{case.task} {case.shots}-shot: {len(workload.prompts)} prompts, batch {workload.batch_size}", flush=True)
        warmup = make_workload(hf_model, bridge, Case(case.task, case.shots, 2), args)
        seconds, cpu_seconds, outputs = time_paths(workload, warmup, device, args.repeats)
        diffs = differences(workload, outputs)
        memory = {path: measure_memory(case, path, args) for path in MEMORY_PATHS}
        rows.append(table_row(args, workload, seconds, cpu_seconds, memory, diffs))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    text = markdown(rows)
    print(text)
    if not args.no_save:
        note = f"{args.note}\n\n" if args.note else ""
        append_results(f"## {header}\n\n{note}{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PartsError as err:
        print(f"bench_decompose: error: {err}", file=sys.stderr)
        sys.exit(2)
