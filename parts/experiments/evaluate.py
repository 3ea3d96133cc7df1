"""Component reweighting against its baselines, per (task, template, seed), as in the paper's main table.

For one setting, on the same test examples and the same labelled examples:

| method | labels | what |
|---|---|---|
| `icl` | k | the full model with the run's k demonstrations (the test run's own logits) |
| `icl` | L | all L labelled examples, shuffled together (the last two of different labels), as demonstrations |
| `calib+` | L | per-class weights on the k-shot probabilities, trained on the L - k others |
| `comprw` | L | per-component weights, trained on the L - k others (`parts.reweighting.reweight`) |
| `contextual` | k | k-shot probabilities divided by the content-free prior |
| `batch` | k | k-shot probabilities minus the test batch's mean |
| `oracle` | k | per-component weights trained on the test set itself: an optimistic reference, not a method and not a bound |

and the methods beyond the paper (`beyond_paper_predictions`, docs/guide/methods.md), each trained on the same
L - k training examples as CompRW, never on the test labels:

| method | labels | what |
|---|---|---|
| `comprw-signed` | L | CompRW with weights clipped to [-1, 1] |
| `probe-resid` | L | logistic regression on the last-token final residual after the final norm, L2 by leave-one-out |
| `probe-logits` | L | logistic regression on the components x labels logits, L2 by leave-one-out |
| `calib-affine` | L | a scale and a bias per class on the k-shot label logits, L2 by leave-one-out |
| `mask-biased` | L | the sum of the components not label-biased on the training prompts |

Decompositions are `parts.experiments.runner.ensure_run` folders (reused when finished); the L-shot and
content-free logits and the learned weights are saved beside the test run. Rows go to
`results.csv` (merged with rows already there, written atomically), so a sweep resumes
where it stopped and several sweeps can share one output root.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from parts import io
from parts.data.prompts import LABEL_BUDGET, many_shot_order, render_prompt
from parts.data.tasks import Example, Task, Template, check_tasks, load_split
from parts.decomposition.decompose import Decomposer
from parts.decomposition.fingerprint import RECOMPUTE_FLAG, digest
from parts.decomposition.runs import DecompositionRun, is_legacy_run
from parts.errors import PartsError
from parts.experiments.driver import Executor, SettingWork, Work, drive
from parts.experiments.options import RunOptions, resolve
from parts.experiments.results import (
    ORACLE_NOTE,
    RESULTS_CSV,
    check_outputs,
    read_results,
    result_row,
    results_table,
    rows_reusable,
    setting_key,
    setting_keys,
    write_results,
    write_table,
)
from parts.experiments.runner import (
    Loader,
    ModelSpec,
    ensure_run,
    expected_fingerprint,
    model_slug,
    reusable_run,
    run_dir,
)
from parts.methods import MAIN_METHODS
from parts.reweighting import calibration, masking, supervised
from parts.reweighting.gates import gated_logits, gated_logits_file, gates_file, train_gates
from parts.reweighting.reweight import load_weights, predict, save_weights, train_weights, weights_file


# -- L-shot prompts ------------------------------------------------------------------------------
def leading_demonstrations_to_drop(tokenizer: Any, template: Template, demonstrations: Sequence[Example],
                                   queries: Sequence[Example], n_ctx: int) -> int:
    """The fewest leading demonstrations to drop so that every query's prompt fits in `n_ctx` tokens.

    Dropping whole demonstrations from the left (rather than tokens per prompt) keeps one shared
    prefix for every query, so prefix reuse still applies. `tokenizer` is called on the list of prompts
    (one batch call: the same ids as one at a time; `parts.experiments.plan.CachedTokenizer` too).
    """
    for dropped in range(len(demonstrations) + 1):
        shown = demonstrations[dropped:]
        prompts = [render_prompt(template, shown, q) for q in queries]
        if all(len(ids) <= n_ctx for ids in tokenizer(prompts)["input_ids"]):
            return dropped
    alone = [len(ids) for ids in tokenizer([render_prompt(template, [], q) for q in queries])["input_ids"]]
    index = max(range(len(queries)), key=alone.__getitem__)
    query = render_prompt(template, [], queries[index])
    raise PartsError(f"test prompt {index} alone ({query[:60]!r}{'...' if len(query) > 60 else ''}) is {alone[index]} "
                     f"tokens, {alone[index] - n_ctx} more than the context window of {n_ctx} tokens: "
                     "use a model with a longer context or shorter inputs")


def many_shot_prompts(tokenizer: Any, template: Template, demonstrations: Sequence[Example],
                      queries: Sequence[Example], n_ctx: int, description: str = "") -> tuple[list[str], int]:
    """Every query after all `demonstrations`, left-truncated (whole demonstrations) to fit `n_ctx`.

    Returns the prompts and how many leading demonstrations were dropped (with a warning).
    """
    dropped = leading_demonstrations_to_drop(tokenizer, template, demonstrations, queries, n_ctx)
    if dropped:
        warnings.warn(
            f"{description}: {len(demonstrations)}-shot prompts exceed the {n_ctx}-token context window; "
            f"dropped the first {dropped} demonstrations ({len(demonstrations) - dropped} shown)", stacklevel=2,
        )
    shown = demonstrations[dropped:]
    return [render_prompt(template, shown, q) for q in queries], dropped


def label_logits(model: TransformerBridge, prompts: Sequence[str], label_token_ids: Sequence[int],
                 options: RunOptions | None = None, description: str = "", **overrides: Any
                 ) -> Float[Tensor, "example label"]:
    """The full model's logits at the label words (no decomposition kept), run as `options` say
    (`overrides`: `RunOptions` fields, a shorthand).

    Non-finite logits stop here (as `parts.experiments.runner.check_finite` does for decompositions): averaged into
    an accuracy they would pass for wrong answers.
    """
    options = resolve(options, **overrides)
    logits = Decomposer(model, label_token_ids, options.engine, allow_inexact=options.allow_inexact)(
        prompts, batch_size=options.batch_size, prefix_reuse=options.prefix_reuse, progress=options.progress,
        description=description,
    ).model_logits
    bad = ~torch.isfinite(logits).all(-1)
    if bad.any():
        raise PartsError(
            f"non-finite logits in {int(bad.sum())} of {len(prompts)} {description or 'evaluation'} prompts, first prompt "
            f"{int(bad.nonzero()[0, 0])}: the model overflowed; load it in float32 (--dtype float32) or check its weights"
        )
    return logits


_LOGITS_METADATA = "parts"


def _cached_logits(path: Path, compute: Callable[[], tuple[Tensor, dict[str, str]]]) -> tuple[Tensor, dict[str, str]]:
    """Logits saved at `path` (with string metadata), or computed now and saved atomically.

    The metadata is stored under one key as sorted JSON: safetensors writes several keys in a random
    order, so equal logits computed in two processes gave unequal bytes. Older files (one key each) still load.
    """
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            stored = dict(handle.metadata() or {})
            return handle.get_tensor("logits"), (json.loads(stored[_LOGITS_METADATA]) if _LOGITS_METADATA in stored
                                                  else stored)
    logits, metadata = compute()
    io.remove_stale_staging(path)  # what a process killed while saving it left behind
    tensors = {"logits": logits.contiguous().cpu()}
    stored = {_LOGITS_METADATA: json.dumps(metadata, sort_keys=True)}
    io.write_file(path, lambda staging: save_file(tensors, str(staging), metadata=stored), legacy=is_legacy_run)
    return logits, metadata


# -- One setting ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One (task, template, seed) of a sweep and how its runs are sized."""

    task: Task
    template: int
    seed: int
    limit: int | None  # test examples
    labels: tuple[int, ...] = (LABEL_BUDGET,)  # label budgets: k demonstrations + (L - k) training examples
    shots: int | None = None
    gates: bool = False  # also the in-forward gates (`parts.reweighting.gates`; optional: costly)

    @property
    def k(self) -> int:
        return self.task.default_shots if self.shots is None else self.shots

    def expected_methods(self) -> set[tuple[str, int]]:
        methods = [m for m in MAIN_METHODS if not m.optional or (m.key == "gates" and self.gates)]
        at_k = {(m.key, self.k) for m in methods if m.at_k}
        return at_k | {(m.key, n) for n in self.labels for m in methods if m.at_budget}


