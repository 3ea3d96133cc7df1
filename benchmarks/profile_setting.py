"""One main-table setting of `parts evaluate`, end to end, with each stage's wall and CPU time against its floor.

    python benchmarks/profile_setting.py --task boolq --template 1 --seed 0 --limit 200   # one setting, idle machine
    python benchmarks/profile_setting.py --task sst2 --limit 8                            # smoke test (a minute)
    python benchmarks/profile_setting.py --padding-only --tasks all --limit 200           # padding, tokenizer only

The setting runs exactly as `parts evaluate` runs it (`parts.experiments.evaluate.run_evaluation` on a one-setting
plan, the model loaded once, a fresh output root: nothing is reused), one torch thread by default (`--threads`).
The library's own functions are wrapped from here (nothing in `parts` changes, and nothing costs anything when
this script is not running), and each stage's time is exclusive (a stage's time leaves out the stages nested in it):

- per run of the model (the k-shot test decomposition, the L - k training decomposition, the content-free prompts,
  the L-shot ICL prompts, and with `--gates` the in-forward gates): building and tokenising prompts; the shared
  prefix's forward; the per-batch copy of its keys and values; the batches' forward (the model's own modules);
  the hooks (attaching them, cloning the last position); the readout into component logits; the prefix-reuse
  check's full-prompt forward; the exactness check; the files written;
- per method: its fit and its predictions (CompRW, the oracle, Calib+, the calibrations, the methods beyond
  the paper), and the results table written by the driver.

Every batch's rows and padded width are recorded, so each run's tokens split into the shared prefix, real suffix
tokens, padding and the check's tokens. The floor is the setting's arithmetic at a float32 matmul rate, counted as
benchmarks/results.md counts the main table's 105-minute floor (`parts.experiments.plan.Plan.flops`: 2 x the
blocks' parameters per token forwarded plus the last position's unembedding, and 4 x layers x heads x d_head per
query-key pair of attention), at the rate of this model's own linear layers measured here on one thread
(`--rate` to give one): "floor" counts the real tokens alone (no padding, no check), "schedule" the tokens the
batches ran.

`--padding-only` loads no weights: for each setting it builds the four prompt sets with the tokenizer, as
`parts evaluate` does, and counts padding under the current batching (each set longest first in batches of the
size `auto` picks, `parts.experiments.plan.Planner`) and under one length-sorted schedule of every set that shares
the k-shot prefix (test, training and content-free prompts together). The L-shot set has its own prefix.
`--json PATH` also writes everything printed, for `benchmarks/bench_methods.py --profile`.
"""

from __future__ import annotations

import time

_START_CPU, _START_WALL = time.process_time(), time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parts, not an installed one

import torch  # noqa: E402

import parts.decomposition.decompose as decompose  # noqa: E402
import parts.experiments.evaluate as evaluate  # noqa: E402
import parts.experiments.plan as plan  # noqa: E402
import parts.experiments.runner as runner  # noqa: E402
from parts import io  # noqa: E402
from parts.data.prompts import LABEL_BUDGET, build_prompts, many_shot_order  # noqa: E402
from parts.data.tasks import get_task, load_split  # noqa: E402
from parts.decomposition.runs import DecompositionRun  # noqa: E402
from parts.model.engines import HFEngine  # noqa: E402
from parts.reweighting import calibration, masking, supervised  # noqa: E402

IMPORT_CPU, IMPORT_WALL = time.process_time() - _START_CPU, time.perf_counter() - _START_WALL
MAIN_TASKS = ("sst2", "boolq", "qqp", "wic", "rte", "mnli", "agnews", "arc")
RECORDED_RATE = 95e9  # benchmarks/results.md: a core's float32 avx2 peak on this model's matmuls (the 105-min floor)


