"""Out-of-distribution transfer: the paper's Table 3, and reweighting under shift (an extension).

The paper's Table 3 (`single_component_transfer`): TRANSFER-1 is the single component most
accurate on the source (in-distribution) test set, scored on the shifted test set; ORACLE-1 is the
component most accurate on the shifted set itself (an upper bound); FULL is the full model on the
shifted set. The paper does not run reweighting under shift: the `comprw` / `calib+` rows here are
parts' own extension.

As in the paper (SST-2 -> Yelp, BoolQ -> BoolQ contrast set): for one source setting (task,
template, seed) the target's test examples are rendered with the source template after the
source's own demonstrations, so the prompt prefix is exactly the one the weights were learned
under. Component weights (`comprw`) and Calib+ class weights (`calib+`) are trained on the
source's 24 - k labelled training examples (`parts.reweighting.reweight`, `parts.reweighting.calibration`, the same
recipes as `parts evaluate`) and scored on both the source and the target test set, next to
the full model (`icl`, k-shot) and batch calibration. Rows are `parts.experiments.results` rows, so
`parts.experiments.results.results_table` prints the source task and "source -> target" as two lines.

Runs: the source's are ordinary `run_dir` folders (shared with `parts evaluate` under the same
root); the target's are `root/<model>/transfer/<source>-to-<target>/t{template}-s{seed}-k{k}-test-n{limit}`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from parts import io
from parts.data.prompts import LABEL_BUDGET, PromptSet, build_prompts, check_classes, render_prompt, sample_test
from parts.data.tasks import Task, get_task, load_split
from parts.decomposition.fingerprint import digest, split_hash
from parts.decomposition.runs import RUN_KIND, SUMMARY, DecompositionRun, is_legacy_run
from parts.errors import PartsError
from parts.experiments.driver import Executor, SettingWork, Work, drive
from parts.experiments.options import RunOptions, resolve
from parts.experiments.results import (
    TRANSFER_ARROW,
    TRANSFER_CSV,
    check_outputs,
    read_results,
    result_row,
    results_table,
    rows_reusable,
    setting_key,
    setting_keys,
    text_records,
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
    run_decomposition,
    run_dir,
    transfer_run_dir,
)
from parts.methods import method_labels
from parts.reweighting import calibration
from parts.reweighting.reweight import predict, train_weights

PAPER_PAIRS = (("sst2", "yelp"), ("boolq", "boolq_contrast"))
# The rows one setting writes: these methods on the source and the target test set, and the
# single-component transfers (`single_component_transfer`, less "full") on the target only.
SIDE_METHODS = ("icl", "batch", "calib+", "comprw")
TARGET_ONLY_METHODS = ("transfer-1", "oracle-1")


def transfer_name(source: Task, target: Task) -> str:
    """How the target side of a transfer is named in tables: 'sst2 -> yelp'."""
    return f"{source.name}{TRANSFER_ARROW}{target.name}"


def check_compatible(source: Task, target: Task, template: int) -> None:
    """The target must have the source's classes and the fields the source template reads."""
    if source.n_labels != target.n_labels:
        raise PartsError(
            f"{target.name} has {target.n_labels} labels but {source.name} has {source.n_labels}: "
            "a transfer target needs the source's classes (in the same order)"
        )
    fields = source.template(template).fields
    target_fields = set(target.template(min(target.templates)).fields)
    missing = [f for f in fields if f not in target_fields]
    if missing:
        raise PartsError(
            f"{source.name} template {template} reads field(s) {', '.join(missing)} that {target.name} does not "
            f"have: give the target's rows those fields"
        )


def transfer_prompts(
    source: Task, target: Task, template: int = 1, seed: int = 0, shots: int | None = None,
    limit: int | None = None, data_dir: str | Path | None = None,
) -> PromptSet:
    """The target's test examples (the usual balanced sample) after the source's demonstrations and template."""
    check_compatible(source, target, template)
    with warnings.catch_warnings():  # one test example, built for its demonstrations only: no warning about it
        warnings.simplefilter("ignore")
        shown = build_prompts(source, template, seed, shots, "test", 1, data_dir)
    source_train = load_split(source, "train", data_dir)
    demonstrations = [source_train[i] for i in shown.demonstrations]
    rows = load_split(target, "test", data_dir)
    if not rows:
        raise PartsError(f"the test split of {target.name} is empty: check the data directory")
    indices = sample_test(target, [row["label"] for row in rows], "test", limit)
    check_classes(target, [row["label"] for row in rows], "test", indices)
    chosen_template = source.template(template)
    try:
        prompts = tuple(render_prompt(chosen_template, demonstrations, rows[i]) for i in indices)
    except KeyError as err:
        raise PartsError(f"a {target.name} test row has no field {err}: the source template needs it") from None
    return PromptSet(
        task=target.name, template=template, seed=seed, shots=shown.shots, split="test",
        label_names=source.label_names, label_words=shown.label_words, demonstrations=shown.demonstrations,
        example_indices=tuple(indices), prompts=prompts, labels=tuple(rows[i]["label"] for i in indices), limit=limit,
    )


