"""One decomposition from start to end: task and template -> prompts -> model -> saved run."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
from transformer_lens.model_bridge import TransformerBridge

from parts import io
from parts.components import HEAD, head_name, mlp_name, parse_component
from parts.data.prompts import PromptSet, build_prompts, label_token_ids
from parts.data.tasks import Task, get_task
from parts.decomposition.decompose import Decomposer
from parts.decomposition.fingerprint import check_reuse, run_fingerprint
from parts.decomposition.runs import RUN_KIND, DecompositionRun, is_legacy_run, is_saved_run, recorded_fingerprint
from parts.errors import PartsError
from parts.experiments.options import RunOptions, resolve
from parts.model import loading
from parts.model.loading import (
    RANDOM_INIT_MARK,
    is_local_name,
    model_name,
    plain_model,
    random_init_name,
    resolve_model_name,
)
from parts.model.readout import RESID_0, Layout, affine_parts, z_name

Loader = Callable[..., TransformerBridge]  # `parts.model.loading.load_model`'s signature


def check_fits_context(tokenizer: Any, prompts: PromptSet, n_ctx: int) -> None:
    """Every prompt fits the context window; else name the longest one, by its index in the split."""
    lengths = [len(ids) for ids in tokenizer(list(prompts.prompts))["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if n > n_ctx]
    if not too_long:
        return
    worst = max(too_long, key=lambda i: lengths[i])
    raise PartsError(
        f"{len(too_long)} of {len(prompts)} prompts exceed the model's context window of {n_ctx} tokens; the longest, "
        f"example {prompts.example_indices[worst]} of the {prompts.split} split, is {lengths[worst]} tokens "
        f"({lengths[worst] - n_ctx} too many): use fewer --shots, a shorter template or a model with a longer context"
    )


def check_finite(run: DecompositionRun, model: TransformerBridge | None = None) -> None:
    """Non-finite logits (an overflow, or broken weights) must stop the run, not be averaged into accuracies.

    Names the first affected example and the component where it starts. An overflow anywhere makes the
    final norm's scale non-finite and so every component's logits, so with the model at hand the
    example is rerun to find the earliest non-finite head or MLP output; without it, the earliest
    non-finite component logits in computation order (heads of a layer, then its MLP).
    """
    bad_examples = ~torch.isfinite(run.component_logits).all(-1).all(-1)
    bad_examples |= ~torch.isfinite(run.remainder).all(-1) | ~torch.isfinite(run.model_logits).all(-1)
    if not bad_examples.any():
        return
    row = int(bad_examples.nonzero()[0, 0])
    origin = overflow_origin(model, run.prompts.prompts[row]) if model is not None else None
    p = run.prompts
    raise PartsError(
        f"non-finite logits in {int(bad_examples.sum())} of {run.n_examples} examples, first example "
        f"{p.example_indices[row]} of the {p.split} split at {origin or first_non_finite_component(run, row)}: "
        "the model overflowed; load it in float32 (--dtype float32) or check its weights"
    )


def first_non_finite_component(run: DecompositionRun, row: int) -> str:
    """The earliest component, in computation order, whose logits for example `row` are not finite."""
    bad = ~torch.isfinite(run.component_logits[row]).all(-1)  # component
    if not bad.any():
        return "the embeddings or biases" if not torch.isfinite(run.remainder[row]).all() else "the model's own logits"

    def computation_order(index: int) -> tuple[int, int, int]:  # a layer's heads, then its MLP (or experts)
        component = parse_component(run.component_names[index])
        return component.layer, int(component.kind != HEAD), component.head

    first = min((i for i in range(len(run.component_names)) if bad[i]), key=computation_order)
    return f"component {run.component_names[first]} (and {int(bad.sum()) - 1} more)"


def overflow_origin(model: TransformerBridge, prompt: str) -> str | None:
    """Rerun one prompt and name the earliest head or MLP whose output is not finite (at any position)."""
    hf_model = plain_model(model)
    layout = Layout.from_bridge(model, hf_model)
    hooks = {RESID_0, *layout.mlp_out} | {z_name(layer) for layer in range(layout.n_layers)}
    tokens = torch.tensor([model.tokenizer(prompt)["input_ids"]], device=model.W_U.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
        if not torch.isfinite(cache[RESID_0]).all():
            return "the embeddings"
        for layer in range(layout.n_layers):
            W_O, _ = affine_parts(hf_model.get_submodule(layout.o_paths[layer]), layout.o_paths[layer])
            W_O_heads = einops.rearrange(W_O, "(head d_head) d_model -> head d_head d_model", head=layout.n_heads)
            z = cache[z_name(layer)].float().flatten(2)  # the bridge may split heads by its own d_head
            z = einops.rearrange(z, "batch pos (head d_head) -> batch pos head d_head", head=layout.n_heads)
            head_out = einops.einsum(z, W_O_heads, "batch pos head d_head, head d_head d_model -> batch pos head d_model")
            bad_heads = (~torch.isfinite(head_out)).any(-1).any(1).any(0)  # head
            if bad_heads.any():
                return f"component {head_name(layer, int(bad_heads.nonzero()[0, 0]))} (the first non-finite output)"
            if not torch.isfinite(cache[layout.mlp_out[layer]]).all():
                return f"component {mlp_name(layer)} (the first non-finite output)"
    return None


def run_decomposition(
    model: TransformerBridge | Any,
    prompts: PromptSet,
    options: RunOptions | None = None,
    fingerprint: dict[str, Any] | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> DecompositionRun:
    """Decompose every prompt of a prompt set with a loaded model, run as `options` say.

    `model`: a bridge from `parts.load_model`, or a plain Hugging Face causal LM (wrapped by
    `parts.model.loading.as_bridge`, with `tokenizer` or the one saved under its name).
    `overrides` are `RunOptions` fields (`engine="bridge"`, `progress=False`...): a shorthand. `fingerprint`
    (`expected_fingerprint` of the settings that made `prompts`) is saved with the run, the label words' token
    ids added; without it the run is never reused by a sweep.
    """
    options = resolve(options, **overrides)
    model = loading.as_bridge(model, tokenizer)
    ids = label_token_ids(model.tokenizer, prompts.label_words)
    check_fits_context(model.tokenizer, prompts, int(model.cfg.n_ctx))
    decomposer = Decomposer(model, ids, options.engine, split_experts=options.split_experts,
                            allow_inexact=options.allow_inexact)
    decomposition = decomposer(
        prompts.prompts,
        batch_size=options.batch_size,
        prefix_reuse=options.prefix_reuse,
        progress=options.progress,
        description=f"{prompts.task} t{prompts.template} s{prompts.seed} {prompts.split}",
        example_names=[f"example {i} of the {prompts.split} split" for i in prompts.example_indices],
    )
    token_ids = decomposer.tokenize(prompts.prompts)  # what the model was given, saved with the run
    bos = model.tokenizer.bos_token_id
    info = {"dtype": str(model.W_U.dtype).replace("torch.", ""), "prefix_reuse": options.prefix_reuse,
            "engine": decomposer.engine_name, **decomposer.info,
            "bos_prepended": bos is not None and all(t[0] == bos for t in token_ids)}
    run = DecompositionRun.from_decomposition(
        model_name(model), prompts, ids, decomposer.component_names, decomposer.n_layers,
        decomposer.n_heads, decomposition, token_ids,
        None if fingerprint is None else {**fingerprint, "label_token_ids": ids}, **info,
    )
    check_finite(run, model)
    return run


def decompose_task(
    model: TransformerBridge | Any,
    task: str | Path | Task,
    template: int = 1,
    seed: int = 0,
    shots: int | None = None,
    split: str = "test",
    limit: int | None = None,
    options: RunOptions | None = None,
    model_label: str | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> DecompositionRun:
    """Build the prompts of (task, template, seed, split) and decompose them (`overrides`: `RunOptions` fields;
    `model_label`: the model's name in the run's fingerprint, if not its own).

    `model` is a bridge from `parts.load_model` or a plain Hugging Face causal LM, with its `tokenizer` unless
    the one saved under its name is the one to use (`run_decomposition`)."""
    options = resolve(options, **overrides)
    model = loading.as_bridge(model, tokenizer)
    task = get_task(task) if not isinstance(task, Task) else task
    prompts = build_prompts(task, template, seed, shots, split, limit, options.data_dir)
    fingerprint = expected_fingerprint(model_label or model_name(model), task, template, seed, shots, split, limit,
                                       options)
    return run_decomposition(model, prompts, options, fingerprint)


def model_label(name: str | None, revision: str | None = None) -> str | None:
    """The model a sweep's runs are filed under: its name, with `@revision` for a hub checkpoint."""
    return name if revision is None else f"{name}@{revision}"