# -- the clock ---------------------------------------------------------------------------------------------------
@dataclass
class Batches:
    """What the calls of one run of the model forwarded, as `parts.experiments.plan.Call`s: `calls` as run (the
    prefix once, each batch's rows x padded width, the prefix-reuse check), `alone` each prompt on its own after
    the same prefix (no padding, no check: the floor's work)."""

    calls: list[plan.Call] = field(default_factory=list)
    alone: list[plan.Call] = field(default_factory=list)

    @property
    def prompts(self) -> int:
        return sum(c.prompts for c in self.calls)

    @property
    def prefix(self) -> int:
        return sum(c.prefix for c in self.calls)

    @property
    def real(self) -> int:
        return sum(rows * width for c in self.alone for rows, width in c.batches)

    @property
    def padded(self) -> int:
        return sum(rows * width for c in self.calls for rows, width in c.batches)

    @property
    def check(self) -> int:
        return sum(c.check_tokens for c in self.calls)


class Profile:
    """Exclusive CPU and wall seconds per (run, stage), and the tokens each run forwarded."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[str, str], float] = defaultdict(float)
        self.wall: dict[tuple[str, str], float] = defaultdict(float)
        self.runs: list[str] = []  # the current run of the model (or "methods", "setting")
        self.stages: list[list[Any]] = []  # [key, cpu start, wall start, child cpu, child wall]
        self.tokens: dict[str, Batches] = defaultdict(Batches)
        self.open: list[dict[str, Any]] = []  # the decomposition calls running: prefix, batches, suffixes, check
        self.unsigned_trainings = 0  # evaluate_setting trains the oracle first, then CompRW per budget

    @property
    def run(self) -> str:
        return self.runs[-1] if self.runs else "setting"

    @contextmanager
    def stage(self, name: str, run: str | None = None) -> Iterator[None]:
        if run is not None:
            self.runs.append(run)
        self.stages.append([(self.run, name), time.process_time(), time.perf_counter(), 0.0, 0.0])
        try:
            yield
        finally:
            key, cpu0, wall0, child_cpu, child_wall = self.stages.pop()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            self.cpu[key] += cpu - child_cpu
            self.wall[key] += wall - child_wall
            if self.stages:
                self.stages[-1][3] += cpu
                self.stages[-1][4] += wall
            if run is not None:
                self.runs.pop()

    def inside(self, name: str) -> bool:
        return any(key[1] == name for key, *_ in self.stages)


def wrap(owner: Any, attribute: str, profile: Profile, stage: str | Callable[..., tuple[str, str | None]]) -> None:
    """Time every call of `owner.attribute` as `stage` (or the (stage, run) that `stage(*args, **kwargs)` names)."""
    original = getattr(owner, attribute)

    def timed(*args: Any, **kwargs: Any) -> Any:
        name, run = stage(*args, **kwargs) if callable(stage) else (stage, None)
        with profile.stage(name, run):
            return original(*args, **kwargs)

    setattr(owner, attribute, timed)


RUN_NAMES = {"test": "decomposition: test (k-shot)", "train": "decomposition: train (L - k)"}
WRITE = "write files"
CHECK_FORWARD = "forward: prefix-reuse check (one full prompt)"


def logits_run(path: Path) -> str:
    """The run of the model whose logits `evaluate._cached_logits` keeps at `path`."""
    if path.name.startswith("content-free"):
        return "content-free prompts"
    return "gates" if path.name.startswith("gates") else "L-shot ICL"


def instrument(profile: Profile) -> None:
    """Wrap the names `evaluate_setting` and the decomposition call, where they look them up."""
    p = profile
    # The runs of the model.
    wrap(evaluate, "ensure_run", p, lambda *a, **k: ("other (fingerprints, locks, checks)",
                                                     RUN_NAMES["train" if k.get("split") == "train" else "test"]))
    wrap(evaluate, "label_logits", p, lambda *a, **k: (
        "other (checks)", "content-free prompts" if "content-free" in str(a[-1]) else "L-shot ICL"))
    wrap(evaluate, "many_shot_prompts", p, lambda *a, **k: ("build prompts, tokenise for truncation", "L-shot ICL"))
    wrap(evaluate, "_cached_logits", p, lambda path, *a, **k: ("other (checks)", logits_run(Path(path))))
    wrap(evaluate, "train_gates", p, lambda *a, **k: ("training (forward + backward)", "gates"))
    wrap(evaluate, "gated_logits", p, lambda *a, **k: ("test predictions (check + gated pass)", "gates"))
    wrap(runner, "build_prompts", p, "build prompts")
    wrap(runner, "check_fits_context", p, "tokenise (context check)")
    wrap(runner, "check_finite", p, "other (checks)")
    wrap(DecompositionRun, "from_decomposition", p, "other (checks)")
    # Inside one decomposition call.
    wrap(decompose.Decomposer, "tokenize", p, "tokenise")
    wrap(decompose.Decomposer, "_prefix_reuse_is_exact", p, "prefix-reuse check")
    wrap(decompose.Decomposer, "_split", p, "readout (component logits)")
    wrap(decompose, "check_reconstruction", p, "exactness check")
    wrap(HFEngine, "_attach", p, "hooks (attach)")
    wrap(HFEngine, "_last", p, "hooks (last position)")
    wrap(HFEngine, "run", p, lambda *a, **k: (CHECK_FORWARD if p.inside("prefix-reuse check") else "forward: batches",
                                              None))
    timed_deepcopy = decompose.copy.deepcopy

    def deepcopy(value: Any) -> Any:
        with p.stage("prefix cache copy per batch"):
            return timed_deepcopy(value)

    decompose.copy = types.SimpleNamespace(deepcopy=deepcopy)  # type: ignore[assignment]
    from transformers.cache_utils import Cache

    wrap(Cache, "batch_repeat_interleave", p, "prefix cache copy per batch")
    call = decompose.Decomposer.__call__

    def timed_call(self: Any, prompts: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        p.open.append({"prefix": 0, "batches": [], "suffixes": [], "check": 0})
        try:
            return call(self, prompts, *args, **kwargs)
        finally:
            done = p.open.pop()
            prefix, suffixes, batches = done["prefix"], done["suffixes"], done["batches"]
            if batches:
                tokens, longest = prefix * len(suffixes) + sum(suffixes), prefix + max(suffixes)
                size = max(rows for rows, _ in batches)
                p.tokens[p.run].calls.append(plan.Call(p.run, len(suffixes), tokens, prefix, size, batches,
                                                       done["check"], longest))
                p.tokens[p.run].alone.append(plan.Call(p.run, len(suffixes), tokens, prefix, 1,
                                                       [(1, n) for n in suffixes], 0, longest))

    decompose.Decomposer.__call__ = timed_call  # type: ignore[method-assign]
    wrap(decompose.Decomposer, "__init__", p, "decomposer set-up (layout, readout, engine)")
    prefix_cache = decompose.Decomposer.prefix_cache

    def timed_prefix(self: Any, prefix: Sequence[int]) -> Any:
        with p.stage("forward: shared prefix"):
            if p.open:  # a decomposition call (the gates' runner builds its prefix cache outside one)
                p.open[-1]["prefix"] = len(prefix)
            return prefix_cache(self, prefix)

    decompose.Decomposer.prefix_cache = timed_prefix  # type: ignore[method-assign]
    forward = decompose.Decomposer._forward

    def timed_forward(self: Any, input_ids: torch.Tensor, suffix_lengths: torch.Tensor, cache: Any,
                      prefix_length: int) -> Any:
        batch, width = input_ids.shape
        if not p.open:  # outside a decomposition call: not part of a run's schedule
            pass
        elif p.inside("prefix-reuse check"):
            p.open[-1]["check"] += batch * width
        else:  # a batch of the schedule: its rows x padded width, and each prompt's own suffix length
            p.open[-1]["batches"].append((batch, width))
            p.open[-1]["suffixes"] += [int(n) for n in suffix_lengths.tolist()]
        return forward(self, input_ids, suffix_lengths, cache, prefix_length)

    decompose.Decomposer._forward = timed_forward  # type: ignore[method-assign]
    # Files.
    wrap(io, "write_file", p, WRITE)
    wrap(DecompositionRun, "save", p, WRITE)
    wrap(evaluate, "save_weights", p, WRITE)
    wrap(evaluate, "write_results", p, WRITE)
    wrap(evaluate, "evaluation_table", p, lambda *a, **k: (WRITE + " (results table)", "setting"))
    wrap(evaluate.EvaluateWork, "is_done", p, lambda *a, **k: ("driver: is_done (reads results.csv)", "setting"))
    instrument_methods(p)


def instrument_methods(p: Profile) -> None:
    """Time each method's fit and predictions under its own name (run "methods"), where `evaluate_setting` and
    `beyond_paper_predictions` look them up. CompRW's unsigned training is the oracle's on its first call after
    `p.unsigned_trainings` is reset (`evaluate_setting` trains the oracle first), CompRW's after."""
    def training(*args: Any, **kwargs: Any) -> tuple[str, str]:
        if kwargs.get("signed"):
            return "comprw-signed", "methods"
        p.unsigned_trainings += 1
        return ("oracle" if p.unsigned_trainings == 1 else "comprw"), "methods"

    wrap(evaluate, "train_weights", p, training)
    wrap(evaluate, "predict", p, lambda *a, **k: ("comprw-signed" if k.get("signed") else "comprw", "methods"))
    for name in ("train_calib_plus", "calib_plus_predict"):
        wrap(calibration, name, p, lambda *a, **k: ("calib+", "methods"))
    for name in ("contextual_prior", "contextual_predict"):
        wrap(calibration, name, p, lambda *a, **k: ("contextual", "methods"))
    wrap(calibration, "batch_predict", p, lambda *a, **k: ("batch", "methods"))
    wrap(masking, "mask_biased", p, lambda *a, **k: ("mask-biased", "methods"))
    wrap(masking, "mask_predict", p, lambda *a, **k: ("mask-biased", "methods"))
    fit_probe, fit_affine = supervised.fit_probe, supervised.fit_affine_calibration

    def timed_probe(method: str, *args: Any, **kwargs: Any) -> Any:
        with p.stage(method, "methods"):
            fitted = fit_probe(method, *args, **kwargs)
        fitted._profile_method = method  # which method its predictions are timed under
        return fitted

    def timed_affine(*args: Any, **kwargs: Any) -> Any:
        with p.stage(kwargs.get("method", "calib-affine"), "methods"):
            fitted = fit_affine(*args, **kwargs)
        fitted._profile_method = kwargs.get("method", "calib-affine")
        return fitted

    supervised.fit_probe, supervised.fit_affine_calibration = timed_probe, timed_affine  # type: ignore[assignment]
    wrap(supervised.Fitted, "predict", p, lambda self, *a, **k: (getattr(self, "_profile_method", "probe"), "methods"))


