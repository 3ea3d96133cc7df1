"""One head up close: its label-word logits, where it looks from the last token (figure 6), and
where its vote comes from, token by token (`inspect_head`).

The logits come from a saved run (no model needed). The attention pattern needs the model: a
`run_with_cache` filtered to the one `blocks.{layer}.attn.hook_pattern` it reads, one prompt at a
time, keeping only the last token's row for the chosen head. The demonstrations' label words
are located in the prompt text (each demonstration ends with its label word, then the
separator) and mapped to token positions through the tokenizer's character offsets.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from parts.analysis.analyze import component_table
from parts.components import MLP, parse_component
from parts.data.tasks import get_task
from parts.decomposition.decompose import Decomposer
from parts.decomposition.effect_data import EFFECTS, TotalEffects
from parts.decomposition.runs import DecompositionRun
from parts.decomposition.sources import SourceAttribution, attribute_sources, check_heads
from parts.errors import PartsError


@dataclass(frozen=True)
class AttentionView:
    """Where a head looks from the last token of one prompt."""

    example: int  # index of the example in the run
    gold: int  # its gold label
    tokens: list[str]  # every position's token, as text
    pattern: Float[Tensor, " pos"]  # attention from the last position, sums to 1
    label_positions: list[int]  # positions of the demonstrations' label words


@dataclass(frozen=True)
class HeadInspection:
    """Everything figure 6 draws about one head."""

    component: str
    layer: int
    head: int
    accuracy: float
    label_bias: float
    category: str
    label_names: tuple[str, ...]
    logits: Float[Tensor, "example label"]  # the head's direct contribution to each label word's logit
    labels: Int[Tensor, " example"]  # gold labels
    attention: list[AttentionView]


def head_logits(run: DecompositionRun, component: str) -> Float[Tensor, "example label"]:
    """One component's label-word logits on every example of a run."""
    return run.component_logits[:, run.component_index(component), :]


def demonstration_label_spans(prompt: str, label_words: Sequence[str], separator: str = "\n", tail: str = ""
                              ) -> list[tuple[int, int]]:
    """Character spans of the label words that end a demonstration: a label word right after the
    template's literal `tail` (its text after the last field, e.g. "\nSentiment:") and right before
    the `separator`, so a label word inside an example's own text is not taken for one."""
    # Longest first, so a label word that is a prefix of another cannot take its place.
    words = "|".join(re.escape(w) for w in sorted(label_words, key=len, reverse=True))
    after = f"(?<={re.escape(tail)})" if tail else ""
    return [m.span() for m in re.finditer(f"{after}(?:{words})(?={re.escape(separator)})", prompt)]


def _template_tail(text: str) -> str:
    """A template's literal text after its last field (where the label word follows)."""
    return text[text.rfind("}") + 1:] if "}" in text else text


def spans_to_positions(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """The last token overlapping each character span (label words are single tokens)."""
    positions = []
    for start, end in spans:
        overlapping = [pos for pos, (a, b) in enumerate(offsets) if a < end and b > start]
        if overlapping:
            positions.append(overlapping[-1])
    return positions


def attention_from_last_token(
    model: TransformerBridge, token_ids: Sequence[int], layer: int, head: int
) -> Float[Tensor, " pos"]:
    """One head's attention from the last position over a prompt (one filtered forward pass)."""
    return heads_attention_from_last_token(model, token_ids, [(layer, head)])[0]


def heads_attention_from_last_token(
    model: TransformerBridge, token_ids: Sequence[int], heads: Sequence[tuple[int, int]]
) -> Float[Tensor, "head pos"]:
    """Several heads' attention from the last position over a prompt, in the order of `heads` ((layer, head)
    pairs): one forward pass cached at their layers' patterns only."""
    for layer, head in heads:
        if not 0 <= layer < model.cfg.n_layers or not 0 <= head < model.cfg.n_heads:
            raise PartsError(
                f"L{layer}H{head} is not in this model ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads): "
                "choose a head from the run's component names"
            )
    hooks = {f"blocks.{layer}.attn.hook_pattern" for layer, _ in heads}
    tokens = torch.tensor([list(token_ids)], device=model.W_U.device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    # cache[...]: "batch head query key"; the last query of batch row 0, one row per requested head
    return torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0, head, -1] for layer, head in heads]).float().cpu()


