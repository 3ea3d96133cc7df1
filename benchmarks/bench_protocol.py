"""The paper's whole main-table protocol, timed per stage on a model of a given shape, and projected.

    python benchmarks/bench_protocol.py --model llama-2-7b-shape --device cuda --dtype bfloat16   # an H200: ~3 min
    python benchmarks/bench_protocol.py --model tiny --device cpu --limit 8 --no-save               # smoke test

Every method of `parts evaluate` runs with parts' own code on a randomly initialised model (no weights,
no hub, no data, no tokenizer needed): the decomposition of the test prompts (k-shot) and of the L - k
training prompts, the content-free prompts (contextual calibration), the L-shot ICL prompts
(`parts.experiments.evaluate.label_logits`), CompRW and oracle training (`train_weights`), Calib+,
contextual and batch calibration. The prompts are random token ids of the real lengths of each task
(benchmarks/protocol-lengths.json: shared demonstrations, then each test query's own tokens), so prefix
reuse, padding and left truncation to the context window behave as on the real data.

By default one setting per task (template 1, seed 0) at `--limit` test examples is timed, and the full
protocol (8 tasks x 3 templates x 5 seeds, `--full-limit` test examples each, the paper's 2,000 where
a task has them) is projected: each model stage's seconds per token, per task, times that task's tokens
in the full protocol; training and calibration per setting (the oracle's per test example). Before
that, bench_decompose-style rows on sst2's lengths (4 and 24 shots): the model's own forward with
`logits_to_keep=1` over full prompts (plain), the decomposition over full prompts, and the decomposition
with the demonstrations' keys and values reused, in milliseconds per prompt.

`--model llama-2-7b-shape`: Llama-2-7B's shape (32 layers, 32 heads, d_model 4096, d_mlp 11008, vocabulary
32,000, context 4,096), weights drawn on the device. `--model tiny`: a 2-layer grouped-query Llama for
smoke tests. The table is printed and (unless --no-save) appended to benchmarks/results.md;
`--json PATH` also writes every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parts, not an installed one

import torch  # noqa: E402
from bench_decompose import plain_forward  # noqa: E402
from protocol_lengths import MAIN_TASKS, Pass, Protocol  # noqa: E402

from parts.decomposition.decompose import Decomposer  # noqa: E402
from parts.experiments.evaluate import label_logits  # noqa: E402
from parts.experiments.options import RunOptions  # noqa: E402
from parts.model.loading import DTYPES, from_hf  # noqa: E402
from parts.reweighting import calibration  # noqa: E402
from parts.reweighting.reweight import predict, train_weights  # noqa: E402

RESULTS = Path(__file__).with_name("results.md")
TARGET_MINUTES = 15
SHAPES = {
    # name: (layers, heads, key/value heads, d_model, d_mlp, vocabulary, context)
    "llama-2-7b-shape": (32, 32, 32, 4096, 11008, 32000, 4096),
    "tiny": (2, 4, 2, 64, 128, 1000, 4096),
}
MODEL_STAGES = {"test": "decomposition (test, k-shot)", "train": "decomposition (train, L - k)",
                "content-free": "content-free prompts", "many-shot": "L-shot ICL"}


# -- the model ---------------------------------------------------------------------------------


def word_tokenizer(folder: Path, size: int) -> Any:
    """A word-level tokenizer saved to `folder` (the bridge re-reads it by path): prompts here are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]"] + [f"w{i}" for i in range(size - 3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[BOS]")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, folder: Path) -> tuple[Any, Any]:
    """A randomly initialised Llama of `shape` on `device` as a bridge, and a pristine copy (the plain baseline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, heads, kv_heads, d_model, d_mlp, vocab, n_ctx = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=n_ctx,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    with device:  # initialise on the device: a 7B model's initialisation on a CPU takes minutes
        hf_model = LlamaForCausalLM(config).to(dtype).eval()
    tokenizer = word_tokenizer(folder, 64)
    plain = copy.deepcopy(hf_model)  # the bridge replaces the model's modules: keep one untouched
    return from_hf(hf_model, tokenizer, f"{shape}+random-init"), plain


# -- synthetic prompts -----------------------------------------------------------------------


class SyntheticPrompts:
    """Token-id prompts of given lengths, named by strings, so parts' string-taking functions can run them."""

    def __init__(self, vocab: int, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.tokens: dict[str, list[int]] = {}

    def make(self, prefix: int, suffixes: Sequence[int], name: str) -> list[str]:
        shared = torch.randint(3, self.vocab, (prefix,), generator=self.generator).tolist()
        prompts = []
        for i, length in enumerate(suffixes):
            own = torch.randint(3, self.vocab, (length,), generator=self.generator).tolist()
            key = f"{name}#{i}"
            self.tokens[key] = [*shared, *own]  # BOS and demonstrations (the shared prefix), then the query
            prompts.append(key)
        return prompts

    @contextmanager
    def active(self) -> Iterator[None]:
        """Decomposer.tokenize returns these token ids for these names (every Decomposer, as label_logits builds its own)."""
        original = Decomposer.tokenize

        def tokenize(decomposer: Decomposer, prompts: Sequence[str]) -> list[list[int]]:
            return [self.tokens[p] for p in prompts]

        Decomposer.tokenize = tokenize  # type: ignore[method-assign]
        try:
            yield
        finally:
            Decomposer.tokenize = original  # type: ignore[method-assign]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(seconds: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    seconds[name] += time.perf_counter() - start


# -- bench_decompose's rows on synthetic sst2-length prompts -----------------------------------


def decompose_rows(model: Any, plain: Any, protocol: Protocol, prompts: SyntheticPrompts, args: argparse.Namespace,
                   device: torch.device) -> list[dict[str, Any]]:
    """Plain forward, decomposition and prefix reuse on sst2's 4- and 24-shot lengths (template 1, seed 0)."""
    rows = []
    n_ctx = SHAPES[args.model][6]
    passes = {p.stage: p for p in protocol.passes("sst2", 1, 0, args.row_examples, n_ctx)}
    decomposer = Decomposer(model, [5, 6])
    for shots, stage in ((4, "test"), (24, "many-shot")):
        p = passes[stage]
        names = prompts.make(p.prefix, p.suffixes, f"row{shots}")
        token_lists = [prompts.tokens[n] for n in names]
        paths = {
            "plain": partial(plain_forward, plain, token_lists, args.batch_size, 0, 1),
            "decomposition": partial(decomposer, names, batch_size=args.batch_size, prefix_reuse=False, progress=False),
            "prefix reuse": partial(decomposer, names, batch_size=args.batch_size, prefix_reuse=True, progress=False),
        }
        seconds: dict[str, list[float]] = defaultdict(list)
        outputs: dict[str, Any] = {}
        with prompts.active():
            for name, run in paths.items():  # warm-up: kernels, allocator, cuBLAS handles
                outputs[name] = run()
            for _ in range(args.repeats):
                for name, run in paths.items():
                    one: dict[str, float] = defaultdict(float)
                    with timed(one, name, device):
                        run()
                    seconds[name].append(one[name])
        ms = {name: 1000 * statistics.median(v) / len(names) for name, v in seconds.items()}
        reuse, full = outputs["prefix reuse"], outputs["decomposition"]
        scale = float(full.model_logits.abs().max().clamp(min=1.0))
        rows.append({
            "shots": shots, "examples": len(names), "tokens": p.prefix + max(p.suffixes), "prefix": p.prefix,
            **{f"{name} ms": round(value, 3) for name, value in ms.items()},
            "decomposition / plain": round(ms["decomposition"] / ms["plain"], 2),
            "reuse speed-up": round(ms["plain"] / ms["prefix reuse"], 2),
            "max diff reuse-full / logit scale": float((reuse.component_logits - full.component_logits).abs().max()) / scale,
            "max diff logits-plain / logit scale": float(
                (full.model_logits - outputs["plain"][:, [5, 6]].to(full.model_logits)).abs().max()) / scale,
        })
    return rows


# -- the protocol ------------------------------------------------------------------------------


def run_setting(model: Any, passes: list[Pass], n_labels: int, prompts: SyntheticPrompts, options: RunOptions,
                device: torch.device, seconds: dict[str, float], generator: torch.Generator) -> None:
    """One setting of `parts evaluate`, every method, on synthetic prompts (what `evaluate_setting` runs)."""
    label_ids = list(range(5, 5 + n_labels))
    by_stage = {p.stage: p for p in passes}
    decomposer = Decomposer(model, label_ids)
    batch = options.batch_size
    with prompts.active():
        names = {stage: prompts.make(p.prefix, p.suffixes, f"{p.task}-{stage}") for stage, p in by_stage.items()}
        with timed(seconds, MODEL_STAGES["test"], device):
            test = decomposer(names["test"], batch_size=batch, progress=False)
        with timed(seconds, MODEL_STAGES["train"], device):
            train = decomposer(names["train"], batch_size=batch, progress=False)
        with timed(seconds, MODEL_STAGES["content-free"], device):
            content_free = label_logits(model, names["content-free"], label_ids, options, "content-free")
        with timed(seconds, MODEL_STAGES["many-shot"], device):
            many = label_logits(model, names["many-shot"], label_ids, options, "L-shot")
    test_labels = torch.randint(0, n_labels, (len(names["test"]),), generator=generator)
    train_labels = torch.arange(len(names["train"])) % n_labels  # every class present, as the paper's draw
    with timed(seconds, "training: CompRW", device):
        weights = train_weights(train.component_logits, train_labels)
        predict(weights.weights, test.component_logits)
    with timed(seconds, "training: oracle", device):
        train_weights(test.component_logits, test_labels)
    with timed(seconds, "calibration (Calib+, contextual, batch)", device):
        class_weights = calibration.train_calib_plus(train.model_logits, train_labels)
        calibration.calib_plus_predict(class_weights.weights, test.model_logits)
        calibration.contextual_predict(test.model_logits, calibration.contextual_prior(content_free))
        calibration.batch_predict(test.model_logits)
    assert many.shape == (len(names["many-shot"]), n_labels)


def project(protocol: Protocol, measured: list[tuple[str, int, int]], seconds: dict[str, float],
            per_task_seconds: dict[tuple[str, str], float], limit: int, full_limit: int, n_ctx: int
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds of the full protocol per stage: model stages from each task's seconds per token."""
    measured_tokens: dict[tuple[str, str], int] = defaultdict(int)
    for setting in measured:
        for p in protocol.passes(*setting, n_test=limit, n_ctx=n_ctx):
            measured_tokens[(p.task, p.stage)] += p.tokens
    full_tokens: dict[tuple[str, str], int] = defaultdict(int)
    full_settings = protocol.settings()
    for setting in full_settings:
        for p in protocol.passes(*setting, n_test=full_limit, n_ctx=n_ctx):
            full_tokens[(p.task, p.stage)] += p.tokens
    projected: dict[str, float] = defaultdict(float)
    for (task, stage), tokens in full_tokens.items():
        if measured_tokens[(task, stage)]:
            rate = per_task_seconds[(task, stage)] / measured_tokens[(task, stage)]
        else:  # a task not timed: the pooled rate of the tasks that were
            timed_here = [key for key in measured_tokens if key[1] == stage and measured_tokens[key]]
            rate = sum(per_task_seconds[k] for k in timed_here) / sum(measured_tokens[k] for k in timed_here)
        projected[MODEL_STAGES[stage]] += rate * tokens
    per_setting = len(full_settings) / len(measured)
    for name in ("training: CompRW", "calibration (Calib+, contextual, batch)"):
        projected[name] = seconds[name] * per_setting
    n_test_full = sum(min(full_limit, protocol.data["tasks"][t]["n_test_available"]) for t, _, _ in full_settings)
    n_test_measured = sum(min(limit, protocol.data["tasks"][t]["n_test_available"]) for t, _, _ in measured)
    projected["training: oracle"] = seconds["training: oracle"] * n_test_full / n_test_measured
    tokens = {"measured": sum(measured_tokens.values()), "full": sum(full_tokens.values()),
              "full test examples": n_test_full}
    return dict(projected), tokens


def environment(device: torch.device) -> str:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    return (f"{platform.node()} ({where}); torch {torch.__version__}, transformers {transformers.__version__}; "
            f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-2-7b-shape", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default 32 on CUDA, 8 on CPU)")
    parser.add_argument("--tasks", default=",".join(MAIN_TASKS), help="tasks timed (default: the 8 main-table tasks)")
    parser.add_argument("--settings", default="1:0", help="template:seed pairs timed per task (default 1:0)")
    parser.add_argument("--limit", type=int, default=256, help="test examples per timed setting (default 256)")
    parser.add_argument("--full-limit", type=int, default=2000, help="test examples per setting projected (default 2000)")
    parser.add_argument("--row-examples", type=int, default=64, help="prompts per bench_decompose-style row (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of those rows; the median (default 3)")
    parser.add_argument("--no-rows", action="store_true", help="skip the bench_decompose-style rows")
    parser.add_argument("--no-save", action="store_true", help="print without appending to benchmarks/results.md")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--note", default="", help="a line saved above the tables")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    dtype = DTYPES[args.dtype]
    protocol = Protocol.load()
    n_ctx = SHAPES[args.model][6]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        model, plain = build_model(args.model, device, dtype, Path(folder))
    built = time.perf_counter() - started
    prompts = SyntheticPrompts(SHAPES[args.model][5])
    rows = [] if args.no_rows else decompose_rows(model, plain, protocol, prompts, args, device)
    del plain
    if device.type == "cuda":
        torch.cuda.empty_cache()
    options = RunOptions(batch_size=args.batch_size, progress=False, dtype=args.dtype, device=args.device)
    pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    measured = [(task, template, seed) for template, seed in pairs for task in args.tasks.split(",")]
    seconds: dict[str, float] = defaultdict(float)
    per_task: dict[tuple[str, str], float] = defaultdict(float)
    generator = torch.Generator().manual_seed(0)
    # Warm-up on a few prompts of the first task, so one-off kernel and allocator set-up is not in the rates.
    warm = protocol.passes(measured[0][0], measured[0][1], measured[0][2], 4, n_ctx)
    run_setting(model, warm, 2, prompts, options, device, defaultdict(float), generator)
    timed_start = time.perf_counter()
    for task, template, seed in measured:
        before = dict(seconds)
        passes = protocol.passes(task, template, seed, args.limit, n_ctx)
        run_setting(model, passes, protocol.data["tasks"][task]["labels"], prompts, options, device, seconds, generator)
        for stage, name in MODEL_STAGES.items():
            per_task[(task, stage)] += seconds[name] - before.get(name, 0.0)
    timed_total = time.perf_counter() - timed_start
    projected, tokens = project(protocol, measured, seconds, per_task, args.limit, args.full_limit, n_ctx)
    # The oracle (CompRW trained on the test labels) is an upper bound `parts evaluate` adds, not one of the
    # paper's methods: the 15-minute target is for the paper's methods; the oracle's cost is shown beside it.
    total = sum(v for k, v in projected.items() if k != "training: oracle")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")

    lines = [f"## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: bench_protocol.py --model {args.model} "
             f"--device {args.device} --dtype {args.dtype} --batch-size {args.batch_size}", "",
             f"{environment(device)}. Model built in {built:.0f} s; peak GPU memory {peak:.1f} GiB.", ""]
    if args.note:
        lines += [args.note, ""]
    if rows:
        keys = list(rows[0])
        lines += ["Decomposition vs the plain forward, and prefix reuse, on sst2's lengths (template 1, seed 0), "
                  f"batch {args.batch_size}, median of {args.repeats} rounds:", "",
                  "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(f"{r[k]:.1e}" if "diff" in k else str(r[k]) for k in keys) + " |" for r in rows]
        lines.append("")
    lines += [f"The protocol: {len(measured)} settings timed ({args.tasks}; template:seed {args.settings}) at "
              f"{args.limit} test examples each, {tokens['measured']:,} tokens, in {timed_total:.1f} s; projected to "
              f"8 tasks x 3 templates x 5 seeds at up to {args.full_limit} test examples ({tokens['full test examples']:,} "
              f"test examples, {tokens['full']:,} tokens; context {n_ctx}):", "",
              "| stage | timed s | projected s, full protocol |", "|---|---|---|"]
    for name in [*MODEL_STAGES.values(), "training: CompRW", "training: oracle", "calibration (Calib+, contextual, batch)"]:
        lines.append(f"| {name} | {seconds[name]:.2f} | {projected[name]:.0f} |")
    verdict = "within" if total <= 60 * TARGET_MINUTES else "over"
    timed_methods = sum(v for k, v in seconds.items() if k != "training: oracle")
    lines += [f"| **total, the paper's methods (all but the oracle)** | {timed_methods:.2f} | **{total:.0f} "
              f"({total / 60:.1f} min, {verdict} the {TARGET_MINUTES}-minute target)** |",
              f"| total with the oracle | {sum(seconds.values()):.2f} | {total + projected['training: oracle']:.0f} |",
              "", "Training and calibration run on the host's CPU (one thread each), the model stages on the device.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_save:
        with RESULTS.open("a") as handle:
            handle.write("\n" + text + "\n")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "seconds": dict(seconds),
              "projected": projected, "projected_total_s": total, "tokens": tokens, "built_s": built}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
