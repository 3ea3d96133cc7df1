"""`parts inspect`: where one head's vote comes from, token by token, in a saved run."""

from __future__ import annotations

import argparse
from typing import Any

from parts.cli.common import add_model_options, positive_int, run_options


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="one head of a run up close: accuracy, direct effect, the tokens its vote comes from, copy scores",
        description=(
            "Split one attention head's direct effect on every example of RUN exactly over the prompt positions it "
            "reads, and print a card: accuracy and category, direct effect, the source profile over prompt segments, "
            "copy and class-matching scores, and the top source tokens of the first examples in context."
        ),
    )
    parser.add_argument("run", help="a run folder (from parts decompose or parts sweep)")
    parser.add_argument("head", help="the head, like L14H2")
    parser.add_argument("--examples", type=positive_int, default=3, help="examples whose top sources are shown (default 3)")
    parser.add_argument("--top", type=positive_int, default=5, help="sources shown per example (default 5)")
    parser.add_argument("--limit", type=positive_int, default=None, help="attribute only the first N examples")
    add_model_options(parser, model_help="the run's model (default: the one the run records)", revision=False,
                      batch_size_default=8, reuses=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.analysis.inspect_head import format_card, inspect_head
    from parts.decomposition.effect_data import TotalEffects, has_effects
    from parts.decomposition.runs import DecompositionRun
    from parts.decomposition.sources import check_heads
    from parts.model.loading import load_model, recorded_model

    saved = DecompositionRun.load(args.run)
    check_heads([args.head], saved.n_layers, saved.n_heads)  # before the model loads
    options = run_options(args, progress=False)
    source = {"name": args.model} if args.model else recorded_model(saved.model)
    model = load_model(**source, device=options.device, dtype=options.dtype)
    effects = TotalEffects.load(args.run) if has_effects(args.run) else None  # from `parts effects`, when it ran
    card = inspect_head(model, saved, args.head, args.examples, args.top, args.limit, options.engine,
                        options.batch_size, effects=effects)
    print(format_card(card, saved.prompts.label_names))
    return 0