def model_slug(name: str | None, options: RunOptions | None = None) -> str:
    """A folder name for a model run with `options`, plus the options that change the numbers
    (`RunOptions.variant`, nothing for the defaults).

    A hub name has its '/' replaced (`EleutherAI--pythia-160m@step1000`). A local folder is named by its last part
    and a short hash of its full path (`step1000-3f2a9c1d`), not by the path spelled out (`--tmp--ckpts--step1000`):
    two folders of the same name in different places never share runs.
    """
    label = resolve_model_name(name)
    base, mark, seed = label.partition(RANDOM_INIT_MARK)  # a re-initialised model: `NAME+random-init-s{seed}`
    if is_local_name(base):
        folder = Path(base).expanduser().resolve()
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
        slug = f"{folder.name}-{digest}{mark}{seed}"
    else:
        slug = label.replace("/", "--")
    return slug.replace(" ", "_") + (options.variant if options is not None else "")


@dataclass(frozen=True)
class ModelSpec:
    """Which model a setting needs: a hub name or folder (None: the embedded model), a hub revision,
    or the architecture re-initialised at random (a control)."""

    name: str | None = None
    revision: str | None = None
    random_init: bool = False
    init_seed: int = 0

    @property
    def label(self) -> str:
        """The name its runs are filed under: `name`, `name@revision` or `name+random-init-s{seed}`."""
        name = resolve_model_name(self.name)
        if self.random_init:
            return random_init_name(name, self.init_seed)
        return str(model_label(name, self.revision))