def setting_fingerprint(model_arg: str | None, setting: Setting, options: RunOptions) -> dict[str, Any]:
    """What a setting's rows are made of: its test run's fingerprint (which holds the training split's hash, so
    the budget runs' too); `model_arg` is the model's label."""
    return expected_fingerprint(ModelSpec(model_arg).label, setting.task, setting.template, setting.seed, setting.k,
                                "test", setting.limit, options)


def _accuracy(predictions: Tensor, run: DecompositionRun) -> float:
    return float((predictions == run.labels).float().mean())


NO_RESIDUAL = ("stores no final residual (saved before parts stored one), which the residual probe (probe-resid) "
               f"needs: pass {RECOMPUTE_FLAG} to recompute it")


def beyond_paper_predictions(train: DecompositionRun, test: DecompositionRun, residual: bool = True, **recipe: Any
                             ) -> dict[str, tuple[Int[Tensor, " example"], str]]:
    """Each method beyond the paper (`parts.methods`, `beyond_paper`): its predictions on the test examples and
    the note of its results row. Trained on `train` (the L - k labelled examples: their labels and
    decompositions) and applied to `test`'s decompositions; `test`'s labels are never read. `recipe` goes to
    `train_weights` (signed CompRW's). `residual=False` leaves out the residual probe; else a run without its
    final residual is a one-line PartsError."""
    out: dict[str, tuple[Tensor, str]] = {}
    n_labels = test.component_logits.shape[-1]
    if residual:
        for run in (train, test):
            if run.final_residual is None:
                raise PartsError(f"the {run.prompts.split} run of {run.prompts.task} t{run.prompts.template} "
                                 f"s{run.prompts.seed} {NO_RESIDUAL}")
        assert train.final_residual is not None and test.final_residual is not None
        probe = supervised.fit_probe("probe-resid", train.final_residual, train.labels, n_labels)
        out["probe-resid"] = (probe.predict(test.final_residual), probe.note)
    signed = train_weights(train.component_logits, train.labels, **{**recipe, "signed": True})
    out["comprw-signed"] = (predict(signed.weights, test.component_logits, signed=True),
                            f"train acc {signed.train_accuracy:.3f}; {signed.stopped_because} after {signed.epochs} "
                            f"epochs; {int((signed.weights < 0).sum())} weights below 0")
    probe = supervised.fit_probe("probe-logits", train.component_logits, train.labels, n_labels)
    out["probe-logits"] = (probe.predict(test.component_logits), probe.note)
    calibrated = supervised.fit_affine_calibration(train.model_logits, train.labels, method="calib-affine")
    out["calib-affine"] = (calibrated.predict(test.model_logits), calibrated.note)
    keep = masking.mask_biased(train.component_logits)
    out["mask-biased"] = (masking.mask_predict(keep, test.component_logits),
                          f"masked {int((~keep).sum())} of {len(keep)} components")
    return out