# -- the floor ---------------------------------------------------------------------------------------------------
def matmul_rate(model: Any, rows: int = 320, seconds: float = 2.0) -> float:
    """FLOP/s of this model's own linear layers (one block's weights: attention projections and MLP) on `rows`
    tokens (8 prompts x 40 tokens: a k-shot batch), per CPU second of this process: the rate the floor assumes
    (with several threads, per thread-second summed)."""
    from parts.model.loading import plain_model

    hf = plain_model(model)
    block = hf.model.layers[0] if hasattr(hf, "model") and hasattr(hf.model, "layers") else None
    linears = [m for m in (block or hf).modules() if isinstance(m, torch.nn.Linear)]
    if block is None:
        linears = linears[:7]
    x = {m.in_features: torch.randn(rows, m.in_features, dtype=m.weight.dtype) for m in linears}
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)
    with torch.inference_mode():
        for m in linears:
            torch.nn.functional.linear(x[m.in_features], m.weight)
        runs, start = 0, time.process_time()  # CPU time, as the profile's columns: less sensitive to other load
        while time.process_time() - start < seconds:
            for m in linears:
                torch.nn.functional.linear(x[m.in_features], m.weight)
            runs += 1
        elapsed = time.process_time() - start
    return flops * runs / elapsed


def flops(shape: plan.ModelShape, calls: Sequence[plan.Call], rate: float) -> tuple[float, float]:
    """(FLOPs, seconds at `rate`) of `calls`, counted by `parts.experiments.plan.Plan.flops`."""
    counted = plan.Plan("profile", shape, "float32", "cpu", "cpu", 0, rate, "", [plan.Setting("", False, list(calls))])
    linear, attention = counted.flops()
    return linear + attention, (linear + attention) / rate


