"""`parts effects`: total (causal) effects of every component of every run under a folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from parts.cli.common import add_dry_run_options, count, plan_target, positive_int, wants_plan
from parts.errors import PartsError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "effects",
        help="total effects: each component ablated, the change in the model's own label-word logits",
        description=(
            "For every finished run under RUN_OR_RUNS, ablate each component (head, MLP or expert) and record "
            "clean minus ablated label-word logits per example in the run folder's effects.safetensors. A run "
            "that already has effects of the same settings is skipped. See docs/guide/effects.md."
        ),
    )
    parser.add_argument("root", metavar="RUN_OR_RUNS", help="a run folder, or a folder of runs (a sweep's --out)")
    parser.add_argument("--ablation", choices=("mean", "zero", "resample"), default="mean",
                        help="what replaces a component's output: its mean over the run's examples at the same "
                             "position (default), zero, or its output on another example (resample)")
    parser.add_argument("--positions", choices=("last", "all"), default="last",
                        help="last (default): ablate at the last token only (the earlier keys and values stay "
                             "clean; cheap and exact); all: at every position (one full run per component)")
    parser.add_argument("--method", choices=("exact", "attribution"), default="exact",
                        help="exact (default): rerun the ablated model; attribution: gradient times the ablation's "
                             "change (one forward and backward pass per example; an approximation)")
    parser.add_argument("--freeze-norm", action="store_true",
                        help="keep the clean final-norm scale (and the component's own post-norm's), so total minus "
                             "direct is what later components do")
    parser.add_argument("--yes", action="store_true",
                        help="run --positions all even where it is estimated to take long")
    parser.add_argument("--force", action="store_true", help="recompute effects already there with the same settings")
    parser.add_argument("--recompute-changed", action="store_true",
                        help="recompute effects made otherwise (of another run, model files or dtype, or before parts "
                             "recorded fingerprints) instead of refusing; see docs/guide/reuse.md")
    parser.add_argument("--summary", metavar="CSV", default=None,
                        help="compute nothing: write one row per run that has effects (direct vs total: ORACLE-T1, "
                             "correlations with intervals, good components kept) to CSV, e.g. results/effects.csv, "
                             "which `parts tables` turns into docs/effects.md")
    parser.add_argument("--against", metavar="RUN", default=None,
                        help="with --summary: compare the effects of every run under RUN_OR_RUNS (copies of one run "
                             "folder with effects computed otherwise: --method attribution, --positions all, "
                             "--freeze-norm) with RUN's, one row each, e.g. to results/effects-variants.csv")
    group = parser.add_argument_group("running the model")
    group.add_argument("--model", default=None, help="the model to load (default: the one each run records; "
                                                     "a different one is refused)")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    group.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the run's own)")
    group.add_argument("--engine", choices=("hf", "bridge"), default=None,
                       help="the engine the runs were made with (refused if a run says otherwise)")
    group.add_argument("--batch-size", type=positive_int, default=4, help="examples per forward pass (default 4)")
    add_dry_run_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from parts.decomposition.effects import check_run_matches, total_effects
    from parts.decomposition.runs import find_runs
    from parts.model.loading import load_model, recorded_model

    dry_run = wants_plan(args)
    paths = find_runs(args.root)
    if not paths:
        raise PartsError(f"no finished runs under {args.root}: make them with `parts decompose` or `parts sweep`")
    if args.against is not None and args.summary is None:
        raise PartsError("--against compares effects already computed: give --summary CSV too")
    if args.summary is not None:
        return write_summary(paths, args.summary, args.against)
    if dry_run:
        return plan(args, paths)
    models: dict[tuple[str, str], Any] = {}
    done = skipped = 0
    for path in paths:
        run_, dtype, wanted, reuse = effects_wanted(path, args)
        if reuse:
            skipped += 1
            continue
        key = (run_.model, dtype)
        if key not in models:
            models[key] = load_model(**recorded_model(run_.model), device=args.device, dtype=dtype)
        model = models[key]
        check_run_matches(model, run_)
        started = time.perf_counter()
        effects = total_effects(model, run_, args.ablation, args.positions, args.method, args.freeze_norm,
                                batch_size=args.batch_size, progress=True, yes=args.yes)
        effects.info["fingerprint"] = wanted
        effects.save(path)
        done += 1
        print(f"{path}: {count(len(run_.component_names), 'component')} x {count(run_.n_examples, 'example')} "
              f"in {time.perf_counter() - started:.0f} s -> {Path(path) / 'effects.safetensors'}")
    print(f"total effects: {done} computed, {skipped} already there")
    return 0


def effects_wanted(path: Any, args: argparse.Namespace) -> tuple[Any, str, dict[str, Any], bool]:
    """One run folder as `parts effects` sees it: (the run, the dtype to load, the fingerprint its effects record,
    whether effects of these settings are there to reuse); a run the options contradict is a one-line error."""
    from parts.decomposition.effect_data import TotalEffects, has_effects
    from parts.decomposition.fingerprint import check_reuse, digest
    from parts.decomposition.runs import DecompositionRun
    from parts.model.identity import model_identity
    from parts.model.loading import resolve_model_name

    settings = {"method": args.method, "positions": args.positions, "ablation": args.ablation,
                "freeze_norm": args.freeze_norm}
    run_ = DecompositionRun.load(path)
    if args.model is not None and resolve_model_name(args.model) != run_.model:
        raise PartsError(f"{path} was made with model {run_.model!r}, not {args.model!r}: drop --model or "
                         "give that run's model")
    dtype = args.dtype or run_.info.get("dtype", "float32")
    if args.engine is not None or args.dtype is not None:
        recorded_dtype, recorded_engine = run_.info.get("dtype"), run_.info.get("engine")
        if args.dtype is not None and recorded_dtype not in (None, args.dtype):
            raise PartsError(f"{path} was made in {recorded_dtype}, not {args.dtype}: use --dtype {recorded_dtype}")
        if args.engine is not None and recorded_engine not in (None, args.engine):
            raise PartsError(f"{path} was made with the {recorded_engine} engine, not {args.engine}: "
                             f"use --engine {recorded_engine}")
    # What the effects are made of (docs/guide/reuse.md): the run, the model's files now, the dtype, the settings.
    identity = model_identity(run_.model)
    made_with = (run_.fingerprint or {}).get("model_files")
    if made_with is not None and made_with != identity["model_files"]:
        raise PartsError(f"{path} was made with other model files than {run_.model} has now ({made_with} then, "
                         f"{identity['model_files']} now): recompute the run first (parts sweep ... "
                         "--recompute-changed), or point at the model it was made with")
    wanted = {"run": None if run_.fingerprint is None else digest(run_.fingerprint), **identity, "dtype": dtype,
              **settings}
    reuse = False
    if has_effects(path) and not args.force:
        old = TotalEffects.load(path).info
        reuse = all(old.get(key) == value for key, value in settings.items()) and check_reuse(
            f"the effects in {path}", old.get("fingerprint"), wanted, args.recompute_changed, whose="the effects'")
    return run_, dtype, wanted, reuse


def plan(args: argparse.Namespace, paths: list[Any]) -> int:
    """`--dry-run`: the plan of every (model, dtype) the runs need (parts.experiments.plan_effects), nothing loaded
    or written."""
    from parts.experiments.plan_effects import effects_plan
    from parts.model.loading import recorded_model

    groups: dict[tuple[str, str], list[tuple[str, Any, bool, dict[str, Any]]]] = {}
    for path in paths:
        run_, dtype, wanted, reuse = effects_wanted(path, args)
        groups.setdefault((run_.model, dtype), []).append((str(path), run_, reuse, wanted))
    for (model, dtype), runs in groups.items():
        recorded = recorded_model(model)
        args.model, args.revision = recorded["name"], recorded["revision"]
        found = effects_plan(plan_target(args, dtype), runs, args.method, args.positions, args.ablation,
                             args.freeze_norm, args.batch_size, args.yes)
        print(found.describe())
        found.check_fits()
    return 0


def write_summary(paths: list[Any], out: str, against: str | None = None) -> int:
    """`--summary`: the rows of results/effects.csv for every run under the root that has effects; with `against`,
    the rows of results/effects-variants.csv (each run's effects against `against`'s, the same run's)."""
    import pandas as pd

    from parts import io
    from parts.analysis.total import AGREEMENT_COLUMNS, EFFECT_COLUMNS, agreement_row, effects_row
    from parts.decomposition.effect_data import TotalEffects, has_effects
    from parts.decomposition.effects import check_effects_match
    from parts.decomposition.runs import DecompositionRun

    reference = None
    if against is not None:
        reference_run, reference = DecompositionRun.load(against), TotalEffects.load(against)
        check_effects_match(against, reference_run, reference)
    rows = []
    for path in paths:
        if has_effects(path) and (against is None or Path(path).resolve() != Path(against).resolve()):
            run, effects = DecompositionRun.load(path), TotalEffects.load(path)
            check_effects_match(path, run, effects)
            if reference is None:
                rows.append(effects_row(run, effects))
                continue
            if run != reference_run:
                raise PartsError(f"{path} is not a copy of the run {against}: --against compares effects of one run")
            rows.append(agreement_row(run, reference, effects))
    if not rows:
        raise PartsError("no run there has total effects: run `parts effects` on them first")
    columns = EFFECT_COLUMNS if reference is None else AGREEMENT_COLUMNS
    frame = pd.DataFrame(rows, columns=list(columns))
    if reference is not None and Path(out).is_file():  # comparisons against other references accumulate in one file
        key = ["model", "task", "template", "seed", "n_examples", "reference", "variant"]
        old = pd.read_csv(out)
        kept = old.merge(frame[key], on=key, how="left", indicator=True)["_merge"] == "left_only"
        frame = pd.concat([old[kept.to_numpy()], frame], ignore_index=True)
    frame = frame.sort_values(["task", "template", "seed"], kind="stable")
    io.write_text(out, frame.to_csv(index=False, float_format="%.6g"), legacy=io.starts_with("model,task,template"))
    print(f"wrote {out} ({count(len(rows), 'run')})")
    return 0