def _gates(model: TransformerBridge, train: DecompositionRun, test: DecompositionRun, test_dir: Path, budget: int,
           **recipe: Any) -> tuple[Tensor, dict[str, str]]:
    """The in-forward gates trained on `train` (saved beside the test run) and the test examples' gated logits."""
    gates = train_gates(model, train, **{key: value for key, value in recipe.items() if key not in ("clip", "signed")})
    save_weights(gates_file(test_dir, budget), test.component_names, gates, labels=budget, method="gates")
    note = (f"train acc {gates.train_accuracy:.3f}; {gates.stopped_because} after {gates.epochs} epochs; "
            f"{int((gates.clipped < 0.5).sum())} gates below 0.5")
    return gated_logits(model, test, gates.weights), {"note": note}


def evaluate_setting(
    model: Callable[[], TransformerBridge], model_arg: str | None, setting: Setting, root: str | Path,
    options: RunOptions | None = None, **recipe: Any,
) -> list[dict[str, Any]]:
    """Every method's test accuracy for one setting (one row each); runs only what is not on disk.

    `model()` returns the loaded model (called only when something is missing). `recipe` goes to
    `train_weights`, except `RunOptions` fields (`progress=False`...), a shorthand for `options`.
    """
    overrides, recipe = RunOptions.split(recipe)
    options = resolve(options, **overrides)
    data_dir = options.data_dir
    task, k = setting.task, setting.k
    where = {"model": model_arg, "task": task, "template": setting.template, "seed": setting.seed, "shots": k,
             "options": options}
    run_settings: dict[str, Any] = {"template": setting.template, "seed": setting.seed, "shots": k, "options": options}

    model_label = ModelSpec(model_arg).label

    def decomposition(split: str, limit: int | None) -> DecompositionRun:
        path = run_dir(root, split=split, limit=limit, **where)  # type: ignore[arg-type]
        wanted = expected_fingerprint(model_label, task, setting.template, setting.seed, k, split, limit, options)
        loaded = reusable_run(path, wanted, options)
        run = ensure_run(path, None if loaded else model(), model_label=model_label, task=task, split=split, limit=limit,
                         **run_settings)
        assert run is not None
        if run.final_residual is None:  # saved before parts stored it: the residual probe cannot run on it
            if not options.recompute_changed:
                raise PartsError(f"{path} {NO_RESIDUAL}")
            run = ensure_run(path, model(), model_label=model_label, task=task, split=split, limit=limit, redo=True,
                             **run_settings)
            assert run is not None
        return run

    test = decomposition("test", setting.limit)
    test_dir = run_dir(root, split="test", limit=setting.limit, **where)  # type: ignore[arg-type]
    name, n_test = model_slug(model_arg, options), test.n_examples
    label = f"{task.name} t{setting.template} s{setting.seed}"
    made_of = digest(setting_fingerprint(model_arg, setting, options))

    def _row(model: str, setting: Setting, method: str, labels: int, accuracy: float, n_test: int, note: str = ""
             ) -> dict[str, Any]:
        return result_row(model, setting.task.name, setting.template, setting.seed, setting.k, setting.limit, method,
                          labels, accuracy, n_test, note, made_of)

    rows = [_row(name, setting, "icl", k, test.full_accuracy, n_test)]

    train_rows = load_split(task, "train", data_dir)
    test_rows = load_split(task, "test", data_dir)
    demonstrations = [train_rows[i] for i in test.prompts.demonstrations]
    template = task.template(setting.template)

    def compute_content_free() -> tuple[Tensor, dict[str, str]]:
        prompts = calibration.content_free_prompts(template, demonstrations)
        quiet = options.replace(progress=False)
        return label_logits(model(), prompts, test.label_token_ids, quiet, f"{label} content-free"), {}

    content_free, _ = _cached_logits(test_dir / "content-free.safetensors", compute_content_free)
    prior = calibration.contextual_prior(content_free)
    rows.append(_row(name, setting, "contextual", k, _accuracy(calibration.contextual_predict(test.model_logits, prior), test),
                     n_test, "prior " + " ".join(f"{p:.3f}" for p in prior.tolist())))
    rows.append(_row(name, setting, "batch", k, _accuracy(calibration.batch_predict(test.model_logits), test), n_test))

    oracle = train_weights(test.component_logits, test.labels, **recipe)
    save_weights(weights_file(test_dir, "oracle"), test.component_names, oracle, trained_on="test set (optimistic reference)")
    rows.append(_row(name, setting, "oracle", k, oracle.train_accuracy, n_test,
                     f"{ORACLE_NOTE}; {oracle.stopped_because} "
                     f"after {oracle.epochs} epochs"))

    for budget in setting.labels:
        train = decomposition("train", budget - k)
        weights = train_weights(train.component_logits, train.labels, **recipe)
        save_weights(weights_file(test_dir, budget), test.component_names, weights, labels=budget,
                     # relative to the output root, so equal runs write equal bytes wherever they live
                     train_run=str(run_dir(".", split="train", limit=budget - k, **where)))  # type: ignore[arg-type]
        trained = f"train acc {weights.train_accuracy:.3f}; {weights.stopped_because} after {weights.epochs} epochs"
        rows.append(_row(name, setting, "comprw", budget, _accuracy(predict(weights.weights, test.component_logits), test),
                         n_test, trained))
        class_weights = calibration.train_calib_plus(train.model_logits, train.labels)
        rows.append(_row(name, setting, "calib+", budget,
                         _accuracy(calibration.calib_plus_predict(class_weights.weights, test.model_logits), test), n_test,
                         "class weights " + " ".join(f"{w:.3f}" for w in class_weights.weights.tolist())))
        for method, (predicted, note) in beyond_paper_predictions(train, test, **recipe).items():
            rows.append(_row(name, setting, method, budget, _accuracy(predicted, test), n_test, note))
        if setting.gates:
            def compute_gates(train: DecompositionRun = train, budget: int = budget) -> tuple[Tensor, dict[str, str]]:
                return _gates(model(), train, test, test_dir, budget, **recipe)
            gated, info = _cached_logits(gated_logits_file(test_dir, budget), compute_gates)
            rows.append(_row(name, setting, "gates", budget, _accuracy(gated.argmax(-1), test), n_test, info["note"]))

        def compute_many_shot(train: DecompositionRun = train, budget: int = budget) -> tuple[Tensor, dict[str, str]]:
            drawn = demonstrations + [train_rows[i] for i in train.prompts.example_indices]
            # all L shuffled together, the last two of different labels (the authors' code)
            labelled = [drawn[i] for i in many_shot_order(task, setting.seed, [d["label"] for d in drawn])]
            queries = [test_rows[i] for i in test.prompts.example_indices]
            loaded = model()
            prompts, dropped = many_shot_prompts(loaded.tokenizer, template, labelled, queries, int(loaded.cfg.n_ctx),
                                                 f"{label} {budget}-shot")
            logits = label_logits(loaded, prompts, test.label_token_ids, options, f"{label} {budget}-shot")
            return logits, {"dropped": str(dropped), "shown": str(len(labelled) - dropped)}

        many_logits, info = _cached_logits(test_dir / f"icl-labels{budget}.safetensors", compute_many_shot)
        dropped = int(info.get("dropped", "0"))
        note = f"left-truncated: first {dropped} of {budget} demonstrations dropped" if dropped else ""
        rows.append(_row(name, setting, "icl", budget, _accuracy(many_logits.argmax(-1), test), n_test, note))
    return rows


