"""Where the time of `parts evaluate` goes: a per-stage profile of whole settings, and the main table projected.

    python benchmarks/profile_evaluate.py --settings sst2:1:0,boolq:1:0 --limit 200
    python benchmarks/profile_evaluate.py --model tiny --settings sst2:1:0 --limit 8   # smoke test (seconds)

Runs `parts.experiments.evaluate.evaluate_setting` for each setting into a fresh temporary output root
(nothing is reused), with the project's own functions wrapped to time each stage exclusively (a stage's
time excludes the stages nested in it), in this process's CPU seconds and in wall seconds:

- imports (torch, transformers, TransformerLens, parts: once per process) and model load (once);
- decomposition of the test prompts (k-shot), of the L - k training prompts, the content-free prompts,
  the L-shot ICL prompts; CompRW / oracle training; Calib+ and the other calibrations; I/O (saving runs,
  logits, weights, results rows); the rest (prompt building, tokenising for truncation, checks).

Then the 120-setting main table (8 tasks x 3 templates x 5 seeds) at the same test size is projected
from benchmarks/protocol-lengths.json: each model stage's seconds per token, measured here, times that
stage's tokens over all settings (so a long-input task measured here counts for the long-input tasks in
proportion). The other stages scale per setting. The projection assumes the CPU time divides over
`--workers` worker processes (1 torch thread each); the printed table says how loaded the machine was.
"""

from __future__ import annotations

import time

_START_CPU, _START_WALL = time.process_time(), time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parts, not an installed one

import torch  # noqa: E402
from protocol_lengths import MAIN_TASKS, STAGES, Protocol  # noqa: E402

import parts.experiments.evaluate as evaluate  # noqa: E402
import parts.experiments.runner as runner  # noqa: E402
from parts.decomposition.runs import DecompositionRun  # noqa: E402
from parts.experiments.options import RunOptions  # noqa: E402

IMPORT_CPU, IMPORT_WALL = time.process_time() - _START_CPU, time.perf_counter() - _START_WALL
MODEL_STAGES = {"test": "decomposition (test, k-shot)", "train": "decomposition (train, L - k)",
                "content-free": "content-free prompts", "many-shot": "L-shot ICL"}