@dataclass(frozen=True)
class TransferSetting:
    """One transfer setting: source and target task, the source's template and seed, and how many examples of each."""

    source: Task
    target: Task
    template: int
    seed: int
    source_limit: int | None = 40
    target_limit: int | None = 100
    shots: int | None = None

    @property
    def k(self) -> int:
        return self.source.default_shots if self.shots is None else self.shots

    def target_fingerprint(self, model: str, options: RunOptions) -> dict[str, Any]:
        """The target run's fingerprint: the target's test rows after the source's template and demonstrations."""
        return expected_fingerprint(model, self.target, self.template, self.seed, self.k, "test", self.target_limit,
                                    options, template_task=self.source)

    def fingerprint(self, model: str, options: RunOptions) -> dict[str, Any]:
        """What the setting's rows are made of: the source test run's fingerprint (its training split's hash
        covers the weights' training examples) and the target's task, test rows and sample size."""
        return {**expected_fingerprint(model, self.source, self.template, self.seed, self.k, "test", self.source_limit,
                                       options),
                "target_task": self.target.name, "target_data": split_hash(self.target, "test", options.data_dir),
                "target_sample": "all" if self.target_limit is None else self.target_limit}


def method_predictions(
    source_train: DecompositionRun, **recipe: Any
) -> dict[str, tuple[Callable[[DecompositionRun], Int[Tensor, " example"]], str]]:
    """Each method as a function of a test run (learned once on the source's labelled examples), with a note."""
    weights = train_weights(source_train.component_logits, source_train.labels, **recipe)
    class_weights = calibration.train_calib_plus(source_train.model_logits, source_train.labels)
    return {
        "icl": (lambda run: run.full_predictions, ""),
        "batch": (lambda run: calibration.batch_predict(run.model_logits), ""),
        "calib+": (lambda run: calibration.calib_plus_predict(class_weights.weights, run.model_logits),
                   "class weights " + " ".join(f"{w:.3f}" for w in class_weights.weights.tolist())),
        "comprw": (lambda run: predict(weights.weights, run.component_logits),
                   f"train acc {weights.train_accuracy:.3f}; {weights.stopped_because} after {weights.epochs} epochs"),
    }


def best_component(accuracy: Tensor) -> int:
    """The most accurate component (ties: the earlier one, as `DecompositionRun.top_components`)."""
    return int(torch.argsort(accuracy, descending=True, stable=True)[0])


def single_component_transfer(source_test: DecompositionRun, target_test: DecompositionRun
                              ) -> dict[str, tuple[str, Int[Tensor, " example"]]]:
    """The paper's Table 3 on the target test set: `{method: (component, predictions)}` for FULL
    (the full model, component ""), TRANSFER-1 (the best component on the source test set) and
    ORACLE-1 (the best component on the target test set itself: an upper bound)."""
    if source_test.component_names != target_test.component_names:
        raise PartsError("source and target runs have different components: transfer within one model")
    chosen = best_component(source_test.component_accuracy)
    oracle = best_component(target_test.component_accuracy)
    names = target_test.component_names
    return {
        "full": ("", target_test.full_predictions),
        "transfer-1": (names[chosen], target_test.component_predictions[:, chosen]),
        "oracle-1": (names[oracle], target_test.component_predictions[:, oracle]),
    }


