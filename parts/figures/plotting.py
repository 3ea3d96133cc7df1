"""The paper's figures as plotly figures, each built from plain data.

Every function takes what it draws (a component table from `parts.analysis.analyze.component_table`,
two tables and their correlation, a results DataFrame, a weight tensor, a `HeadInspection`)
and returns a `go.Figure`; nothing here runs a model or reads files. Accuracy colours are one
diverging scale on [0, 1] whose neutral colour sits at chance: red below, blue above, so the
same colour means the same accuracy in every figure of a task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import einops
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from parts.components import EXPERT, HEAD, MLP, SHARED_EXPERT, component_kind, parse_component
from parts.errors import PartsError
from parts.experiments.results import method_summary

if TYPE_CHECKING:
    from parts.analysis.inspect_head import AttentionView, HeadInspection

BELOW, NEUTRAL, ABOVE = "#b2182b", "#f7f7f7", "#2166ac"
# parts' own significance categories, an extension: the paper's measures are ORACLE-T1 / ORACLE-B1 and one label
CATEGORIES_TITLE = "Good, bad and label-biased components (parts' significance categories)"
HEAD_COLOR, MLP_COLOR, EXPERT_COLOR = "#1f77b4", "#ff7f0e", "#8c564b"
CATEGORY_COLORS = {"good": "#1a9850", "bad": "#d73027", "label-biased": "#7b3294", "neutral": "#969696"}
FONT = dict(family="Liberation Sans, Arial, sans-serif", size=13)


def _kind_styles(kinds: Sequence[str] | np.ndarray) -> list[tuple[str, str, str, str]]:
    """(kind, colour, legend name, marker symbol) for heads, MLPs and, where there are any, split experts."""
    styles = [(HEAD, HEAD_COLOR, "attention heads", "circle"), (MLP, MLP_COLOR, "MLPs", "diamond")]
    return styles + ([(EXPERT, EXPERT_COLOR, "experts", "square")] if EXPERT in set(kinds) else [])


# -- shared pieces -------------------------------------------------------------------------
def accuracy_colorscale(chance: float) -> list[list[Any]]:
    """Red (0) -> near-white (chance) -> blue (1): a diverging scale centred on chance on a fixed [0, 1] range."""
    if not 0.0 < chance < 1.0:
        raise PartsError(f"chance accuracy must be between 0 and 1, got {chance}: pass the run's `chance`")
    return [
        [0.0, BELOW], [chance / 2, "#ef8a62"], [chance, NEUTRAL],
        [chance + (1 - chance) / 2, "#67a9cf"], [1.0, ABOVE],
    ]


def accuracy_colorbar(chance: float, full_accuracy: float) -> dict[str, Any]:
    """A colour bar whose ticks mark chance and the full model's accuracy by name."""
    marks = {chance: f"chance {chance:.0%}", full_accuracy: f"full model {full_accuracy:.0%} ◀"}
    # Drop round ticks that would collide with the two named ones.
    ticks = {v: f"{v:.0%}" for v in (0.0, 0.25, 0.5, 0.75, 1.0) if all(abs(v - m) > 0.06 for m in marks)}
    ticks.update(marks)
    values = sorted(ticks)
    return dict(title=dict(text="accuracy", side="right"), tickvals=values, ticktext=[ticks[v] for v in values], ticks="outside")


def _style(figure: go.Figure, title: str, width: int, height: int) -> go.Figure:
    figure.update_layout(
        title=dict(text=title, x=0.01, xanchor="left"), template="plotly_white", font=FONT,
        width=width, height=height, margin=dict(l=60, r=30, t=100 if "<br>" in title else 70, b=55),
    )
    return figure


def _reference_lines(figure: go.Figure, chance: float, full_accuracy: float) -> None:
    """Horizontal dashed lines at chance and at the full model's accuracy, labelled at their right end."""
    figure.add_hline(chance, line=dict(color="#555", dash="dot", width=1), annotation_text=f"chance {chance:.0%}",
                     annotation_position="top right", annotation_font_size=11)
    figure.add_hline(full_accuracy, line=dict(color="black", dash="dash", width=1.5),
                     annotation_text=f"full model {full_accuracy:.0%}", annotation_position="top right",
                     annotation_font_size=11)


