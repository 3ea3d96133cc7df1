"""Argument types and option groups shared by the subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from parts.data.tasks import Task
    from parts.experiments.options import RunOptions


RUNS_FOLDER_FIX = "give the --out folder of a sweep or a run folder"


def count(n: int, noun: str) -> str:
    """'1 run', '2 runs': a number and its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


Number = TypeVar("Number", int, float)


def number(text: str, convert: Callable[[str], Number], ok: Callable[[Number], bool], rule: str) -> Number:
    """`text` as an int or float (`convert`) that passes `ok`; else an argparse error saying what is wrong."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if convert is int else 'a number'}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{value} {rule}")
    return value


def positive_int(text: str) -> int:
    return number(text, int, lambda value: value >= 1, "must be at least 1")


def non_negative_int(text: str) -> int:
    return number(text, int, lambda value: value >= 0, "must be 0 or more")


def batch_size(text: str) -> int | str:
    """A positive whole number, or "auto" (chosen from free memory by `parts.decomposition.decompose`)."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def int_list(text: str) -> list[int]:
    """'0-4' -> [0, 1, 2, 3, 4]; '1,3' -> [1, 3]; ranges and commas combine ('0-2,5')."""
    values: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                low, high = (int(x) for x in piece.split("-", 1))
                if high < low:
                    raise argparse.ArgumentTypeError(f"range {piece!r} runs backwards: write {high}-{low}")
                values.extend(range(low, high + 1))
            else:
                values.append(int(piece))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 0-4 or 1,2,3") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: numbers must be 0 or more")
    return list(dict.fromkeys(values))


def name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    model_help: str | None = "Hugging Face name or folder (default: the embedded SmolLM2-135M-Instruct)",
    revision: bool = True,
    batch_size_default: int | str = "auto",
    decomposes: bool = True,
    reuses: bool = True,
) -> None:
    """The options of every command that runs the model, read back whole by `run_options`.

    `model_help` None: the command declares its own model arguments. `decomposes` False: only what
    loading needs (device, dtype), for a command that loads a model without decomposing (figures). `reuses`
    False: the command never reuses a finished run or row, so it has no `--recompute-changed` (decompose).
    """
    group = parser.add_argument_group("running the model")
    if model_help is not None:
        group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:1 ..., or auto: spread over every visible GPU (default: cuda if available)")
    group.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16 weights")
    if revision:
        group.add_argument("--revision", default=None, help="hub revision, e.g. a Pythia checkpoint step1000")
    if not decomposes:
        return
    group.add_argument("--batch-size", type=batch_size, default=batch_size_default,
                       help="prompts per forward pass, or auto: as many as a share of free memory holds "
                            f"(default {batch_size_default})")
    group.add_argument(
        "--no-prefix-reuse", dest="prefix_reuse", action="store_false",
        help="run every prompt in full instead of reusing the shared demonstrations' keys and values",
    )
    group.add_argument(
        "--engine", choices=("hf", "bridge"), default="hf",
        help="hf (default): the model's own modules with torch hooks and fast attention; bridge: TransformerLens's "
        "run_with_cache, the slower reference (equal to 1e-4)",
    )
    group.add_argument(
        "--split-experts", action="store_true",
        help="mixture-of-experts models: one component per expert (MLP{layer}E{expert}) instead of one per MLP",
    )
    group.add_argument(
        "--allow-inexact", action="store_true",
        help="warn instead of failing when the components do not sum to the model's logits (experts only)",
    )
    if reuses:
        group.add_argument(
            "--recompute-changed", action="store_true",
            help="recompute a finished run or results row made otherwise (another template, label words, data, "
                 "model files...; see docs/guide/reuse.md) instead of refusing",
        )
    add_data_options(group)


def check_device_option(args: argparse.Namespace) -> None:
    """`--device` names a device this machine has (with `--ray`: one parts knows; the workers have theirs),
    checked before anything is imported or loaded (`parts.model.preflight.check_device`)."""
    if getattr(args, "device", None) is not None:
        from parts.model.preflight import check_device

        check_device(args.device, here=getattr(args, "ray", None) is None)


def check_task_data(args: argparse.Namespace, tasks: Sequence[Task], template: int, seeds: int | Sequence[int],
                    split: str = "test", limit: int | None = None, shots: int | None = None) -> None:
    """Each task's prompts of one setting, built now from its local data: a template field the data lacks, a
    bad label or too few examples of a class is answered before the slow imports, not after the model load.
    `seeds`: the first seed's prompts, then the highest's (its labelled set is drawn apart from every lower
    seed's, so a training split too small for it is answered here too, before any seed runs).
    Tasks read from the hub are read when they run; here only whether the hub can be reached, if they are not cached."""
    from parts.data.prompts import build_prompts
    from parts.data.tasks import check_hub_data, reads_local_data

    chosen = [seeds] if isinstance(seeds, int) else list(seeds)
    checked = list(dict.fromkeys(chosen[:1] + [max(chosen)])) if chosen else []
    for task in tasks:
        if reads_local_data(task, args.data_dir):
            for seed in checked:
                build_prompts(task, template, seed, shots, split, limit, args.data_dir)
        else:
            check_hub_data(task)