# -- the padding analysis (no weights) ----------------------------------------------------------------------------
def prompt_sets(tokenizer: Any, n_ctx: int, task_name: str, template: int, seed: int, limit: int | None,
                data_dir: str | None) -> dict[str, list[str]]:
    """A setting's four prompt sets as `parts.experiments.evaluate.evaluate_setting` builds them (label budget 24)."""
    task = get_task(task_name)
    k = task.default_shots
    test = build_prompts(task, template, seed, k, "test", limit, data_dir)
    train = build_prompts(task, template, seed, k, "train", LABEL_BUDGET - k, data_dir)
    train_rows, test_rows = load_split(task, "train", data_dir), load_split(task, "test", data_dir)
    shown = [train_rows[i] for i in test.demonstrations]
    rendered = task.template(template)
    drawn = shown + [train_rows[i] for i in train.example_indices]
    labelled = [drawn[i] for i in many_shot_order(task, seed, [d["label"] for d in drawn])]
    queries = [test_rows[i] for i in test.example_indices]
    many, _ = evaluate.many_shot_prompts(tokenizer, rendered, labelled, queries, n_ctx)
    return {"test": list(test.prompts), "train": list(train.prompts),
            "content-free": calibration.content_free_prompts(rendered, shown), "L-shot": many}