def view_tokens(tokenizer: Any, run: DecompositionRun, example: int) -> tuple[list[int], list[str], list[int]]:
    """What an attention view shows of one of the run's prompts beside the pattern, from the tokenizer alone: its
    token ids, every token as text, and the positions of the demonstrations' label words."""
    if not 0 <= example < run.n_examples:
        raise PartsError(f"example {example} is not in this run of {run.n_examples} examples: choose 0-{run.n_examples - 1}")
    prompt = run.prompts.prompts[example]
    encoded = tokenizer(prompt, return_offsets_mapping=True)
    token_ids = list(encoded["input_ids"])
    try:
        template = get_task(run.prompts.task).template(run.prompts.template)
        separator, tail = template.separator, _template_tail(template.text)
    except PartsError:  # a user task known only by name: the default separator, no tail check
        separator, tail = "\n", ""
    spans = demonstration_label_spans(prompt, run.prompts.label_words, separator, tail)
    return (token_ids, [tokenizer.decode([t]) for t in token_ids],
            spans_to_positions(encoded["offset_mapping"], spans))


def attention_view(model: TransformerBridge, run: DecompositionRun, example: int, layer: int, head: int) -> AttentionView:
    """The attention of one head from the last token of one of the run's prompts."""
    token_ids, tokens, label_positions = view_tokens(model.tokenizer, run, example)
    pattern = attention_from_last_token(model, token_ids, layer, head)
    return AttentionView(example=example, gold=run.prompts.labels[example], tokens=tokens, pattern=pattern,
                         label_positions=label_positions)


def head_inspection(
    run: DecompositionRun,
    component: str,
    model: TransformerBridge | None = None,
    examples: Sequence[int] = (0,),
    table: pd.DataFrame | None = None,
) -> HeadInspection:
    """Figure 6's data for one head of a run; attention only when a model is given.

    `table` is the run's `parts.analysis.analyze.component_table` (computed here when not given), the
    source of the head's label-bias score and category.
    """
    kind, layer, head = parse_component(component)
    if kind == MLP:
        raise PartsError(f"{component} is an MLP and has no attention pattern: choose a head like L3H5")
    if table is None:
        table = component_table(run)
    row = table.loc[table["component"] == component]
    if row.empty:
        raise PartsError(f"no component {component!r} in the table: names look like L0H0")
    attention = [attention_view(model, run, e, layer, head) for e in examples] if model is not None else []
    return HeadInspection(
        component=component,
        layer=layer,
        head=head,
        accuracy=float(row["accuracy"].iloc[0]),
        label_bias=float(row["label_bias"].iloc[0]),
        category=str(row["category"].iloc[0]),
        label_names=tuple(run.prompts.label_names),
        logits=head_logits(run, component),
        labels=run.labels,
        attention=attention,
    )


def top_attended(view: AttentionView, k: int = 5) -> pd.DataFrame:
    """The k positions a head attends to most from the last token, with their tokens."""
    order = torch.argsort(view.pattern, descending=True, stable=True)[:k].tolist()
    marked = set(view.label_positions)
    return pd.DataFrame({
        "position": order,
        "token": [view.tokens[p] for p in order],
        "attention": [float(view.pattern[p]) for p in order],
        "demonstration_label_word": [p in marked for p in order],
    })