def _check_columns(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise PartsError(f"{what} needs columns {missing}: pass a table from parts.analysis.analyze.component_table")


def _grid(table: pd.DataFrame, column: str, kind: str) -> np.ndarray:
    """One column of the table as a [layer, head] grid (heads), a [layer, expert] grid (a split
    mixture-of-experts MLP's experts, the shared one last) or a [layer, 1] column (MLPs)."""
    rows = table[table["kind"] == kind]
    n_layers = int(table["layer"].max()) + 1
    if kind == MLP:
        n_cols, cols = 1, np.zeros(len(rows), dtype=int)
    else:
        slots = _slots(table, kind)
        n_cols, cols = len(slots), np.searchsorted(slots, rows["head"].to_numpy())
    grid = np.full((n_layers, n_cols), None, dtype=object)
    grid[rows["layer"].to_numpy(), cols] = rows[column].to_numpy()
    return grid


def heatmap_cells(table: pd.DataFrame) -> list[list[int]]:
    """Where `accuracy_heatmap` draws each row of `table`: [panel (trace), layer, column], in table order
    (the report redraws the grid per run from these)."""
    panels = [kind for kind in (HEAD, MLP, EXPERT) if (table["kind"] == kind).any()]
    columns = {kind: {int(h): c for c, h in enumerate(_slots(table, kind))} for kind in panels if kind != MLP}
    return [[panels.index(kind), int(layer), 0 if kind == MLP else columns[kind][int(head)]]
            for kind, layer, head in zip(table["kind"], table["layer"], table["head"], strict=True)]


def _slots(table: pd.DataFrame, kind: str) -> np.ndarray:
    """The grid's columns: every head index (0..max), or every expert index that occurs (shared last)."""
    heads = table.loc[table["kind"] == kind, "head"].to_numpy()
    return np.arange(int(heads.max()) + 1) if kind == HEAD else np.unique(heads)


# -- figure 1: accuracy heatmap ------------------------------------------------------------------
HOVER_COMPONENT = (
    "<b>%{customdata[0]}</b><br>accuracy %{z:.1%}<br>label bias %{customdata[1]:.2f}<br>%{customdata[2]}<extra></extra>"
)


def accuracy_heatmap(table: pd.DataFrame, full_accuracy: float, chance: float, title: str = "") -> go.Figure:
    """Figure 1: every head's accuracy on a layers x heads grid, the MLPs as a column beside it (and, with
    `--split-experts`, each layer's experts as a layers x experts grid)."""
    _check_columns(table, ["component", "kind", "layer", "head", "accuracy", "label_bias", "category"], "the heatmap")
    panels = [kind for kind in (HEAD, MLP, EXPERT) if (table["kind"] == kind).any()]
    widths = {HEAD: len(_slots(table, HEAD)) if HEAD in panels else 0, MLP: 1.4,
              EXPERT: len(_slots(table, EXPERT)) if EXPERT in panels else 0}
    titles = {HEAD: "attention heads", MLP: "MLPs", EXPERT: "experts"}
    figure = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, column_widths=[widths[k] for k in panels],
                           horizontal_spacing=0.02, subplot_titles=[titles[k] for k in panels])
    for col, kind in enumerate(panels, start=1):
        z = _grid(table, "accuracy", kind)
        custom = np.stack([_grid(table, c, kind) for c in ("component", "label_bias", "category")], axis=-1)
        if kind == MLP:
            x = ["MLP"]
        else:
            x = [str(h) if kind == HEAD else "S" if h == SHARED_EXPERT else f"E{h}" for h in _slots(table, kind)]
        figure.add_trace(
            go.Heatmap(z=z, x=x, y=list(range(z.shape[0])), customdata=custom, coloraxis="coloraxis",
                       hovertemplate=HOVER_COMPONENT, xgap=1, ygap=1, name=f"{kind}s"),
            row=1, col=col,
        )
    figure.update_layout(coloraxis=dict(colorscale=accuracy_colorscale(chance), cmin=0.0, cmax=1.0,
                                        colorbar=accuracy_colorbar(chance, full_accuracy)))
    figure.update_xaxes(title_text="head", row=1, col=1)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    n_layers = int(table["layer"].max()) + 1
    width = 760 + (14 * int(widths[EXPERT]) + 40 if EXPERT in panels else 0)
    return _style(figure, title or "Accuracy of every component", width, max(420, 140 + 17 * n_layers))