def schedules(planners: dict[str, plan.Planner], tokens: dict[str, list[list[int]]]) -> dict[str, list[plan.Call]]:
    """The calls of one setting's tokenised prompt sets under each scheme: as run now (one call per set), with the
    sets sharing the k-shot prefix merged into one call, and with no padding (each set's prompts alone after its
    prefix, no check)."""
    current = [planners["current"].call(name, lists) for name, lists in tokens.items()]
    k_shot = [t for name in ("test", "train", "content-free") for t in tokens[name]]
    merged = [planners["merged"].call("k-shot sets, merged", k_shot), planners["merged"].call("L-shot", tokens["L-shot"])]
    alone = [plan.Call(c.label, c.prompts, c.tokens, c.prefix, 1, [(1, len(t) - c.prefix) for t in tokens[c.label]], 0,
                       c.longest) for c in current]
    return {"current": current, "merged": merged, "none": alone}


def padding_report(args: argparse.Namespace) -> dict[str, Any]:
    """Padding under the current batching and under merged length-sorted batches, over the settings asked for."""
    target = plan.load_target(None, None, "float32", "cpu", "cpu-1core")
    shape, tokenizer = target.shape, target.tokenizer
    tasks = MAIN_TASKS if args.tasks == "all" else tuple(args.tasks.split(","))
    settings = [(t, tp, s) for s in args.seeds for tp in args.templates for t in tasks]
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    free = max(0, target.free_bytes - shape.weights_bytes(4))
    # One planner per scheme for all settings, as one worker process runs them: the prefix-reuse check runs once
    # per model and again only for a call that pads more.
    planners = {name: plan.Planner(shape, "float32", "cpu", free, batch) for name in ("current", "merged")}
    totals: dict[str, dict[str, float]] = {name: defaultdict(float) for name in ("current", "merged", "none")}
    for task, template, seed in settings:
        sets = prompt_sets(tokenizer, shape.n_ctx, task, template, seed, args.limit, args.data_dir)
        tokens = {name: plan.tokenize(tokenizer, prompts) for name, prompts in sets.items()}
        line = []
        for scheme, calls in schedules(planners, tokens).items():
            real = sum(c.tokens - c.prefix * c.prompts for c in calls)
            suffix = sum(rows * width for c in calls for rows, width in c.batches)
            line.append(f"{scheme} {suffix - real:,}")
            totals[scheme]["real"] += real
            totals[scheme]["padding"] += suffix - real
            totals[scheme]["prefix"] += sum(c.prefix for c in calls)
            totals[scheme]["check"] += sum(c.check_tokens for c in calls)
            totals[scheme]["forwarded"] += sum(c.forwarded for c in calls)
            totals[scheme]["flops"] += flops(shape, calls, RECORDED_RATE)[0]
        print(f"{task} t{template} s{seed}: real suffix tokens {real:,}; padding " + ", ".join(line), flush=True)
    names = {"current": "current: each set longest first, batches of `auto` (<= 8)",
             "merged": "test + train + content-free merged, longest first; L-shot apart",
             "none": "no padding, no check (every prompt alone: the floor)"}
    print(f"\nPadding over {len(settings)} setting(s) (tasks {','.join(tasks)}, templates "
          f"{','.join(map(str, args.templates))}, seeds {','.join(map(str, args.seeds))}, n = {args.limit}, batch "
          f"{args.batch_size}; tokens of the embedded tokenizer; FLOPs by parts.experiments.plan)")
    print("| batching | real suffix tokens | padding | padding share of suffix tokens | prefix tokens | check tokens "
          "| tokens forwarded | FLOPs (1e12) | FLOPs vs no padding |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = totals["none"]["flops"]
    for scheme, row in totals.items():
        share = row["padding"] / max(row["real"] + row["padding"], 1)
        print(f"| {names[scheme]} | {row['real']:,.0f} | {row['padding']:,.0f} | {share:.1%} | {row['prefix']:,.0f} "
              f"| {row['check']:,.0f} | {row['forwarded']:,.0f} | {row['flops'] / 1e12:,.2f} | "
              f"{row['flops'] / base:.3f}x |")
    return {"settings": settings, "padding": {k: dict(v) for k, v in totals.items()}}


# -- the profile ---------------------------------------------------------------------------------------------------
STAGE_ORDER = ("build prompts", "build prompts, tokenise for truncation", "tokenise (context check)", "tokenise",
               "forward: shared prefix", "prefix cache copy per batch", "forward: batches", "hooks (attach)",
               "hooks (last position)", "readout (component logits)", "prefix-reuse check", CHECK_FORWARD, "exactness check",
               "training (forward + backward)", "test predictions (check + gated pass)", WRITE,
               "other (checks)", "other (fingerprints, locks, checks)")


def profile_setting(args: argparse.Namespace) -> dict[str, Any]:
    from parts.experiments.driver import given_model
    from parts.experiments.options import RunOptions
    from parts.experiments.runner import ModelSpec
    from parts.model.loading import load_model, plain_model

    profile = Profile()
    instrument(profile)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    model = load_model(device="cpu", dtype="float32")
    load_cpu, load_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    shape = plan.ModelShape.from_config(plain_model(model).config, "embedded")
    rate = args.rate * 1e9 if args.rate else matmul_rate(model)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    options = RunOptions(batch_size=batch, progress=False, dtype="float32", device="cpu", data_dir=args.data_dir)
    settings = evaluate.sweep_settings([args.task], [args.template], [args.seed], args.limit, [LABEL_BUDGET],
                                       gates=args.gates)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        work = evaluate.evaluation_plan(ModelSpec(None), settings, args.out or scratch)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with profile.stage("other (driver, rows)", "setting"):
            evaluate.run_evaluation(work, options, loader=given_model(model))
        setting_cpu, setting_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    load_after = os.getloadavg()

    runs = list(dict.fromkeys(run for run, _ in profile.cpu))
    order = [*RUN_NAMES.values(), "content-free prompts", "L-shot ICL", "gates", "methods", "setting"]
    runs = sorted(runs, key=lambda r: order.index(r) if r in order else len(order))
    label = f"{args.task} t{args.template} s{args.seed}"
    print(f"\n## {label}, n = {args.limit}: per-stage profile of `parts evaluate` (one setting)\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} ({platform.machine()}, "
          f"{os.cpu_count()} CPUs), torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), batch "
          f"{args.batch_size}; load average {load_before[0]:.2f} -> {load_after[0]:.2f}. Setting: {setting_cpu:.1f} CPU s,"
          f" {setting_wall:.1f} wall s; imports {IMPORT_CPU:.1f} CPU s and model load {load_cpu:.1f} CPU s "
          f"({load_wall:.1f} wall s) once per process. Floor at {rate / 1e9:.0f} GFLOP/s "
          f"({'given' if args.rate else 'this model’s linear layers, measured here'}; the recorded peak is "
          f"{RECORDED_RATE / 1e9:.0f}).\n")
    print("| run | stage | CPU s | wall s | share of setting CPU |")
    print("|---|---|---|---|---|")
    result: dict[str, Any] = {"setting": label, "limit": args.limit, "setting_cpu_s": setting_cpu,
                              "setting_wall_s": setting_wall, "import_cpu_s": IMPORT_CPU, "load_cpu_s": load_cpu,
                              "rate_flops": rate, "stages": [], "runs": {}, "load_average": [load_before[0],
                                                                                                  load_after[0]]}
    for run in runs:
        stages = sorted((s for r, s in profile.cpu if r == run),
                        key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))
        for stage in stages:
            cpu, wall = profile.cpu[(run, stage)], profile.wall[(run, stage)]
            result["stages"].append({"run": run, "stage": stage, "cpu_s": cpu, "wall_s": wall})
            print(f"| {run} | {stage} | {cpu:.2f} | {wall:.2f} | {cpu / setting_cpu:.1%} |")
        cpu = sum(profile.cpu[(run, s)] for s in stages)
        wall = sum(profile.wall[(run, s)] for s in stages)
        result["runs"][run] = {"cpu_s": cpu, "wall_s": wall}
        print(f"| **{run}** | **all** | **{cpu:.2f}** | **{wall:.2f}** | **{cpu / setting_cpu:.1%}** |")

    print("\nTokens and the floor per run of the model. floor: the real tokens alone at the rate above; schedule: "
          "the tokens the batches ran (padding, the check); forward: CPU s of the prefix, the batches and the check, "
          "hooks and cache copies included. run / floor = schedule / floor (padding and the check) x forward / "
          "schedule (the forward's own overhead over the matmul rate) x run / forward (all else).\n")
    print("| run | prompts | batches | prefix | real suffix tokens | padding | check | floor s | schedule s "
          "| forward CPU s | run CPU s | schedule / floor | forward / schedule | run / forward | run / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    forward_stages = {"forward: shared prefix", "prefix cache copy per batch", "forward: batches", "hooks (attach)",
                      "hooks (last position)", CHECK_FORWARD}
    total_floor = total_schedule = total_forward = 0.0

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    for run in runs:
        if run not in profile.tokens:
            continue
        t = profile.tokens[run]
        _, floor_s = flops(shape, t.alone, rate)
        _, schedule_s = flops(shape, t.calls, rate)
        forward_cpu = sum(profile.cpu[(run, s)] for s in forward_stages)
        run_cpu = result["runs"][run]["cpu_s"]
        batches = sum(len(c.batches) for c in t.calls)
        total_floor, total_schedule = total_floor + floor_s, total_schedule + schedule_s
        total_forward += forward_cpu
        result["runs"][run].update(prompts=t.prompts, batches=batches, prefix=t.prefix, real=t.real,
                                   padding=t.padded - t.real, check=t.check, floor_s=floor_s, schedule_s=schedule_s,
                                   forward_cpu_s=forward_cpu)
        print(f"| {run} | {t.prompts} | {batches} | {t.prefix:,} | {t.real:,} | {t.padded - t.real:,} | {t.check:,} | "
              f"{floor_s:.2f} | {schedule_s:.2f} | {forward_cpu:.2f} | {run_cpu:.2f} | {ratio(schedule_s, floor_s)} | "
              f"{ratio(forward_cpu, schedule_s)} | {ratio(run_cpu, forward_cpu)} | {ratio(run_cpu, floor_s)} |")
    print(f"| **setting** | | | | | | | **{total_floor:.2f}** | **{total_schedule:.2f}** | **{total_forward:.2f}** | "
          f"**{setting_cpu:.2f}** | {ratio(total_schedule, total_floor)} | {ratio(total_forward, total_schedule)} | "
          f"{ratio(setting_cpu, total_forward)} | **{ratio(setting_cpu, total_floor)}** |")
    result.update(floor_s=total_floor, schedule_s=total_schedule)
    methods = {s: profile.cpu[("methods", s)] for r, s in profile.cpu if r == "methods"}
    beyond = sum(v for k, v in methods.items() if k in BEYOND_PAPER)
    model_runs = sum(v["cpu_s"] for k, v in result["runs"].items() if k not in ("methods", "setting", "gates"))
    rest = setting_cpu - beyond - result["runs"].get("gates", {}).get("cpu_s", 0.0)
    print("\nMethods (fit + predict, CPU s): " + ", ".join(f"{k} {v:.3f}" for k, v in methods.items())
          + f". Beyond the paper (gates apart): {beyond:.3f} CPU s = {beyond / max(rest, 1e-9):.1%} of the setting "
          f"without them and without the gates; the runs of the model: {model_runs:.1f} CPU s.")
    result["methods"] = methods
    return result