class StageClock:
    """Exclusive CPU and wall seconds per stage; nested stages are subtracted from their parents."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [stage, cpu start, wall start, child cpu, child wall]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._stack.append([name, time.process_time(), time.perf_counter(), 0.0, 0.0])
        try:
            yield
        finally:
            name, cpu0, wall0, child_cpu, child_wall = self._stack.pop()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            self.cpu[name] += cpu - child_cpu
            self.wall[name] += wall - child_wall
            if self._stack:
                self._stack[-1][3] += cpu
                self._stack[-1][4] += wall


def wrap(owner: Any, attribute: str, clock: StageClock, stage: str | Callable[..., str]) -> None:
    """Time every call of `owner.attribute` under `stage` (or the stage `stage(*args, **kwargs)` names)."""
    original = getattr(owner, attribute)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with clock.stage(stage(*args, **kwargs) if callable(stage) else stage):
            return original(*args, **kwargs)

    setattr(owner, attribute, timed)


def instrument(clock: StageClock) -> None:
    """Wrap the names `evaluate_setting` calls, where it looks them up."""
    wrap(evaluate, "ensure_run", clock, lambda *a, **k: MODEL_STAGES["train" if k.get("split") == "train" else "test"])
    wrap(evaluate, "label_logits", clock,
         lambda *a, **k: MODEL_STAGES["content-free" if "content-free" in str(a[-1]) else "many-shot"])
    wrap(evaluate, "train_weights", clock, "training (CompRW, oracle)")
    for name in ("train_calib_plus", "contextual_prior", "contextual_predict", "batch_predict", "calib_plus_predict"):
        wrap(evaluate.calibration, name, clock, "calibration")
    wrap(DecompositionRun, "save", clock, "I/O")
    wrap(evaluate, "save_weights", clock, "I/O")
    wrap(evaluate, "save_file", clock, "I/O")
    wrap(evaluate, "write_results", clock, "I/O")
    assert runner  # ensure_run is looked up in evaluate's namespace, wrapped above


def load(model: str, dtype: str) -> Any:
    from parts.model.loading import from_hf, load_model

    if model != "tiny":
        return load_model(None if model == "embedded" else model, device="cpu", dtype=dtype)
    # A tiny random Llama (grouped-query, rotary) with the embedded tokenizer: the pipeline in seconds.
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from parts.model.loading import _embedded_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(_embedded_checkpoint())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return from_hf(LlamaForCausalLM(config).to(getattr(torch, dtype)).eval(), tokenizer, "tiny-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="sst2:1:0", help="task:template:seed,... (default sst2:1:0)")
    parser.add_argument("--limit", type=int, default=200, help="test examples per setting (default 200)")
    parser.add_argument("--model", default="embedded", help="embedded (default), tiny, or a model folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--workers", type=int, default=2, help="worker processes the projection divides over")
    parser.add_argument("--out", default=None, help="output root (default: a temporary folder, removed)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    clock = StageClock()
    instrument(clock)
    with clock.stage("model load"):
        model = load(args.model, args.dtype)
    n_ctx = int(model.cfg.n_ctx)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    options = RunOptions(batch_size=batch, progress=False, dtype=args.dtype, device="cpu")
    protocol = Protocol.load()
    measured_tokens: dict[str, int] = defaultdict(int)
    settings = [(t, int(tp), int(s)) for t, tp, s in (item.split(":") for item in args.settings.split(","))]
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or scratch
        for task, template, seed in settings:
            setting = evaluate.sweep_settings([task], [template], [seed], args.limit, [24])[0]
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with clock.stage("other (prompts, tokenising, checks)"):
                evaluate.evaluate_setting(lambda: model, args.model, setting, root, options)
            print(f"{task} t{template} s{seed}: {time.process_time() - cpu0:.1f} CPU s, "
                  f"{time.perf_counter() - wall0:.1f} wall s", flush=True)
            for p in protocol.passes(task, template, seed, args.limit, n_ctx):
                measured_tokens[p.stage] += p.tokens
    load_avg_end = os.getloadavg()

    # Projection: model stages per token, the rest per setting.
    all_settings = protocol.settings()
    full_tokens: dict[str, int] = defaultdict(int)
    for s in all_settings:
        for p in protocol.passes(*s, n_test=args.limit, n_ctx=n_ctx):
            full_tokens[p.stage] += p.tokens
    rows = []
    projected_cpu = 0.0
    stage_names = [*MODEL_STAGES.values(), "training (CompRW, oracle)", "calibration", "I/O",
                   "other (prompts, tokenising, checks)"]
    for name in stage_names:
        key = next((k for k, v in MODEL_STAGES.items() if v == name), None)
        scale = (full_tokens[key] / max(measured_tokens[key], 1)) if key else len(all_settings) / len(settings)
        projection = clock.cpu[name] * scale
        projected_cpu += projection
        rows.append((name, clock.cpu[name], clock.wall[name], projection))
    rows += [("imports (once per process)", IMPORT_CPU, IMPORT_WALL, IMPORT_CPU * args.workers),
             ("model load (once per process)", clock.cpu["model load"], clock.wall["model load"],
              clock.cpu["model load"] * args.workers)]
    projected_cpu += (IMPORT_CPU + clock.cpu["model load"]) * args.workers
    print(f"\n{len(settings)} setting(s) {args.settings} at n={args.limit}, model {args.model} ({args.dtype}), "
          f"batch {args.batch_size}, 1 torch thread; load average {load_avg[0]:.1f} -> {load_avg_end[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print("| stage | CPU s | wall s | projected CPU s, 120 settings |")
    print("|---|---|---|---|")
    for name, cpu, wall, projection in rows:
        print(f"| {name} | {cpu:.1f} | {wall:.1f} | {projection:.0f} |")
    print(f"| **total** | {sum(r[1] for r in rows):.1f} | {sum(r[2] for r in rows):.1f} | {projected_cpu:.0f} |")
    tokens = ", ".join(f"{stage} {measured_tokens[stage]:,} of {full_tokens[stage]:,}" for stage in STAGES)
    print(f"tokens measured here / in the 120 settings: {tokens} (tasks {', '.join(MAIN_TASKS)})")
    print(f"projected main table: {projected_cpu / 60:.0f} CPU minutes = {projected_cpu / 60 / args.workers:.0f} "
          f"minutes of wall time on {args.workers} worker processes, if each has a core of its own")


if __name__ == "__main__":
    main()
