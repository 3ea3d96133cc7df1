"""Where the best heads' votes come from: source profiles and copy scores of the 5 most accurate heads per task.

    python scripts/head_sources.py RUNS [--out results/head-sources.csv] [--figure figures] [--limit N]

For every run under RUNS (one per task: the n = 200 runs of template 1, seed 0), the run's five most accurate heads
are split over their sources on every example, or the first `--limit` (`parts.analysis.inspect_head.run_sources`,
exact to 1e-5), and one row per head is written: accuracy, per prompt segment the mean attention (and its sd over
examples) and the share of the head's vote for its prediction, the copy score and rate, and the class-matching
scores. Tasks already in the CSV are kept (rerun to continue). The figure `head-sources` (PNG) is drawn from the
CSV alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch


def head_rows(model, run, heads: list[str], limit: int | None) -> pd.DataFrame:
    from parts.analysis.inspect_head import SEGMENTS, head_scores, run_sources, source_profile, source_table

    examples = list(range(min(limit or run.n_examples, run.n_examples)))
    attribution = run_sources(model, run, heads, examples, progress=True)
    sources = source_table(run, attribution, model.tokenizer, examples)
    profile, scores = source_profile(sources), head_scores(sources)
    accuracy = run.component_accuracy
    rows = []
    for head in heads:
        row = {"task": run.prompts.task, "template": run.prompts.template, "seed": run.prompts.seed,
               "n_examples": len(examples), "head": head, "accuracy": float(accuracy[run.component_index(head)]),
               "max_source_error": attribution.max_error}
        part = profile[profile["head"] == head].set_index("segment")
        for segment in SEGMENTS:
            key = segment.replace("demonstration ", "demo_").replace(" ", "_")
            row[f"attention_{key}"] = part.loc[segment, "attention"]
            row[f"attention_sd_{key}"] = part.loc[segment, "attention_sd"]
            row[f"share_{key}"] = part.loc[segment, "share_predicted"]
        row.update(scores[scores["head"] == head].drop(columns=["head"]).iloc[0].to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs")
    parser.add_argument("--out", default="results/head-sources.csv")
    parser.add_argument("--figure", default="figures")
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None,
                        help="attribute the first N examples of each run (label-balanced: runs sample in class rotation)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from parts import io
    from parts.decomposition.runs import load_saved_runs
    from parts.figures.export import static_export, write_figure
    from parts.figures.plotting import head_sources_figure
    from parts.model.loading import load_model, recorded_model

    out = Path(args.out)
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["task"])
    model = None
    for saved in load_saved_runs(args.runs):
        run = saved.run
        if run.prompts.task in set(done["task"]):
            continue
        model = model or load_model(**recorded_model(run.model), device="cpu")
        heads = [n for n in run.component_names if n.startswith("L")]
        accuracy = run.component_accuracy[: len(heads)]
        best = [heads[i] for i in torch.argsort(accuracy, descending=True, stable=True)[: args.heads].tolist()]
        done = pd.concat([done, head_rows(model, run, best, args.limit)], ignore_index=True)
        io.write_text(out, done.to_csv(index=False))  # after each task: an interrupted run loses nothing done
        print(f"{run.prompts.task}: {', '.join(best)}", flush=True)
    with static_export():
        write_figure(head_sources_figure(done), args.figure, "head-sources", formats=("png",))


if __name__ == "__main__":
    main()