def pick_heads(table: pd.DataFrame) -> dict[str, str]:
    """A head worth a look of each kind: the most accurate 'good' head (else the most accurate head)
    and the most one-sided 'label-biased' head, when there is one."""
    heads = table[table["kind"] == "head"]
    good = heads[heads["category"] == "good"]
    picked = {"good": str((good if len(good) else heads).sort_values("accuracy", ascending=False, kind="stable")
                          ["component"].iloc[0])}
    biased = heads[heads["category"] == "label-biased"]
    if len(biased):
        picked["label-biased"] = str(biased.sort_values("label_bias", ascending=False, kind="stable")["component"].iloc[0])
    return picked


# -- where a head's vote comes from, token by token ------------------------------------------------

SEGMENTS = ("BOS", "demonstration text", "demonstration label word", "separator", "query")


def token_segments(prompt: str, offsets: Sequence[tuple[int, int]], label_words: Sequence[str], separator: str = "\n",
                   tail: str = "") -> tuple[list[str], list[int], list[int]]:
    """Per token of a prompt: its segment (`SEGMENTS`), its demonstration (-1 outside one) and that
    demonstration's label (-1 outside one).

    The demonstrations are found by their label words (a label word after the template's `tail`, before the
    separator): demonstration i runs from the end of the previous separator to its label word, then its label
    word, then its separator; the query is what follows the last separator. A token (BPE may merge text
    with a label word) takes the segment most of its characters lie in, a label word on a tie; a token with no
    characters (a special token such as BOS) is "BOS".
    """
    spans = demonstration_label_spans(prompt, label_words, separator, tail)
    longest_first = sorted(label_words, key=len, reverse=True)
    kind = ["query"] * len(prompt)
    demo = [-1] * len(prompt)
    labels: list[int] = []
    start = 0
    for index, (a, b) in enumerate(spans):
        word = prompt[a:b]
        labels.append(list(label_words).index(next(w for w in longest_first if w == word)))
        for c in range(start, min(b + len(separator), len(prompt))):
            kind[c] = ("demonstration text" if c < a else "demonstration label word" if c < b else "separator")
            demo[c] = index
        start = b + len(separator)
    segments, demos, demo_labels = [], [], []
    rank = {name: i for i, name in enumerate(SEGMENTS)}
    for a, b in offsets:
        if b <= a:
            segments.append("BOS")
            demos.append(-1)
            demo_labels.append(-1)
            continue
        counts = pd.Series(kind[a:b]).value_counts()
        best = max(counts.index, key=lambda k: (counts[k], k == "demonstration label word", -rank[k]))
        owner = next((demo[c] for c in range(a, b) if kind[c] == best), -1)
        segments.append(str(best))
        demos.append(owner)
        demo_labels.append(labels[owner] if owner >= 0 else -1)
    return segments, demos, demo_labels


def _template_parts(run: DecompositionRun) -> tuple[str, str]:
    """(separator, tail) of a run's template; a user task known only by name: the default separator."""
    try:
        template = get_task(run.prompts.task).template(run.prompts.template)
        return template.separator, _template_tail(template.text)
    except PartsError:
        return "\n", ""


def check_run_model(run: DecompositionRun, model: TransformerBridge) -> None:
    """A one-line error unless `model` is the one `run` was decomposed with (shape and tokenisation)."""
    if run.n_examples == 0 or run.token_ids is None:
        raise PartsError(f"the run of {run.model} on {run.prompts.task} records no prompts' token ids (saved by an old "
                         "parts): rerun `parts decompose` to inspect its heads")
    shape = (int(model.cfg.n_layers), int(model.cfg.n_heads))
    if shape != (run.n_layers, run.n_heads):
        raise PartsError(f"the model ({shape[0]} layers x {shape[1]} heads) does not match the run of {run.model} "
                         f"({run.n_layers} x {run.n_heads}): load the run's model (`--model`)")
    ids = [int(t) for t in model.tokenizer(run.prompts.prompts[0])["input_ids"]]
    if ids != run.token_ids[0]:
        raise PartsError(f"the model's tokenizer does not give the token ids the run of {run.model} recorded: "
                         "load the run's model (`--model`)")