def setting_predictions(root: str | Path, model_arg: str | None, setting: Setting
                        ) -> tuple[Int[Tensor, " example"], dict[tuple[str, int], Int[Tensor, " example"]]]:
    """Every method's prediction on every test example of a finished setting, from its files alone
    (no model): the test run's logits, the saved weights, the cached L-shot and content-free logits.
    Calib+ is retrained on the saved training run (deterministic). Returns the gold labels and
    `{(method, labels): predictions}`, the same keys as the setting's `results.csv` rows."""
    task, k = setting.task, setting.k
    where = {"model": model_arg, "task": task, "template": setting.template, "seed": setting.seed, "shots": k}
    test_dir = run_dir(root, split="test", limit=setting.limit, **where)  # type: ignore[arg-type]
    needed = [test_dir / "summary.json", test_dir / "content-free.safetensors", weights_file(test_dir, "oracle")]
    for budget in setting.labels:
        needed += [weights_file(test_dir, budget), test_dir / f"icl-labels{budget}.safetensors",
                   run_dir(root, split="train", limit=budget - k, **where) / "summary.json"]  # type: ignore[arg-type]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise PartsError(f"setting {task.name} t{setting.template} s{setting.seed} is not finished ({missing[0]} is "
                         "missing): run `parts evaluate` for it first")
    test = DecompositionRun.load(test_dir)
    content_free, _ = _cached_logits(test_dir / "content-free.safetensors", lambda: (torch.empty(0), {}))
    predictions = {
        ("icl", k): test.full_predictions,
        ("contextual", k): calibration.contextual_predict(test.model_logits, calibration.contextual_prior(content_free)),
        ("batch", k): calibration.batch_predict(test.model_logits),
        ("oracle", k): predict(load_weights(test_dir, "oracle")[1], test.component_logits),
    }
    for budget in setting.labels:
        train = DecompositionRun.load(run_dir(root, split="train", limit=budget - k, **where))  # type: ignore[arg-type]
        predictions[("comprw", budget)] = predict(load_weights(test_dir, budget)[1], test.component_logits)
        class_weights = calibration.train_calib_plus(train.model_logits, train.labels)
        predictions[("calib+", budget)] = calibration.calib_plus_predict(class_weights.weights, test.model_logits)
        stored = train.final_residual is not None and test.final_residual is not None  # runs saved before: no probe
        for method, (predicted, _) in beyond_paper_predictions(train, test, residual=stored).items():
            predictions[(method, budget)] = predicted
        if gated_logits_file(test_dir, budget).is_file():  # the optional gates, where they ran
            gated, _ = _cached_logits(gated_logits_file(test_dir, budget), lambda: (torch.empty(0), {}))
            predictions[("gates", budget)] = gated.argmax(-1)
        many, _ = _cached_logits(test_dir / f"icl-labels{budget}.safetensors", lambda: (torch.empty(0), {}))
        predictions[("icl", budget)] = many.argmax(-1)
    return test.labels, predictions