def load_spec(spec: ModelSpec, options: RunOptions, loader: Loader | None = None) -> TransformerBridge:
    """Load the model `spec` names as `options` say (`loader`: a replacement for `load_model`, e.g. in tests)."""
    return (loader or loading.load_model)(spec.name, device=options.device, dtype=options.dtype,
                                          revision=spec.revision, random_init=spec.random_init, seed=spec.init_seed)


def run_dir(
    root: str | Path,
    model: str | None,
    task: str | Path | Task,
    template: int,
    seed: int,
    split: str = "test",
    shots: int | None = None,
    limit: int | None = None,
    options: RunOptions | None = None,
) -> Path:
    """Where a sweep keeps one run: `root/<model><variant>/<task>/t{template}-s{seed}-k{shots}-{split}-n{limit}`.

    Every setting that changes the numbers is in the path (the run options' through `model_slug`),
    so a finished folder can be reused.
    """
    task = get_task(task) if not isinstance(task, Task) else task
    shots = task.default_shots if shots is None else shots
    return Path(root) / model_slug(model, options) / task.name / run_folder_name(template, seed, shots, split, limit)


def transfer_run_dir(root: str | Path, model: str | None, source: Task, target: Task, template: int, seed: int,
                     shots: int, limit: int | None, options: RunOptions | None = None) -> Path:
    """Where a transfer keeps its target run: `root/<model>/transfer/<source>-to-<target>/<run_folder_name>`."""
    return (Path(root) / model_slug(model, options) / "transfer" / f"{source.name}-to-{target.name}"
            / run_folder_name(template, seed, shots, "test", limit))


def run_folder_name(template: int, seed: int, shots: int, split: str, limit: int | None) -> str:
    """`t{template}-s{seed}-k{shots}-{split}-n{limit}` (`nall` for every example)."""
    return f"t{template}-s{seed}-k{shots}-{split}-n{'all' if limit is None else limit}"


def expected_fingerprint(
    model: str | None,
    task: Task,
    template: int,
    seed: int,
    shots: int | None = None,
    split: str = "test",
    limit: int | None = None,
    options: RunOptions | None = None,
    **more: Any,
) -> dict[str, Any]:
    """The fingerprint (`parts.decomposition.fingerprint.run_fingerprint`) of a run of these settings made with
    `options`; `model` is the model's label (`ModelSpec.label`, or `model_name` of a loaded model)."""
    options = options or RunOptions()
    return run_fingerprint(model, task, template, seed, shots, split, limit, data_dir=options.data_dir,
                           dtype=options.dtype, engine=options.engine, prefix_reuse=options.prefix_reuse,
                           split_experts=options.split_experts, **more)


def reusable_run(path: str | Path, fingerprint: dict[str, Any], options: RunOptions) -> bool:
    """Whether the run saved at `path` may be reused where a run with `fingerprint` is wanted.

    False when there is none (or its summary is damaged: it is redone), or it was made otherwise and
    `options.recompute_changed` says to redo it; a one-line PartsError when it was made otherwise (or before
    parts recorded fingerprints) without that flag. Fields missing from `fingerprint` are not compared.
    """
    if not is_saved_run(path):
        return False
    try:
        recorded = recorded_fingerprint(path)
    except PartsError:
        return False  # damaged: run it again
    return check_reuse(path, recorded, fingerprint, options.recompute_changed)