def run_sources(model: TransformerBridge, run: DecompositionRun, heads: Sequence[str],
                examples: Sequence[int] | None = None, engine: str = "hf", batch_size: int | str | None = 8,
                progress: bool = False) -> SourceAttribution:
    """Source attribution of heads of a saved run (all its examples, or `examples`), with the run's own token
    ids; the heads' direct effects must equal the run's component logits, else the model is not the run's."""
    check_run_model(run, model)
    check_heads(heads, run.n_layers, run.n_heads)
    chosen = list(range(run.n_examples)) if examples is None else [int(e) for e in examples]
    if not chosen or not all(0 <= e < run.n_examples for e in chosen):
        raise PartsError(f"examples must be in 0-{run.n_examples - 1} (the run has {run.n_examples})")
    assert run.token_ids is not None
    decomposer = Decomposer(model, run.label_token_ids, engine)
    result = attribute_sources(decomposer, [run.prompts.prompts[e] for e in chosen], heads, batch_size,
                               progress=progress, token_lists=[run.token_ids[e] for e in chosen])
    saved = run.component_logits[chosen][:, [run.component_index(h) for h in heads]]
    error = float((saved - result.direct).abs().max()) / float(saved.abs().max().clamp(min=1.0))
    if error > 1e-3:
        raise PartsError(f"the model does not match the run of {run.model}: the heads' direct effects differ from the "
                         f"run's by {error:.1e} (relative): load the run's model (`--model`)")
    return result