# -- results.csv -------------------------------------------------------------------------------------
def finished(results: pd.DataFrame, model: str, setting: Setting) -> bool:
    """Whether `results` already hold every method of `setting` for `model`."""
    key = _setting_key(model, setting)
    mine = results[setting_keys(results).map(lambda k: k == key).astype(bool)]
    return setting.expected_methods() <= set(zip(mine["method"], mine["labels"], strict=True))


def _setting_key(model: str, setting: Setting) -> tuple:
    return setting_key(model, setting.task.name, setting.template, setting.seed, setting.k, setting.limit)


def select(results: pd.DataFrame, model: str, settings: Sequence[Setting]) -> pd.DataFrame:
    """The rows of `results` that belong to `settings` (for `model`), in the order of `settings`."""
    wanted = {_setting_key(model, s): order for order, s in enumerate(settings)}
    budgets = {n for s in settings for n in s.labels} | {s.k for s in settings}
    order = setting_keys(results).map(lambda key: wanted.get(key, -1))
    chosen = (order >= 0) & results["labels"].isin(budgets)
    return results[chosen].assign(_order=order[chosen]).sort_values("_order", kind="stable").drop(columns="_order")


def sweep_settings(tasks: Sequence[str], templates: Sequence[int], seeds: Sequence[int], limit: int | None,
                   labels: Sequence[int], shots: int | None = None, gates: bool = False) -> list[Setting]:
    """Every (task, template, seed), seed-major: an interrupted sweep leaves whole seeds done (`gates`: with the
    optional in-forward gates)."""
    resolved = check_tasks(tasks, templates, shots, labels)  # fail now, not an hour in
    return [Setting(task, template, seed, limit, tuple(labels), shots, gates)
            for seed in seeds for template in templates for task in resolved]