# -- figure 2: categorization scatter -------------------------------------------------------------
def bias_axis(table: pd.DataFrame, label_names: Sequence[str]) -> tuple[str, str]:
    """The scatter's x column and title: share of label 1 for two classes, else the label-bias score."""
    share = f"share_{label_names[1]}" if len(label_names) == 2 else ""
    if share in table.columns:
        return share, f"share of examples predicted '{label_names[1]}'"
    return "label_bias", "label-bias score (share of the most predicted label)"


def categorization_scatter(
    table: pd.DataFrame, full_accuracy: float, chance: float, label_names: Sequence[str],
    label_bias_threshold: float = 0.9, title: str = "",
) -> go.Figure:
    """Figure 2: each component at (how one-sided its predictions are, its accuracy)."""
    _check_columns(table, ["component", "kind", "accuracy", "label_bias", "category"], "the categorization scatter")
    x_column, x_title = bias_axis(table, label_names)
    figure = go.Figure()
    # Label-biased regions first, so points draw over them.
    biased = dict(fillcolor=CATEGORY_COLORS["label-biased"], opacity=0.08, line_width=0, layer="below")
    if x_column == "label_bias":
        figure.add_vrect(x0=label_bias_threshold, x1=1.02, **biased)
    else:
        figure.add_vrect(x0=-0.02, x1=1 - label_bias_threshold, **biased)
        figure.add_vrect(x0=label_bias_threshold, x1=1.02, **biased)
    for kind, color, name, symbol in _kind_styles(table["kind"].to_numpy()):
        rows = table[table["kind"] == kind]
        figure.add_trace(go.Scatter(
            x=rows[x_column], y=rows["accuracy"], mode="markers", name=name,
            marker=dict(color=color, size=6 if kind == HEAD else 8, opacity=0.75,
                        symbol=symbol, line=dict(width=0.5, color="white")),
            customdata=np.stack([rows["component"], rows["label_bias"], rows["category"]], axis=-1),
            hovertemplate="<b>%{customdata[0]}</b><br>accuracy %{y:.1%}<br>label bias %{customdata[1]:.2f}"
                          "<br>%{customdata[2]}<extra></extra>",
        ))
    _reference_lines(figure, chance, full_accuracy)
    counts = table["category"].value_counts()
    # Regions as parts.analysis.analyze.categorize draws them: good is significantly above chance and at least
    # the full model; bad is significantly below chance (the test's margin is not drawn).
    figure.add_hrect(y0=full_accuracy, y1=1.02, fillcolor=CATEGORY_COLORS["good"], opacity=0.07, line_width=0, layer="below")
    figure.add_hrect(y0=-0.02, y1=chance, fillcolor=CATEGORY_COLORS["bad"], opacity=0.05, line_width=0, layer="below")
    for text, y, category in (("good: ≥ full model and above chance", 0.98, "good"),
                              ("bad: below chance", 0.02, "bad")):
        figure.add_annotation(x=0.5, y=y, text=f"{text} ({counts.get(category, 0)})", showarrow=False,
                              font=dict(color=CATEGORY_COLORS[category], size=12))
    biased_text = dict(y=1.06, text=f"label-biased ({counts.get('label-biased', 0)})", showarrow=False,
                       font=dict(color=CATEGORY_COLORS["label-biased"], size=12))
    if x_column == "label_bias":
        figure.add_annotation(x=1.0, xanchor="right", **biased_text)
    else:
        figure.add_annotation(x=0.5, **biased_text | dict(text=f"◀ label-biased ({counts.get('label-biased', 0)}) ▶"))
    figure.update_xaxes(title_text=x_title, range=[-0.02, 1.02], tickformat=".0%")
    figure.update_yaxes(title_text="accuracy", range=[-0.02, 1.1], tickformat=".0%")
    figure.update_layout(legend=dict(orientation="h", y=-0.15))
    return _style(figure, title or CATEGORIES_TITLE, 700, 560)