def source_table(run: DecompositionRun, attribution: SourceAttribution, tokenizer: Any,
                 examples: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (example, head, source position): the token, its segment, the head's attention to it and its
    vote (its label-word logits centred over the labels: toward the head's predicted label, the gold label and,
    inside a demonstration, that demonstration's label). Each vote column sums over an example's sources to the
    head's own centred logit for that label. `examples`: the run's indices of the attribution's examples."""
    chosen = list(range(run.n_examples)) if examples is None else list(examples)
    separator, tail = _template_parts(run)
    words: dict[int, str] = {}
    centred_direct = attribution.direct - attribution.direct.mean(-1, keepdim=True)
    frames = []
    for row, example in enumerate(chosen):
        prompt, ids = run.prompts.prompts[example], attribution.token_ids[row]
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != list(ids):
            raise PartsError("the tokenizer does not give the run's token ids: load the run's model (`--model`)")
        segments, demos, demo_labels = token_segments(prompt, encoded["offset_mapping"], run.prompts.label_words,
                                                      separator, tail)
        tokens = [words.setdefault(t, tokenizer.decode([t])) for t in ids]
        length, gold = len(ids), run.prompts.labels[example]
        for column, head in enumerate(attribution.heads):
            logits = attribution.logits[row, column, :length]
            votes = logits - logits.mean(-1, keepdim=True)  # source label
            predicted = int(attribution.direct[row, column].argmax())
            own = torch.tensor(demo_labels).clamp(min=0)
            frames.append(pd.DataFrame({
                "example": example, "head": head, "position": range(length), "token": tokens, "segment": segments,
                "demonstration": demos, "demonstration_label": demo_labels, "gold": gold, "predicted": predicted,
                "attention": attribution.attention[row, column, :length].numpy(),
                "vote_predicted": votes[:, predicted].numpy(), "vote_gold": votes[:, gold].numpy(),
                "vote_own_label": torch.where(torch.tensor(demos) >= 0, votes.gather(1, own[:, None])[:, 0],
                                              torch.nan).numpy(),
                "head_vote_predicted": float(centred_direct[row, column, predicted]),
                "head_vote_gold": float(centred_direct[row, column, gold]),
            }))
    return pd.concat(frames, ignore_index=True)


def segment_groups(sources: pd.DataFrame) -> pd.Series:
    """Each source's group for per-example shares: BOS, each demonstration's label word, each demonstration's
    text, the separators, the query."""
    demo = sources["demonstration"].astype(int) + 1
    group = sources["segment"].copy()
    text = sources["segment"] == "demonstration text"
    label = sources["segment"] == "demonstration label word"
    group[text] = "demonstration " + demo[text].astype(str) + " text"
    group[label] = "demonstration " + demo[label].astype(str) + " label word"
    group[sources["segment"] == "separator"] = "separators"
    return group


def example_shares(sources: pd.DataFrame) -> pd.DataFrame:
    """Per example and head, each group's attention and vote, and its share of the head's vote toward the
    predicted and the gold label (signed: shares sum to 1; a group voting against the label has a negative share)."""
    grouped = sources.assign(group=segment_groups(sources)).groupby(
        ["example", "head", "group"], sort=False, as_index=False).agg(
        attention=("attention", "sum"), vote_predicted=("vote_predicted", "sum"), vote_gold=("vote_gold", "sum"),
        head_vote_predicted=("head_vote_predicted", "first"), head_vote_gold=("head_vote_gold", "first"))
    grouped["share_predicted"] = grouped["vote_predicted"] / grouped["head_vote_predicted"]
    grouped["share_gold"] = grouped["vote_gold"] / grouped["head_vote_gold"]
    return grouped.drop(columns=["head_vote_predicted", "head_vote_gold"])


def source_profile(sources: pd.DataFrame) -> pd.DataFrame:
    """Per head and segment (`SEGMENTS`): the mean over examples of the attention it gets and of its vote toward
    the head's predicted label, and that vote's share of the head's whole vote (mean of sums / mean of totals)."""
    per_example = sources.groupby(["head", "example", "segment"], as_index=False).agg(
        attention=("attention", "sum"), vote_predicted=("vote_predicted", "sum"))
    full = per_example.pivot_table(index=["head", "example"], columns="segment",
                                   values=["attention", "vote_predicted"], fill_value=0.0)
    rows = []
    for head, frame in full.groupby(level="head", sort=False):
        total = frame["vote_predicted"].sum(axis=1).mean()
        for segment in SEGMENTS:
            attention = frame["attention"][segment] if segment in frame["attention"] else pd.Series(0.0)
            vote = frame["vote_predicted"][segment] if segment in frame["vote_predicted"] else pd.Series(0.0)
            rows.append({"head": head, "segment": segment, "attention": float(attention.mean()),
                         "attention_sd": float(attention.std(ddof=1)) if len(attention) > 1 else 0.0,
                         "vote_predicted": float(vote.mean()), "share_predicted": float(vote.mean() / total)})
    return pd.DataFrame(rows)


def head_scores(sources: pd.DataFrame) -> pd.DataFrame:
    """Per head over the examples:

    - copy score: the vote a demonstration's label word casts toward its own label per unit of attention on it
      (sum of votes / sum of attention, over every demonstration label word of every example), and copy rate:
      the attention-weighted share of label words that vote for their own label (above the labels' mean);
    - class matching: attention per demonstration (all its tokens) and vote toward the gold label per
      demonstration, from demonstrations whose label is the query's gold label vs from the others.
    """
    rows = []
    for head, frame in sources.groupby("head", sort=False):
        words = frame[frame["segment"] == "demonstration label word"]
        in_demo = frame[frame["demonstration"] >= 0]
        per_demo = in_demo.groupby(["example", "demonstration"], as_index=False).agg(
            attention=("attention", "sum"), vote_gold=("vote_gold", "sum"), label=("demonstration_label", "first"),
            gold=("gold", "first"))
        matching = per_demo["label"] == per_demo["gold"]
        attention = words["attention"].sum()
        rows.append({
            "head": head, "n_examples": frame["example"].nunique(), "n_label_words": len(words),
            "copy_score": float(words["vote_own_label"].sum() / attention) if attention > 0 else float("nan"),
            "copy_rate": float((words["attention"] * (words["vote_own_label"] > 0)).sum() / attention)
            if attention > 0 else float("nan"),
            "label_word_attention": float(words.groupby("example")["attention"].sum().mean()),
            "attention_matching": float(per_demo.loc[matching, "attention"].mean()),
            "attention_other": float(per_demo.loc[~matching, "attention"].mean()),
            "vote_gold_matching": float(per_demo.loc[matching, "vote_gold"].mean()),
            "vote_gold_other": float(per_demo.loc[~matching, "vote_gold"].mean()),
        })
    return pd.DataFrame(rows)


def top_sources(sources: pd.DataFrame, examples: Sequence[int], k: int = 5, context: int = 4) -> pd.DataFrame:
    """Per example in `examples`, the k sources with the largest |vote| toward the head's predicted label: their
    token, segment, attention, vote, share of the head's vote, and the text around them (the token in [brackets])."""
    rows = []
    for (example, head), frame in sources[sources["example"].isin(list(examples))].groupby(["example", "head"],
                                                                                            sort=False):
        tokens = frame["token"].tolist()
        chosen = frame.reindex(frame["vote_predicted"].abs().sort_values(ascending=False, kind="stable").index)[:k]
        for _, source in chosen.iterrows():
            p = int(source["position"])
            shown = "".join(tokens[max(0, p - context):p]) + "[" + tokens[p] + "]" + "".join(tokens[p + 1:p + 1 + context])
            rows.append({"example": example, "head": head, "position": p, "token": source["token"],
                         "segment": source["segment"], "demonstration": int(source["demonstration"]),
                         "attention": float(source["attention"]), "vote_predicted": float(source["vote_predicted"]),
                         "share_predicted": float(source["vote_predicted"] / source["head_vote_predicted"]),
                         "context": shown})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class HeadCard:
    """What `parts inspect` prints about one head, as DataFrames (the card is formatted from them alone)."""

    summary: pd.DataFrame  # one row: run, head, accuracy and category (whole run), direct effect (mean, sd of votes)
    profile: pd.DataFrame  # `source_profile`: attention and vote per prompt segment
    scores: pd.DataFrame  # `head_scores`: copy and class-matching scores
    top_sources: pd.DataFrame  # `top_sources` of the shown examples
    shares: pd.DataFrame  # `example_shares` of every example
    sources: pd.DataFrame  # `source_table`: every source of every example


def inspect_head(model: TransformerBridge, run: DecompositionRun, head: str, examples: int = 3, top: int = 5,
                 limit: int | None = None, engine: str = "hf", batch_size: int | str | None = 8,
                 table: pd.DataFrame | None = None, progress: bool = False,
                 effects: TotalEffects | None = None) -> HeadCard:
    """Where one head's vote comes from, token by token, over a run's examples (the first `limit`, default all),
    as DataFrames; `examples`: how many examples' top `top` sources to list (the first ones). `effects`: the run's
    total effects (`parts effects`; `TotalEffects.load(run_folder)`), summarised beside the direct effect."""
    check_heads([head], run.n_layers, run.n_heads)
    chosen = list(range(run.n_examples if limit is None else min(limit, run.n_examples)))
    attribution = run_sources(model, run, [head], chosen, engine, batch_size, progress)
    sources = source_table(run, attribution, model.tokenizer, chosen)
    table = component_table(run) if table is None else table
    row = table.loc[table["component"] == head].iloc[0]
    per_example = sources.groupby("example").first()
    p = run.prompts
    summary = pd.DataFrame([{
        "model": run.model, "task": p.task, "template": p.template, "seed": p.seed, "n_examples": len(chosen),
        "head": head, "run_examples": run.n_examples, "accuracy": float(row["accuracy"]), "category": str(row["category"]),
        "label_bias": float(row["label_bias"]),
        "direct_vote_gold": float(per_example["head_vote_gold"].mean()),
        "direct_vote_gold_sd": float(per_example["head_vote_gold"].std(ddof=1)) if len(chosen) > 1 else 0.0,
        "direct_vote_predicted": float(per_example["head_vote_predicted"].mean()),
        "max_source_error": attribution.max_error,
        **(total_effect_summary(effects, run, head) if effects is not None else {}),
    }])
    return HeadCard(summary, source_profile(sources), head_scores(sources),
                    top_sources(sources, chosen[:examples], top), example_shares(sources), sources)


def total_effect_summary(effects: TotalEffects, run: DecompositionRun, head: str) -> dict[str, Any]:
    """A head's total effect (`parts effects`) over the run: its vote for the gold label (mean, sd) and the
    accuracy of its total-effect classifier, with the ablation that measured it."""
    if head not in effects.component_names or effects.total_effects.shape[0] != run.n_examples:
        raise PartsError(f"the run's {EFFECTS} does not cover {head} on its {run.n_examples} examples: rerun `parts effects`")
    column = effects.component_names.index(head)
    total = effects.total_effects[:, column]
    votes = (total - total.mean(-1, keepdim=True))[torch.arange(run.n_examples), run.labels]
    return {"total_vote_gold": float(votes.mean()), "total_vote_gold_sd": float(votes.std()),
            "total_accuracy": float(effects.accuracy(run.labels)[column]),
            "total_ablation": str(effects.info.get("ablation", "?"))}


def format_card(card: HeadCard, label_names: Sequence[str]) -> str:
    """The card `parts inspect` prints, every number taken from the card's DataFrames."""
    s = card.summary.iloc[0]
    scores = card.scores.iloc[0]
    lines = [
        f"{s['head']} | {s['model']} | {s['task']} template {s['template']} seed {s['seed']} | n = {s['n_examples']}",
        f"accuracy {s['accuracy']:.1%}   category {s['category']}   label bias {s['label_bias']:.1%}   "
        f"(over the run's {s['run_examples']} examples)",
        f"direct effect: vote for the gold label {s['direct_vote_gold']:+.3f} logits (mean, sd {s['direct_vote_gold_sd']:.3f}); "
        f"for its own prediction {s['direct_vote_predicted']:+.3f}",
        f"   (a vote is the head's label-word logit minus its mean over the labels; sources sum to it within "
        f"{s['max_source_error']:.0e})",
        *([f"total effect ({s['total_ablation']} ablation, all {s['run_examples']} examples): vote for the gold label "
           f"{s['total_vote_gold']:+.3f} (sd {s['total_vote_gold_sd']:.3f}); accuracy {s['total_accuracy']:.1%}"]
          if "total_vote_gold" in card.summary else []),
        "",
        "where the vote for its prediction comes from (mean per example):",
        f"   {'segment':<26}{'attention':>10}{'vote':>10}{'share':>8}",
    ]
    for _, r in card.profile.iterrows():
        lines.append(f"   {r['segment']:<26}{r['attention']:>10.3f}{r['vote_predicted']:>+10.4f}{r['share_predicted']:>8.1%}")
    lines += [
        "",
        f"copy score {scores['copy_score']:+.3f} logits per unit of attention on a demonstration's label word, toward "
        f"that word's label (copy rate {scores['copy_rate']:.0%}; {scores['n_label_words']} label words)",
        f"class matching: attention per demonstration {scores['attention_matching']:.3f} when its label is the gold "
        f"label vs {scores['attention_other']:.3f} otherwise; vote for gold {scores['vote_gold_matching']:+.4f} vs "
        f"{scores['vote_gold_other']:+.4f}",
    ]
    for example, frame in card.top_sources.groupby("example", sort=False):
        gold = card.sources.loc[card.sources["example"] == example, ["gold", "predicted"]].iloc[0]
        lines += ["", f"example {example} (gold {label_names[int(gold['gold'])]}, head votes "
                      f"{label_names[int(gold['predicted'])]}): top sources"]
        for _, r in frame.iterrows():
            lines.append(f"   {r['share_predicted']:>7.1%} {r['vote_predicted']:>+8.4f}  att {r['attention']:.3f}  "
                         f"{r['segment']:<25} {r['context']!r}")
    return "\n".join(lines)