def table_path(root: str | Path, model_arg: str | None, limit: int | None, options: RunOptions | None = None) -> Path:
    """`results-<model>-n<limit>.md`: one table per model (and variant) and test size, so sweeps sharing a root
    do not clash."""
    return Path(root) / f"results-{model_slug(model_arg, options)}-n{'all' if limit is None else limit}.md"


# -- the evaluation as a driver plan ---------------------------------------------------------------
@dataclass(frozen=True)
class EvaluateWork(SettingWork[Setting]):
    """One setting of `parts evaluate` as a driver `Work` item: done when `results.csv` holds its rows."""

    @property
    def label(self) -> str:
        return f"{self.setting.task.name} t{self.setting.template} s{self.setting.seed}"

    def is_done(self, options: RunOptions) -> bool:
        """Every method's row is in `results.csv`, made of the same (`setting_fingerprint`); rows made otherwise
        are refused, or with `options.recompute_changed` redone."""
        results = read_results(self.root / RESULTS_CSV)
        name = model_slug(self.model.label, options)
        key = _setting_key(name, self.setting)
        mine = results[setting_keys(results).map(lambda k: k == key).astype(bool)]
        wanted = setting_fingerprint(self.model.label, self.setting, options)
        return (rows_reusable(self.root / RESULTS_CSV, mine, wanted, options.recompute_changed, f"the rows of {self.label}")
                and finished(results, name, self.setting))

    def fingerprint(self, options: RunOptions) -> dict[str, Any]:
        return setting_fingerprint(self.model.label, self.setting, options)

    def run(self, model: Callable[[], TransformerBridge], options: RunOptions) -> list[dict[str, Any]]:
        return evaluate_setting(model, self.model.label, self.setting, self.root, options)