# -- figure 3: stability ----------------------------------------------------------------------------
def stability_scatter(
    accuracy_a: Float[Tensor, " component"] | Sequence[float],
    accuracy_b: Float[Tensor, " component"] | Sequence[float],
    component_names: Sequence[str],
    correlation: Mapping[str, float],
    name_a: str,
    name_b: str,
    chance: float,
    title: str = "",
) -> go.Figure:
    """Figure 3a: each component's accuracy in one run against another, the correlation in the title."""
    a = np.asarray(accuracy_a, dtype=float)
    b = np.asarray(accuracy_b, dtype=float)
    if a.shape != b.shape or len(a) != len(component_names):
        raise PartsError(f"runs differ in components ({len(a)} vs {len(b)}): compare runs of the same model")
    kinds = np.array([component_kind(n) for n in component_names])
    figure = go.Figure()
    for kind, color, label, symbol in _kind_styles(kinds):
        keep = kinds == kind
        figure.add_trace(go.Scatter(
            x=a[keep], y=b[keep], mode="markers", name=label, text=np.asarray(component_names)[keep],
            marker=dict(color=color, size=7, opacity=0.7, symbol=symbol),
            hovertemplate=f"<b>%{{text}}</b><br>{name_a}: %{{x:.1%}}<br>{name_b}: %{{y:.1%}}<extra></extra>",
        ))
    figure.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line=dict(color="#999", width=1))
    figure.add_hline(chance, line=dict(color="#555", dash="dot", width=1))
    figure.add_vline(chance, line=dict(color="#555", dash="dot", width=1))
    stats = f"Pearson r = {correlation['pearson']:.2f}, Spearman ρ = {correlation['spearman']:.2f}"
    if "top_k_iou" in correlation:
        stats += f", top-5 IoU = {correlation['top_k_iou']:.2f}"
    heading = title or "Component accuracy in two runs"
    figure.update_xaxes(title_text=f"accuracy, {name_a}", range=[-0.02, 1.02], tickformat=".0%", constrain="domain")
    figure.update_yaxes(title_text=f"accuracy, {name_b}", range=[-0.02, 1.02], tickformat=".0%", scaleanchor="x")
    figure.update_layout(legend=dict(orientation="h", y=-0.15))
    return _style(figure, f"{heading}<br><sup>{stats}</sup>", 620, 640)


def correlation_heatmap(matrix: pd.DataFrame, title: str = "") -> go.Figure:
    """Figure 3b: Pearson correlation of component accuracies between every pair of runs of a sweep."""
    if matrix.shape[0] != matrix.shape[1]:
        raise PartsError(f"a correlation matrix must be square, got {matrix.shape}: pass correlation_matrix(runs)")
    values = matrix.to_numpy(dtype=float)
    labels = [str(c) for c in matrix.columns]
    off_diagonal = values[~np.eye(len(values), dtype=bool)]
    mean = float(np.nanmean(off_diagonal)) if off_diagonal.size else float("nan")
    figure = go.Figure(go.Heatmap(
        z=values, x=labels, y=labels, zmin=-1, zmax=1, colorscale="RdBu", reversescale=False,
        colorbar=dict(title=dict(text="Pearson r")), xgap=1, ygap=1,
        text=np.round(values, 2), texttemplate="%{text}" if len(values) <= 12 else None,
        hovertemplate="%{y} vs %{x}<br>r = %{z:.2f}<extra></extra>",
    ))
    figure.update_yaxes(autorange="reversed")
    size = max(520, 200 + 28 * len(values))
    heading = title or "Agreement of component accuracies between runs"
    return _style(figure, f"{heading}<br><sup>mean over pairs r = {mean:.2f}</sup>", size + 80, size)


