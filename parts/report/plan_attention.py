"""A plan before `parts report --attention` (`--dry-run`): the forwards that capture the top heads' attention, their
memory, the attention.js files and the time, from the model's config and tokenizer alone (no weights load).

Per task page (`parts.report.attention.attention_data` on its reference run), counted as it runs:

- where the run records its token ids, source attribution of the chosen examples (`run_sources`): a `Decomposer`
  call of batch size 8 with prefix reuse (the shared prefix once, then the suffixes longest first), then the
  example padded most run alone, in full (`attribute_sources`' own check, run every time);
- one TransformerLens `run_with_cache` forward of the full prompt per example, for all the task's heads
  (`heads_attention_from_last_token`): batch 1, every position unembedded.

Nothing is cached: the report is rebuilt, so every task is to do. Only the attention.js files are counted on disk
(the rest of the report is what the plain `parts report` writes): exact but for the numbers' digits, which are
known only once the model ran (`attention_file_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parts.analysis.inspect_head import view_tokens
from parts.experiments.plan import (
    ATTENTION_EFFICIENCY,
    GIB,
    LINEAR_EFFICIENCY,
    SECONDS_PER_BATCH_LAYER,
    SECONDS_PER_WEIGHT_BYTE,
    Call,
    Plan,
    Planner,
    Setting,
    Target,
    element_bytes,
    format_seconds,
)
from parts.report.attention import example_choice
from parts.report.data import TaskRuns
from parts.report.site import _call, count

# Fixed costs beside the forwards' FLOPs, in CPU seconds (`time.process_time`, one thread, niced, on this project's
# 2-core VM while other work ran): the embedded model (SmolLM2-135M, float32) on a `parts sweep --task sst2 --limit 4`
# run, `parts report --attention` with --heads 4 --examples 4 (16 views of 116-138 tokens: 9.93 s, of which the FLOP
# model gives 7.93 s at the CPU-time probe rate of 77 GFLOP/s; source attribution 1.38 s, FLOP model 1.17 s) and
# with --heads 2 --examples 2 (4 views: 2.53 s against 2.19 s; sources 1.20 s against 1.02 s at 70 GFLOP/s).
# Checked on the main table's runs (8 tasks, 5 heads, 3 examples): 203 s of CPU time for the attention (492 s with
# --attention less 289 s without, one run each) against 199 s planned at cpu-1core's recorded rate.
SECONDS_PER_VIEW = 0.1  # one view's forward beyond its FLOPs (0.08-0.13 s measured): run_with_cache's hooks, eager attention
SECONDS_PER_SOURCES = 0.2  # per task (0.18-0.21 s measured): the capture's set-up, readout and sum check
SOURCES_BATCH = 8  # run_sources' batch size (`parts.analysis.inspect_head.run_sources`)
# The numbers the model fills attention.js with, as JSON text: attention rounded to 4 decimals ("0.0" to "0.1234")
# and votes of 4 significant digits (mostly tiny, "1.234e-05"; "0.0" the shortest). Measured on the embedded model:
# patterns 4.78 characters on average and votes 9.29 on the main table's runs (8 tasks, 5 heads, 3 examples), 3.85
# and 9.38 on a 4-example sst2 run (2 heads, 2 examples); typical here: 5 and 9.
TYPICAL_PATTERN, TYPICAL_VOTE = 0.001, 1.234e-05
SHORTEST_NUMBER, LONGEST_PATTERN, LONGEST_VOTE = 0.0, 0.1234, -1.234e-05


@dataclass
class ViewCall(Call):
    """One attention view: the full prompt as a batch of one, its logits unembedded at every position (the bridge's
    forward, not the decomposition's last-position readout)."""

    @property
    def logit_rows(self) -> int:
        return self.tokens


@dataclass
class AttentionPlan(Plan):
    """The plan of `parts report --attention`: per task its source-attribution calls and attention views."""

    views: int = 0  # head x example: the patterns shown
    view_forwards: int = 0  # their model calls: one per example
    sources: int = 0  # tasks with source attribution
    heads: int = 0
    examples: int = 0

    @property
    def forwards(self) -> int:
        """Model calls: each call's shared prefix, batches and check (a view is one)."""
        return sum(len(c.batches) + (1 if c.prefix else 0) + (1 if c.check_tokens else 0) for c in self.calls)

    def seconds(self) -> float:
        linear, attention = self.flops()
        batches = self.forwards
        load = self.loads * self.shape.weights_bytes(element_bytes(self.dtype)) * SECONDS_PER_WEIGHT_BYTE
        return (linear / (self.rate * LINEAR_EFFICIENCY) + attention / (self.rate * ATTENTION_EFFICIENCY)
                + batches * self.shape.n_layers * SECONDS_PER_BATCH_LAYER + self.view_forwards * SECONDS_PER_VIEW
                + self.sources * SECONDS_PER_SOURCES + load)

    def describe(self) -> str:
        shape = self.shape
        weights = shape.weights_bytes(element_bytes(self.dtype))
        lines = [
            f"parts report --attention --dry-run: {shape.name}, {self.dtype}, on {self.device} (no weights loaded)",
            f"tasks        {len(self.settings)} to capture (the report is rebuilt: nothing cached)",
            f"heads        {self.heads} per task of {shape.n_layers * shape.n_heads} "
            f"({shape.n_layers} layers x {shape.n_heads} heads), {self.examples} examples each: "
            f"{count(self.views, 'attention view')}",
            f"forwards     {self.forwards} model calls ({self.forwards - self.view_forwards} for source attribution in "
            f"{count(self.sources, 'task')}, {self.view_forwards} for the views), {self.forwarded:,} tokens forwarded"
            + self.tokenizer_note,
            f"memory       {weights / GIB:.2f} GiB of weights + {(self.peak_bytes - weights) / GIB:.2f} GiB for the "
            f"largest batch = {self.peak_bytes / GIB:.2f} GiB peak; batch size {SOURCES_BATCH} (sources) / 1 (views) "
            f"of {self.free_bytes / GIB:.1f} GiB free",
            f"disk         {self.disk_bytes / 1e6:,.3f} MB in {len(self.files)} attention.js files (exact but for the "
            "numbers' digits; the rest is the plain report's)",
            f"time         about {format_seconds(self.seconds())} at {self.rate / 1e9:,.0f} GFLOP/s "
            f"({self.rate_source}); cost model: parts.report.plan_attention",
            "not counted  the plain report's own work (its pages and main table, as `parts report` without "
            "--attention: no model)",
        ]
        return "\n".join(lines)


def attention_file_bytes(key: str, run: Any, heads: Sequence[str], tokenizer: Any, chosen: Sequence[int],
                         pattern: float = TYPICAL_PATTERN, vote: float = TYPICAL_VOTE, predicted: int | None = None
                         ) -> int:
    """attention.js's bytes as `parts.report.attention.attention_data` writes it, every number the model fills given
    as `pattern` (attention) and `vote` (a source's contribution), every head predicting label `predicted` (None:
    the label of the longest name). Exact for the model's own numbers; with the typical ones an estimate, between
    the shortest and longest numbers' sizes."""
    shown, lengths = [], []
    for example in chosen:
        ids, tokens, positions = view_tokens(tokenizer, run, example)
        shown.append({"example": example, "gold": run.prompts.label_names[run.prompts.labels[example]],
                      "tokens": tokens, "label_positions": positions})
        lengths.append(len(ids))
    data: dict[str, Any] = {"run": 0, "examples": shown, "heads": {h: [[pattern] * n for n in lengths] for h in heads}}
    if run.token_ids is not None:
        names = run.prompts.label_names
        label = max(range(len(names)), key=lambda i: len(names[i])) if predicted is None else predicted
        data["contributions"] = {h: [[vote] * n for n in lengths] for h in heads}
        data["predicted"] = {h: [names[label]] * len(lengths) for h in heads}
    return len(_call("addAttention", key, data).encode())


def attention_plan(target: Target, tasks: Sequence[tuple[TaskRuns, list[str]]], examples: int,
                   out: str | Path) -> AttentionPlan:
    """The plan of `parts report --attention` on `target` for `tasks` (each with the heads the report shows)."""
    plan = AttentionPlan("report", target.shape, target.dtype, target.device, target.device_kind, target.free_bytes,
                         target.rate, target.rate_source, tokenizer_note=target.tokenizer_note, auto=False)
    weights = target.shape.weights_bytes(element_bytes(target.dtype))
    for task, heads in tasks:
        run = task.reference
        chosen = example_choice(run, examples)
        calls: list[Call] = []
        if run.token_ids is not None:
            # attribute_sources checks its one padded prompt every time: no earlier call counts as verified.
            planner = Planner(target.shape, target.dtype, target.device_kind, max(0, target.free_bytes - weights),
                              SOURCES_BATCH, True, verified_padding=10**9)
            recorded = [list(run.token_ids[e]) for e in chosen]
            call = planner.call(f"{task.key} sources", recorded)
            order = sorted(range(len(recorded)), key=lambda i: -len(recorded[i]))
            padding = {order[row]: len(recorded[order[start]]) - len(recorded[order[row]])
                       for start in range(0, len(order), call.batch_size)
                       for row in range(start, min(start + call.batch_size, len(order)))}
            alone = recorded[max(padding, key=lambda i: padding[i])]
            calls += [call, planner.call(f"{task.key} check", [alone])]
            plan.sources += 1
        for example in chosen:  # one forward per example for all the heads
            n = len(view_tokens(target.tokenizer, run, example)[0])
            calls.append(ViewCall(f"{task.key} view", 1, n, 0, 1, [(1, n)], 0, n))
        plan.views += len(chosen) * len(heads)
        plan.view_forwards += len(chosen)
        plan.heads, plan.examples = max(plan.heads, len(heads)), max(plan.examples, len(chosen))
        size = attention_file_bytes(task.key, run, heads, target.tokenizer, chosen)
        plan.settings.append(Setting(task.key, False, calls, {str(Path(out) / "data" / task.key / "attention.js"): size}))
    plan.loads = int(bool(plan.settings))
    return plan