def evaluate_transfer(
    model: Callable[[], Any], model_arg: str | None, setting: TransferSetting, root: str | Path,
    options: RunOptions | None = None, **recipe: Any,
) -> list[dict[str, Any]]:
    """Source and target accuracy of every method for one setting; runs only what is not on disk.

    `model()` returns the loaded model (called only when a run is missing). `recipe` goes to
    `train_weights`, except `RunOptions` fields (`progress=False`...), a shorthand for `options`.
    """
    overrides, recipe = RunOptions.split(recipe)
    options = resolve(options, **overrides)
    source, target, k = setting.source, setting.target, setting.k
    common: dict[str, Any] = {"template": setting.template, "seed": setting.seed, "shots": k, "options": options}

    label = ModelSpec(model_arg).label

    def source_run(split: str, limit: int | None) -> DecompositionRun:
        path = run_dir(root, model_arg, source, setting.template, setting.seed, split, k, limit, options)
        wanted = expected_fingerprint(label, source, setting.template, setting.seed, k, split, limit, options)
        run = ensure_run(path, None if reusable_run(path, wanted, options) else model(), model_label=label,
                         task=source, split=split, limit=limit, **common)
        assert run is not None
        return run

    source_test = source_run("test", setting.source_limit)
    source_train = source_run("train", LABEL_BUDGET - k)
    target_path = transfer_run_dir(root, model_arg, source, target, setting.template, setting.seed, k,
                                   setting.target_limit, options)
    wanted = setting.target_fingerprint(label, options)
    with io.lock(target_path):  # a second process making this run waits for the first, then reuses its run
        if reusable_run(target_path, wanted, options):
            target_test = DecompositionRun.load(target_path)
        else:
            io.check_folder(target_path, legacy=is_legacy_run, kind=RUN_KIND)  # refuse before the work
            prompts = transfer_prompts(source, target, setting.template, setting.seed, k, setting.target_limit,
                                       options.data_dir)
            target_test = run_decomposition(model(), prompts, options, wanted)
            target_test.info["demonstrations_from"] = source.name
            target_test.save(target_path)

    name = model_slug(model_arg, options)
    made_of = digest(setting.fingerprint(label, options))
    rows = []
    for method, (predictions_of, note) in method_predictions(source_train, **recipe).items():
        for task_name, run, limit in ((source.name, source_test, setting.source_limit),
                                      (transfer_name(source, target), target_test, setting.target_limit)):
            accuracy = float((predictions_of(run) == run.labels).float().mean())
            rows.append(result_row(name, task_name, setting.template, setting.seed, k, limit, method,
                                   method_labels(method, k, LABEL_BUDGET), accuracy, run.n_examples, note, made_of))
    target_name = transfer_name(source, target)
    for method, (component, predictions) in single_component_transfer(source_test, target_test).items():
        if method == "full":
            continue  # the target's `icl` row below
        accuracy = float((predictions == target_test.labels).float().mean())
        note = f"{component}, chosen on the {'source' if method == 'transfer-1' else 'target (upper bound)'} test set"
        rows.append(result_row(name, target_name, setting.template, setting.seed, k, setting.target_limit, method,
                               method_labels(method, k, LABEL_BUDGET), accuracy, target_test.n_examples, note, made_of))
    return rows


def transfer_setting_predictions(root: str | Path, model_arg: str | None, setting: TransferSetting, **recipe: Any
                                 ) -> dict[tuple[str, str, int], tuple[Int[Tensor, " example"], Int[Tensor, " example"]]]:
    """Every method's predictions for a finished transfer setting, from its run folders alone:
    `{(task name, method, labels): (gold labels, predictions)}` for the source test set and the target
    ("source -> target"), the paper's FULL / TRANSFER-1 / ORACLE-1 included (FULL is the `icl` row)."""
    source, target, k = setting.source, setting.target, setting.k
    paths = {
        "source test": run_dir(root, model_arg, source, setting.template, setting.seed, "test", k, setting.source_limit),
        "source train": run_dir(root, model_arg, source, setting.template, setting.seed, "train", k, LABEL_BUDGET - k),
        "target test": transfer_run_dir(root, model_arg, source, target, setting.template, setting.seed, k,
                                        setting.target_limit),
    }
    missing = [f"{what} ({path})" for what, path in paths.items() if not (path / SUMMARY).is_file()]
    if missing:
        raise PartsError(f"transfer setting {source.name}->{target.name} t{setting.template} s{setting.seed} is not "
                         f"finished: no {missing[0]}; run `parts transfer` for it first")
    source_test, source_train, target_test = (DecompositionRun.load(p) for p in paths.values())
    out: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}
    target_name = transfer_name(source, target)
    for method, (predictions_of, _) in method_predictions(source_train, **recipe).items():
        for task_name, run in ((source.name, source_test), (target_name, target_test)):
            out[(task_name, method, method_labels(method, k, LABEL_BUDGET))] = (run.labels, predictions_of(run))
    for method, (_, predictions) in single_component_transfer(source_test, target_test).items():
        if method != "full":
            out[(target_name, method, k)] = (target_test.labels, predictions)
    return out


def transfer_settings(
    pairs: Sequence[tuple[str, str]], templates: Sequence[int], seeds: Sequence[int],
    source_limit: int | None = 40, target_limit: int | None = 100, shots: int | None = None,
) -> list[TransferSetting]:
    """Every (pair, template, seed), seed-major; incompatible pairs fail now, not an hour in."""
    settings = []
    resolved = [(get_task(s), get_task(t)) for s, t in pairs]
    for source, target in resolved:
        for template in templates:
            check_compatible(source, target, template)
    for seed in seeds:
        for template in templates:
            for source, target in resolved:
                settings.append(TransferSetting(source, target, template, seed, source_limit, target_limit, shots))
    return settings