# -- figure 4: distribution per layer -----------------------------------------------------------------
MLP_OFFSET = 0.4  # each layer's MLP is drawn just right of its heads' box
def accuracy_distribution(table: pd.DataFrame, full_accuracy: float, chance: float, title: str = "") -> go.Figure:
    """Figure 4: the heads' accuracies per layer as box plots with every head shown, the MLP of each layer beside them."""
    _check_columns(table, ["component", "kind", "layer", "accuracy"], "the distribution figure")
    heads = table[table["kind"] == "head"]
    mlps = table[table["kind"] == "mlp"]
    figure = go.Figure()
    figure.add_trace(go.Box(
        x=heads["layer"], y=heads["accuracy"], name="attention heads", boxpoints="all", jitter=0.4, pointpos=0,
        marker=dict(color=HEAD_COLOR, size=4, opacity=0.6), line=dict(width=1), fillcolor="rgba(31,119,180,0.12)",
        text=heads["component"], hovertemplate="<b>%{text}</b><br>accuracy %{y:.1%}<extra></extra>",
    ))
    figure.add_trace(go.Scatter(
        x=mlps["layer"] + MLP_OFFSET, y=mlps["accuracy"], mode="markers", name="MLP", text=mlps["component"],
        marker=dict(color=MLP_COLOR, symbol="diamond", size=9, line=dict(width=0.5, color="black")),
        hovertemplate="<b>%{text}</b><br>accuracy %{y:.1%}<extra></extra>",
    ))
    _reference_lines(figure, chance, full_accuracy)
    figure.update_xaxes(title_text="layer", dtick=1 if table["layer"].max() < 16 else 2)
    figure.update_yaxes(title_text="accuracy", range=[-0.02, 1.02], tickformat=".0%")
    figure.update_layout(legend=dict(orientation="h", y=-0.15))
    return _style(figure, title or "Component accuracy by layer", 900, 480)


# -- figure 5: reweighting --------------------------------------------------------------------------------
def _k_shot_label(summary: pd.DataFrame) -> pd.Series:
    """The legend of k-shot ICL, one series whatever each task's k: 'k-shot ICL (k = 4; 3 for mnli)'."""
    labels = summary["label"].copy()
    k_shot = (summary["method"] == "icl") & (summary["labels"] == summary["shots"])
    shots = summary.loc[k_shot].groupby("task", sort=False)["shots"].first()
    if len(shots):
        usual = int(shots.mode().iloc[0])
        others = "".join(f"; {k} for {', '.join(shots.index[shots == k])}" for k in dict.fromkeys(shots) if k != usual)
        labels[k_shot] = f"{labels[k_shot].iloc[0]} (k = {usual}{others})"
    return labels


def method_bars(results: pd.DataFrame, title: str = "", include_oracle: bool = False) -> go.Figure:
    """Figure 5a: accuracy per task and method, bars at the mean over templates x seeds, error bars
    one standard deviation."""
    summary = method_summary(results, include_oracle)
    summary["label"] = _k_shot_label(summary)
    figure = go.Figure()
    for label, rows in summary.groupby("label", sort=False):
        figure.add_trace(go.Bar(
            x=rows["task"], y=rows["mean"], name=str(label),
            error_y=dict(type="data", array=rows["std"].tolist(), visible=True, thickness=1.2, width=3),
            customdata=np.stack([rows["std"], rows["count"]], axis=-1),
            hovertemplate=f"{label}<br>%{{x}}: %{{y:.1%}} ± %{{customdata[0]:.1%}} over %{{customdata[1]}} runs<extra></extra>",
        ))
    figure.update_layout(barmode="group", bargap=0.2, legend=dict(orientation="h", y=-0.15))
    figure.update_yaxes(title_text="accuracy (mean ± sd over templates × seeds)", range=[0, 1.05], tickformat=".0%")
    figure.update_xaxes(title_text="task")
    n_tasks = summary["task"].nunique()
    return _style(figure, title or "Accuracy by method", max(640, 180 + 220 * n_tasks), 500)


def weights_table(component_names: Sequence[str], weights: Float[Tensor, " component"]) -> pd.DataFrame:
    """Weights clipped to [0, 1] (as predictions use them), one row per component with its layer and head."""
    if weights.ndim != 1 or len(weights) != len(component_names):
        raise PartsError(f"{tuple(weights.shape)} weights for {len(component_names)} components: pass load_weights(...)")
    parsed = [parse_component(n) for n in component_names]
    return pd.DataFrame({
        "component": list(component_names),
        "kind": [c.kind for c in parsed],
        "layer": [c.layer for c in parsed],
        "head": [c.head for c in parsed],
        "weight": weights.detach().float().clamp(0.0, 1.0).tolist(),
    })