BEYOND_PAPER = ("comprw-signed", "probe-resid", "probe-logits", "calib-affine", "mask-biased")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--template", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=200, help="test examples (default 200, the main table's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a Ray worker runs)")
    parser.add_argument("--batch-size", default="auto", help="auto (default, as `parts evaluate`) or a number")
    parser.add_argument("--gates", action="store_true", help="also the in-forward gates (`parts evaluate --gates`)")
    parser.add_argument("--rate", type=float, default=None,
                        help="GFLOP/s the floor assumes (default: this model's linear layers, measured here)")
    parser.add_argument("--out", default=None, help="output root (default: a temporary folder, removed)")
    parser.add_argument("--data-dir", default=None, help="default: $PARTS_DATA_DIR")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--padding-only", action="store_true",
                        help="no weights, no timing: count padding under the current and merged batching")
    parser.add_argument("--tasks", default="all", help="--padding-only: tasks, comma-separated, or all")
    parser.add_argument("--templates", default="1,2,3", help="--padding-only: templates (default 1,2,3)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="--padding-only: seeds (default 0-4)")
    args = parser.parse_args(argv)
    args.templates = [int(x) for x in args.templates.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    if args.padding_only:
        result = padding_report(args)
    else:
        result = profile_setting(args)
        args.tasks, args.templates, args.seeds = args.task, [args.template], [args.seed]
        result |= padding_report(args)
        # The padding analysis builds and counts the prompt sets without the model: check it against what ran.
        measured = [v for k, v in result["runs"].items() if "real" in v and k != "gates"]
        planned = result["padding"]["current"]
        same = (sum(v["real"] for v in measured), sum(v["padding"] for v in measured)) == (planned["real"],
                                                                                          planned["padding"])
        print(f"padding analysis against the profiled run: real and padding tokens {'equal' if same else 'DIFFER'} "
              f"(measured {sum(v['real'] for v in measured):,} + {sum(v['padding'] for v in measured):,}, "
              f"planned {planned['real']:,.0f} + {planned['padding']:,.0f})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