def ensure_run(
    path: str | Path,
    model: TransformerBridge | None,
    load: bool = True,
    options: RunOptions | None = None,
    model_label: str | None = None,
    redo: bool = False,
    **settings: Any,
) -> DecompositionRun | None:
    """The finished run at `path`, or run it now with `options` and save it.

    `settings` are `decompose_task`'s (task, template, seed, shots, split, limit), and may include
    `RunOptions` fields as a shorthand. A finished run is reused only if its fingerprint matches these
    settings and the model (`model_label`, the label its runs are filed under, else the loaded `model`'s name;
    neither: the model is not compared): else it is
    refused, or redone with `options.recompute_changed`. A folder counts as finished only if it loads (runs
    are saved atomically), so an interrupted sweep reruns exactly what it had not finished. With `load=False`
    a finished run is not read; with `redo` a finished run of these settings is run again and replaced (one saved
    before parts stored something now needed). One process at a time makes a run: another waits, then reuses it.
    """
    overrides, settings = RunOptions.split(settings)
    options = resolve(options, **overrides)
    path = Path(path)
    task = settings.get("task")
    if task is None:
        raise ValueError("ensure_run needs task=")
    task = get_task(task) if not isinstance(task, Task) else task
    settings = {**settings, "task": task}
    label = model_label if model_label is not None else model_name(model) if model is not None else None
    wanted = expected_fingerprint(label, task, settings.get("template", 1), settings.get("seed", 0),
                                  settings.get("shots"), settings.get("split", "test"), settings.get("limit"), options)
    if label is None:
        del wanted["model"], wanted["model_files"]
    if model is not None:
        wanted["label_token_ids"] = label_token_ids(model.tokenizer, wanted["label_words"])
    with io.lock(path):  # a second process making this run waits for the first, then reuses its run
        if reusable_run(path, wanted, options) and not redo:
            if not load:
                return None
            try:
                return DecompositionRun.load(path)
            except PartsError:
                pass  # damaged or from another version: run it again
        io.check_folder(path, legacy=is_legacy_run, kind=RUN_KIND)  # refuse before the work if a user's folder is in the way
        if model is None:
            raise ValueError("a model is needed to run a missing decomposition")
        result = decompose_task(model, options=options, model_label=label, **settings)
        io.remove_stale_staging(path)  # what a killed save of this run left behind: the run is being redone
        result.save(path)
    return result


@dataclass(frozen=True)
class PlannedRun:
    """One decomposition of a plan (a driver `Work` item): its model, settings and run folder."""

    model: ModelSpec
    task: Task
    template: int
    seed: int
    path: Path
    shots: int | None = None
    split: str = "test"
    limit: int | None = None

    @property
    def label(self) -> str:
        return f"{self.task.name} t{self.template} s{self.seed}"

    @property
    def finished(self) -> bool:
        return is_saved_run(self.path)

    def fingerprint(self, options: RunOptions) -> dict[str, Any]:
        """What the run is made of (`expected_fingerprint`), the label words' token ids aside."""
        return expected_fingerprint(self.model.label, self.task, self.template, self.seed, self.shots, self.split,
                                    self.limit, options)

    def is_done(self, options: RunOptions) -> bool:
        """Finished, with the same fingerprint; a run made otherwise is refused (or, with
        `options.recompute_changed`, not done)."""
        return reusable_run(self.path, self.fingerprint(options), options)

    def run(self, model: Callable[[], TransformerBridge], options: RunOptions) -> None:
        ensure_run(self.path, model(), load=False, options=options, model_label=self.model.label, task=self.task,
                   template=self.template, seed=self.seed, shots=self.shots, split=self.split, limit=self.limit)

    def load(self, options: RunOptions) -> DecompositionRun:
        """The finished run (after the plan was driven), checked against this plan's fingerprint."""
        run = ensure_run(self.path, None, options=options, model_label=self.model.label, task=self.task,
                         template=self.template, seed=self.seed, shots=self.shots, split=self.split, limit=self.limit)
        assert run is not None
        return run

    @classmethod
    def of(cls, root: str | Path, model: ModelSpec, task: str | Task, template: int, seed: int, split: str = "test",
           shots: int | None = None, limit: int | None = None, options: RunOptions | None = None) -> PlannedRun:
        """The run of these settings under `root` (its folder from `run_dir`)."""
        task = get_task(task) if not isinstance(task, Task) else task
        path = run_dir(root, model.label, task, template, seed, split, shots, limit, options)
        return cls(model, task, template, seed, path, shots, split, limit)
