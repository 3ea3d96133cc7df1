"""torch.compile of the per-layer block against eager, on the main table's batch shapes (issue 26, part 3).

    python benchmarks/bench_compile.py                       # embedded model, 1 thread, sst2- and boolq-like batches
    python benchmarks/bench_compile.py --repeats 3 --rounds 2 --layers 2   # smoke test

The embedded model's own decoder layers (the modules the hf engine runs) forward a batch of suffixes after a
shared prefix, as a decomposition call does: the prefix's keys and values are computed once, expanded to the batch,
and each timed call forwards the batch with `logits_to_keep=1`. Random token ids of the main table's lengths
(`--shapes`: prefix tokens x batch x suffix tokens; the defaults are sst2's 4-shot test batches and boolq's 24-shot
ICL batches, the cheapest and the costliest calls of the table). Each decoder layer is then compiled in place
(`nn.Module.compile(dynamic=True)`, inductor on this CPU); eager and compiled calls alternate, so load drifts hit
both alike, and the time is this process's CPU time per call (median of `--repeats`). The logits of the two must
agree to float32 rounding (1e-4 relative), or the script stops.

This times the layers without the decomposition's hooks (the engine attaches them for each call, which a compiled
layer would have to guard on and recompile for): it is the most compile can give, not what parts would get.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's parts, not an installed one

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from parts.model.loading import load_model, plain_model  # noqa: E402


def batch_cache(model: torch.nn.Module, prefix: torch.Tensor, batch: int) -> DynamicCache:
    """The prefix's keys and values, computed once and expanded to `batch` rows (as the decomposition copies them)."""
    with torch.inference_mode():
        cache = model(prefix, use_cache=True, logits_to_keep=1).past_key_values
    cache.batch_repeat_interleave(batch)
    return cache


def timed_call(model: torch.nn.Module, cache: DynamicCache, suffix: torch.Tensor, prefix_length: int) -> tuple[float,
                                                                                                                torch.Tensor]:
    """CPU seconds of one batch's forward after the prefix, and its last-position logits."""
    batch, positions = suffix.shape
    mask = torch.ones(batch, prefix_length + positions, dtype=torch.long)
    position_ids = torch.arange(prefix_length, prefix_length + positions).expand(batch, -1)
    step_cache = copy.deepcopy(cache)  # each call starts from the prefix alone
    start = time.process_time()
    with torch.inference_mode():
        logits = model(suffix, attention_mask=mask, position_ids=position_ids, past_key_values=step_cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return time.process_time() - start, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="107x8x40,3869x8x140",
                        help="prefix x batch x suffix tokens, comma-separated (default: sst2 4-shot, boolq 24-shot)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per way and shape")
    parser.add_argument("--rounds", type=int, default=3, help="warm-up calls of the compiled layers (compile time)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    eager = plain_model(load_model(None, device="cpu")).eval()
    if args.layers is not None:
        eager.model.layers = eager.model.layers[: args.layers]
        eager.config.num_hidden_layers = args.layers
    compiled = copy.deepcopy(eager)
    # Every layer shares one code object, and its guards differ per layer (its index into the cache): without a
    # larger limit dynamo compiles 8 layers and runs the rest eagerly.
    torch._dynamo.config.recompile_limit = 8 * len(compiled.model.layers)
    torch._dynamo.config.accumulated_recompile_limit = 64 * len(compiled.model.layers)
    for layer in compiled.model.layers:
        layer.compile(dynamic=True)
    vocab = eager.config.vocab_size

    print(f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs), torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| shape (prefix x batch x suffix) | eager CPU s / call | compiled CPU s / call | compiled / eager | "
          "compile CPU s (first calls) | max logit difference |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        prefix_length, batch, positions = (int(x) for x in shape.split("x"))
        prefix = torch.randint(vocab, (1, prefix_length))
        suffix = torch.randint(vocab, (batch, positions))
        cache = batch_cache(eager, prefix, batch)  # the same prefix for both: its forward is not timed
        caches = {"eager": cache, "compiled": cache}
        warm_start = time.process_time()
        for _ in range(args.rounds):
            timed_call(compiled, caches["compiled"], suffix, prefix_length)
        compile_seconds = time.process_time() - warm_start
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        logits = {}
        for _ in range(args.repeats):
            for name, model in (("eager", eager), ("compiled", compiled)):
                seconds, logits[name] = timed_call(model, caches[name], suffix, prefix_length)
                times[name].append(seconds)
        difference = (logits["eager"] - logits["compiled"]).abs().max().item()
        scale = logits["eager"].abs().max().item()
        if difference > 1e-4 * scale:
            sys.exit(f"compiled logits differ from eager by {difference:.2e} (scale {scale:.1f}): stopping")
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"| {shape} | {e:.3f} | {c:.3f} | {c / e:.3f} | {compile_seconds:.1f} | {difference:.1e} |", flush=True)


if __name__ == "__main__":
    main()