def transfer_gap(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean target accuracy minus mean source accuracy per method (negative: accuracy lost in the shift)."""
    gaps = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        source = [float(r["accuracy"]) for r in rows if r["method"] == method and " -> " not in r["task"]]
        target = [float(r["accuracy"]) for r in rows if r["method"] == method and " -> " in r["task"]]
        if source and target:
            gaps[method] = float(torch.tensor(target).mean() - torch.tensor(source).mean())
    return gaps


# -- transfer as a driver plan ------------------------------------------------------------------------
def transfer_rows_of(results: pd.DataFrame, model: str, setting: TransferSetting) -> pd.DataFrame:
    """The rows of `results` that belong to `setting` for `model` (source and target lines)."""
    keys = {setting_key(model, setting.source.name, setting.template, setting.seed, setting.k, setting.source_limit),
            setting_key(model, transfer_name(setting.source, setting.target), setting.template, setting.seed, setting.k,
                        setting.target_limit)}
    return results[setting_keys(results).map(lambda key: key in keys).astype(bool)]


@dataclass(frozen=True)
class TransferWork(SettingWork[TransferSetting]):
    """One transfer setting as a driver `Work` item: done when `transfer.csv` holds its rows."""

    @property
    def label(self) -> str:
        return f"{transfer_name(self.setting.source, self.setting.target)} t{self.setting.template} s{self.setting.seed}"

    def is_done(self, options: RunOptions) -> bool:
        """Every row is in `transfer.csv`, made of the same (`TransferSetting.fingerprint`); rows made otherwise
        are refused, or with `options.recompute_changed` redone."""
        have = transfer_rows_of(read_results(self.root / TRANSFER_CSV), model_slug(self.model.label, options),
                                self.setting)
        if not rows_reusable(self.root / TRANSFER_CSV, have, self.setting.fingerprint(self.model.label, options),
                             options.recompute_changed, f"the rows of {self.label}"):
            return False
        target = transfer_name(self.setting.source, self.setting.target)
        wanted = {(self.setting.source.name, m) for m in SIDE_METHODS}
        wanted |= {(target, m) for m in SIDE_METHODS + TARGET_ONLY_METHODS}
        return wanted <= set(zip(have["task"], have["method"], strict=True))

    def run(self, model: Callable[[], TransformerBridge], options: RunOptions) -> list[dict[str, Any]]:
        return evaluate_transfer(model, self.model.label, self.setting, self.root, options)


def transfer_works(model: ModelSpec, settings: Sequence[TransferSetting], root: str | Path) -> list[TransferWork]:
    """One work item per setting: what `parts transfer` runs (or reuses) under `root`."""
    return [TransferWork(model, setting, Path(root)) for setting in settings]


def transfer_outputs(model: ModelSpec, root: str | Path, options: RunOptions) -> tuple[Path, Path]:
    """The files `parts transfer` writes under `root`: its rows (`transfer.csv`) and its markdown table."""
    root = Path(root)
    return root / TRANSFER_CSV, root / f"transfer-{model_slug(model.label, options)}.md"


def run_transfer(model: ModelSpec, settings: Sequence[TransferSetting], root: str | Path, options: RunOptions,
                 executor: Executor | None = None, loader: Loader | None = None) -> tuple[list[dict[str, str]], Path]:
    """Every transfer setting not yet in `root/transfer.csv`; returns all the settings' rows and the table's path.

    Rows reach `transfer.csv` (and the table is rewritten) as each setting finishes, written by this
    process only, so an interrupted transfer sweep loses no finished setting.
    """
    root = Path(root)
    plan = transfer_works(model, settings, root)
    name = model_slug(model.label, options)
    csv_path, table = transfer_outputs(model, root, options)
    templates = ",".join(map(str, dict.fromkeys(s.template for s in settings)))
    seeds = ",".join(map(str, dict.fromkeys(s.seed for s in settings)))
    header = (f"{name}: transfer, accuracy (%) mean ± std over templates {templates} x seeds {seeds}; "
              f"source n={settings[0].source_limit}, target n={settings[0].target_limit}")
    check_outputs(csv_path, table)  # a user's file in the way: refused now, not after the first setting

    def settings_rows() -> list[dict[str, str]]:
        everything = read_results(csv_path)
        return [row for setting in settings for row in text_records(transfer_rows_of(everything, name, setting))]

    def record(work: Work, rows: list[dict[str, Any]]) -> None:
        assert isinstance(work, TransferWork)
        fingerprint = work.setting.fingerprint(model.label, options)
        # merged by key: a resumed sweep rewrites the same rows
        write_results(csv_path, rows, {digest(fingerprint): fingerprint})
        write_table(table, results_table(settings_rows()), header)

    drive(plan, options, loader=loader, record=record, executor=executor, description="transfer settings")
    rows = settings_rows()
    write_table(table, results_table(rows), header)
    return rows, table