def check_label_words(args: argparse.Namespace, tasks: Sequence[Task], templates: Sequence[int]) -> None:
    """Every label word of these tasks' templates is one token for `--model`'s tokenizer, checked with the
    tokenizer alone before the weights load (`parts.model.preflight.check_label_words`)."""
    from parts.model.preflight import check_label_words as check

    check(getattr(args, "model", None), getattr(args, "revision", None),
          {f"task {task.name!r} template {n}": task.template(n).label_words for task in tasks for n in templates})


def run_options(args: argparse.Namespace, progress: bool = True) -> RunOptions:
    """The `RunOptions` of a command's parsed arguments (those `add_model_options` declared)."""
    from parts.experiments.options import RunOptions  # here, not at the top: `parts --help` stays fast

    return RunOptions(
        engine=getattr(args, "engine", "hf"),
        prefix_reuse=getattr(args, "prefix_reuse", True),
        dtype=args.dtype,
        device=args.device,
        batch_size=getattr(args, "batch_size", 8),
        data_dir=getattr(args, "data_dir", None),
        progress=progress,
        split_experts=getattr(args, "split_experts", False),
        allow_inexact=getattr(args, "allow_inexact", False),
        recompute_changed=getattr(args, "recompute_changed", False),
    )


def add_data_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--data-dir", default=None,
        help="folder with <task>/{train,test}.jsonl (default: $PARTS_DATA_DIR, else the Hugging Face hub)",
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """What each run decomposes: demonstrations, split and how many examples."""
    parser.add_argument("--shots", type=non_negative_int, default=None, help="demonstrations (default 4; 3 for mnli)")
    parser.add_argument("--split", choices=["test", "train"], default="test",
                        help="test, or train: each seed's labelled examples beside its demonstrations")
    parser.add_argument("--limit", type=positive_int, default=None, help="examples per run (a seeded balanced sample)")


def add_executor_options(parser: argparse.ArgumentParser) -> None:
    """Where the settings run: in this process (default) or on the workers of a Ray cluster."""
    group = parser.add_argument_group("running on a cluster (needs pip install 'parts[ray]')")
    group.add_argument("--ray", choices=("auto", "local"), default=None,
                       help="spread the settings over Ray workers: auto joins the running Ray cluster, "
                            "local starts one on this machine (default: run everything in this process)")
    group.add_argument("--gpus-per-worker", type=non_negative_float, default=None,
                       help="GPUs per worker, one model per worker (default 1 on a cluster with GPUs, else 0); "
                            "more than 1 spreads each model over them with Hugging Face's device_map")
    group.add_argument("--workers", type=positive_int, default=None,
                       help="how many workers (default: the cluster's GPUs / --gpus-per-worker, or its CPUs)")


def non_negative_float(text: str) -> float:
    return number(text, float, lambda value: value >= 0, "must be 0 or more")


def executor(args: argparse.Namespace) -> Any:
    """The executor `--ray` asks for (None: this process); a one-line error when Ray is not installed."""
    if getattr(args, "ray", None) is None:
        return None
    from parts.experiments.ray_executor import RayExecutor  # imports Ray only when asked for

    return RayExecutor(args.ray, gpus_per_worker=args.gpus_per_worker, workers=args.workers)


def add_dry_run_options(parser: argparse.ArgumentParser) -> None:
    """`--dry-run` and what it assumes (`parts.experiments.plan`): a plan printed, nothing loaded or written."""
    group = parser.add_argument_group("planning (docs/guide/plan.md)")
    group.add_argument("--dry-run", action="store_true",
                       help="load no weights and write nothing: print the settings to run and done, forward tokens, "
                            "components, peak memory and batch size, disk and estimated time")
    group.add_argument("--assume", metavar="DEVICE", default=None,
                       help="with --dry-run: estimate for a recorded device (h200, a100, cpu-2core, ...) instead of "
                            "probing this one")
    group.add_argument("--shape", metavar="NAME", default=None,
                       help="with --dry-run: plan for a model shape built in code (llama-2-7b, mistral-7b, llama-3-8b) "
                            "instead of --model, tokenised with the embedded model's tokenizer")


def wants_plan(args: argparse.Namespace) -> bool:
    """Whether the command is to print its plan (`--dry-run`); `--assume` / `--shape` without it, or an unknown
    `--assume` device, is a one-line error before anything is imported."""
    from parts.errors import PartsError

    if not args.dry_run and (args.assume is not None or args.shape is not None):
        raise PartsError("--assume and --shape describe a plan: add --dry-run")
    if args.assume is not None:
        from parts.experiments.plan import assumed_device

        assumed_device(args.assume)
    return bool(args.dry_run)


def plan_target(args: argparse.Namespace, dtype: str | None = None) -> Any:
    """The model and device a `--dry-run` plans for (`parts.experiments.plan.load_target`)."""
    from parts.experiments.options import dtype_name
    from parts.experiments.plan import load_target

    return load_target(getattr(args, "model", None), getattr(args, "revision", None),
                       dtype_name(dtype or getattr(args, "dtype", None) or "float32"), getattr(args, "device", None),
                       args.assume, args.shape)