def evaluation_plan(model: ModelSpec, settings: Sequence[Setting], root: str | Path) -> list[EvaluateWork]:
    """One work item per setting: what `parts evaluate` runs (or reuses) under `root`."""
    return [EvaluateWork(model, setting, Path(root)) for setting in settings]


def evaluation_header(plan: Sequence[EvaluateWork], options: RunOptions) -> str:
    """The line above the table: model, test size, and which templates and seeds the means are over."""
    first = plan[0]
    templates = ",".join(map(str, dict.fromkeys(w.setting.template for w in plan)))
    seeds = ",".join(map(str, dict.fromkeys(w.setting.seed for w in plan)))
    return (f"{model_slug(first.model.label, options)}, test examples per task: {first.setting.limit or 'all'}; "
            f"accuracy (%) mean ± std over templates {templates} x seeds {seeds}")


def evaluation_rows(plan: Sequence[EvaluateWork], options: RunOptions) -> pd.DataFrame:
    """The plan's rows already in `results.csv`, in plan order."""
    first = plan[0]
    return select(read_results(first.root / RESULTS_CSV), model_slug(first.model.label, options),
                  [w.setting for w in plan])


def evaluation_table_path(plan: Sequence[EvaluateWork], options: RunOptions) -> Path:
    """Where the plan's markdown table goes: `results-<model>-n<limit>.md` beside `results.csv`."""
    first = plan[0]
    return table_path(first.root, first.model.label, first.setting.limit, options)


def evaluation_table(plan: Sequence[EvaluateWork], options: RunOptions) -> tuple[str, Path]:
    """The markdown table of the plan's rows already in `results.csv`, written beside it; (table, its path)."""
    text = results_table(evaluation_rows(plan, options))
    return text, write_table(evaluation_table_path(plan, options), text, evaluation_header(plan, options))


def run_evaluation(plan: Sequence[EvaluateWork], options: RunOptions, executor: Executor | None = None,
                   loader: Loader | None = None) -> tuple[str, Path]:
    """Evaluate every setting of `plan` not yet in `results.csv`; returns the table and its path.

    Rows reach `results.csv` (and the table is rewritten) as each setting finishes, written by this
    process only, so an interrupted evaluation loses no finished setting.
    """
    if not plan:
        raise PartsError("nothing to evaluate: give at least one task, template and seed")
    # Refuse now, not after the first setting, if a user's file is in the way.
    check_outputs(plan[0].root / RESULTS_CSV, evaluation_table_path(plan, options))

    def record(work: Work, rows: list[dict[str, Any]]) -> None:
        assert isinstance(work, EvaluateWork)
        fingerprint = work.fingerprint(options)
        write_results(work.root / RESULTS_CSV, rows, {digest(fingerprint): fingerprint})
        evaluation_table(plan, options)

    drive(plan, options, loader=loader, record=record, executor=executor)
    return evaluation_table(plan, options)