def weights_heatmap(component_names: Sequence[str], weights: Float[Tensor, " component"], title: str = "") -> go.Figure:
    """Figure 5b: the learned component weights on the layers x heads grid, the MLPs beside them."""
    table = weights_table(component_names, weights)
    n_heads = int(table.loc[table["kind"] == "head", "head"].max()) + 1
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[n_heads, 1.4], horizontal_spacing=0.02,
                           subplot_titles=("attention heads", "MLPs"))
    for col, kind in ((1, "head"), (2, "mlp")):
        z = _grid(table, "weight", kind)
        x = [str(h) for h in range(z.shape[1])] if kind == "head" else ["MLP"]
        figure.add_trace(go.Heatmap(z=z, x=x, y=list(range(z.shape[0])), text=_grid(table, "component", kind),
                                    coloraxis="coloraxis", xgap=1, ygap=1, name=f"{kind}s",
                                    hovertemplate="<b>%{text}</b><br>weight %{z:.2f}<extra></extra>"), row=1, col=col)
    figure.update_layout(coloraxis=dict(colorscale="Greens", cmin=0.0, cmax=1.0, colorbar=dict(title=dict(text="weight"))))
    figure.update_xaxes(title_text="head", row=1, col=1)
    figure.update_yaxes(title_text="layer", row=1, col=1)
    kept = int((table["weight"] > 0.01).sum())
    heading = title or "Learned component weights"
    n_layers = int(table["layer"].max()) + 1
    return _style(figure, f"{heading}<br><sup>{kept} of {len(table)} components above 0.01 (clipped to [0, 1])</sup>",
                  760, max(420, 140 + 17 * n_layers))


# -- figure 6: one head up close -------------------------------------------------------------------------
def head_logit_view(inspection: HeadInspection) -> dict[str, Float[Tensor, " example"]]:
    """What decides the head's vote, per example: for two labels the logit difference (label 1 minus
    label 0); for more, each label word's logit minus the mean over label words (same argmax)."""
    names, logits = inspection.label_names, inspection.logits.float()
    if len(names) == 2:
        return {f"logit '{names[1]}' - logit '{names[0]}'": logits[:, 1] - logits[:, 0]}
    centred = logits - einops.reduce(logits, "example label -> example 1", "mean")
    return {f"'{name}' (centred)": centred[:, index] for index, name in enumerate(names)}


def head_closeup(inspection: HeadInspection, example: int = 0) -> go.Figure:
    """Figure 6: a head's label-word logits per example split by gold label (top) and its attention
    from the last token over one prompt, the demonstrations' label words marked (bottom; only when
    the inspection has attention patterns)."""
    views = inspection.attention
    if views and not 0 <= example < len(views):
        raise PartsError(f"example {example} has no attention pattern: choose 0-{len(views) - 1}")
    titles = ["its contribution to the label-word logits on every example, by gold label"]
    if views:
        view = views[example]
        titles.append(f"attention from the last token over example {view.example} "
                      f"(gold: {inspection.label_names[view.gold]})")
    figure = make_subplots(rows=len(titles), cols=1, row_heights=[0.45, 0.55][: len(titles)] if views else None,
                           vertical_spacing=0.16, subplot_titles=titles)
    gold = [inspection.label_names[g] for g in inspection.labels.tolist()]
    for name, values in head_logit_view(inspection).items():
        figure.add_trace(go.Box(
            x=gold, y=values.tolist(), name=name, boxpoints="all", jitter=0.35, pointpos=0, marker=dict(size=4),
            hovertemplate=f"gold %{{x}}<br>{name} %{{y:.3f}}<extra></extra>",
        ), row=1, col=1)
    if len(inspection.label_names) == 2:  # the head votes label 1 above this line
        figure.add_hline(0, line=dict(color="#555", dash="dot", width=1), row=1, col=1)
    figure.update_xaxes(title_text="gold label", row=1, col=1)
    figure.update_yaxes(title_text="logit" if len(inspection.label_names) == 2 else "logit - mean over label words",
                        row=1, col=1)
    if views:
        _attention_panel(figure, views[example], row=2)
    category = f", {inspection.category}" if inspection.category else ""
    heading = (f"{inspection.component} up close: accuracy {inspection.accuracy:.0%}, "
               f"label bias {inspection.label_bias:.2f}{category}")
    _style(figure, heading, 900, 760 if views else 460)
    # The legend (one entry per label word) goes between the title and the first panel.
    figure.update_layout(boxmode="group", margin=dict(t=125),
                         legend=dict(orientation="h", x=0, xanchor="left", y=0.9, yanchor="middle", yref="container"))
    return figure


def _attention_panel(figure: go.Figure, view: AttentionView, row: int) -> None:
    """Bars of attention per prompt position; the demonstrations' label words coloured and named."""
    marked = set(view.label_positions)
    colors = [CATEGORY_COLORS["label-biased"] if p in marked else "#9ecae1" for p in range(len(view.tokens))]
    figure.add_trace(go.Bar(
        x=list(range(len(view.tokens))), y=view.pattern.tolist(), marker=dict(color=colors, line_width=0),
        name="attention", text=[repr(t)[1:-1] for t in view.tokens], textposition="none", showlegend=False,
        hovertemplate="position %{x}: '%{text}'<br>attention %{y:.3f}<extra></extra>",
    ), row=row, col=1)
    for position in view.label_positions:
        figure.add_annotation(x=position, y=float(view.pattern[position]), text=view.tokens[position].strip() or "␣",
                              showarrow=True, arrowhead=0, ay=-22, font=dict(size=10, color=CATEGORY_COLORS["label-biased"]),
                              row=row, col=1)
    # The first token is often an attention sink; scale to the rest so the label words stay visible.
    rest = float(view.pattern[1:].max()) if len(view.tokens) > 1 else 1.0
    if float(view.pattern[0]) > 1.5 * rest:
        figure.update_yaxes(range=[0, 1.3 * rest], row=row, col=1)
        figure.add_annotation(x=0, y=1.25 * rest, text=f"first token {float(view.pattern[0]):.2f} ↑", showarrow=False,
                              xanchor="left", font=dict(size=10), row=row, col=1)
    figure.update_xaxes(title_text="prompt position (demonstrations' label words marked)", row=row, col=1)
    figure.update_yaxes(title_text="attention", row=row, col=1)


SOURCE_SEGMENTS = {"BOS": "BOS", "demo_text": "demonstration text", "demo_label_word": "demonstration label words",
                   "separator": "separators", "query": "query"}
SOURCE_COLORS = {"BOS": "#969696", "demo_text": "#9ecae1", "demo_label_word": "#08519c", "separator": "#fdae6b",
                 "query": "#d94801"}


def head_sources_figure(rows: pd.DataFrame, title: str = "") -> go.Figure:
    """Where the best heads' votes come from (scripts/head_sources.py's CSV, one row per task and head): left, each
    head's share of its vote for its prediction by prompt segment (stacked, signed); right, each head's copy score
    (logits toward a label word's own label per unit of attention on it)."""
    _check_columns(rows, ["task", "head", "copy_score", *(f"share_{k}" for k in SOURCE_SEGMENTS)], "head sources")
    names = [f"{task} {head}" for task, head in zip(rows["task"], rows["head"], strict=True)]
    figure = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], shared_yaxes=True, horizontal_spacing=0.03,
                           subplot_titles=("share of the vote for its prediction", "copy score (logit per attention)"))
    for key, label in SOURCE_SEGMENTS.items():
        figure.add_trace(go.Bar(y=names, x=rows[f"share_{key}"], name=label, orientation="h",
                                marker_color=SOURCE_COLORS[key]), row=1, col=1)
    figure.add_trace(go.Bar(y=names, x=rows["copy_score"], orientation="h", marker_color="#08519c", showlegend=False),
                     row=1, col=2)
    figure.update_layout(barmode="relative", legend={"orientation": "h", "y": -0.06})
    figure.update_yaxes(autorange="reversed")
    return _style(figure, title or "The 5 most accurate heads per task: where their vote comes from",
                  1000, 200 + 18 * len(rows))
