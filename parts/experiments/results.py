"""The results table: every method's accuracy per setting, as one pandas DataFrame.

`parts evaluate` and `parts transfer` produce rows (`result_row`); `write_results` merges them into
`results.csv` (or `transfer.csv`) by key, so sweeps resume and share an output root; `read_results`
reads it back with typed columns. `method_summary` is the one mean ± sample std over templates x seeds
per task and method (tables and figure 5 both use it); `results_table` lays it out as the paper's main
table in markdown. Method names and their order come from `parts.methods`.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from parts import io
from parts.decomposition.fingerprint import check_reuse, digest
from parts.errors import PartsError
from parts.methods import method_label, method_order

RESULTS_CSV = "results.csv"
TRANSFER_CSV = "transfer.csv"
# `fingerprint`: the digest of what made the row (`parts.decomposition.fingerprint`; "" before parts recorded it),
# its fields in `<csv>.fingerprints.json` beside the table.
COLUMNS = ("model", "task", "template", "seed", "shots", "limit", "method", "labels", "accuracy", "n_test", "note",
           "fingerprint")
KEY = COLUMNS[:8]  # a row with the same key replaces the old one
SETTING = ("model", "task", "template", "seed", "shots", "limit")
TRANSFER_ARROW = " -> "  # in a transfer's target task name: 'sst2 -> yelp'
TABLE_HEAD = "| task | runs | "  # how a results table written by parts begins
_IS_RESULTS = io.starts_with(",".join(COLUMNS[:11]))  # a results file written before parts recorded its files
# `limit` is a number or "all", so it is kept as text.
DTYPES = {"model": str, "task": str, "template": int, "seed": int, "shots": int, "limit": str, "method": str,
          "labels": int, "accuracy": float, "n_test": int, "note": str, "fingerprint": str}
FINGERPRINTS = ".fingerprints.json"  # `results.fingerprints.json`: each row digest's fields
ORACLE_NOTE = "optimistic reference, not a bound: trained on the test labels"
_NUMBERS = r"(?: -?\d+\.\d+)+"
_TRAINING = r"(?:perfect|plateau|max_epochs) after \d+ epochs"
# The note `parts evaluate` (`parts.experiments.evaluate.evaluate_setting`) writes for each method, as a
# pattern: `parts tables --check` refuses a results row whose note the current code would not write.
NOTE_PATTERNS = {
    "icl": r"(?:left-truncated: first \d+ of \d+ demonstrations dropped)?",
    "contextual": rf"prior{_NUMBERS}",
    "batch": "",
    "oracle": rf"{re.escape(ORACLE_NOTE)}; {_TRAINING}",
    "comprw": rf"train acc \d+\.\d+; {_TRAINING}",
    "calib+": rf"class weights{_NUMBERS}",
    "comprw-signed": rf"train acc \d+\.\d+; {_TRAINING}; \d+ weights below 0",
    "mask-biased": r"masked \d+ of \d+ components",
    "probe-resid": r"C \S+ by leave-one-out; train acc \d+\.\d+",
    "probe-logits": r"C \S+ by leave-one-out; train acc \d+\.\d+",
    "calib-affine": r"C \S+ by leave-one-out; train acc \d+\.\d+",
}


def stale_note_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows of a `results.csv` table whose note is not what `parts evaluate` writes now for their method
    (`NOTE_PATTERNS`; other methods are left alone)."""
    notes = rows["note"].fillna("").astype(str) if "note" in rows else pd.Series("", index=rows.index)
    known = rows["method"].isin(list(NOTE_PATTERNS))
    current = [not k or re.fullmatch(NOTE_PATTERNS[m], n) is not None
               for m, n, k in zip(rows["method"], notes, known, strict=True)]
    return rows[~pd.Series(current, index=rows.index, dtype=bool)]


def result_row(model: str, task: str, template: int, seed: int, shots: int, limit: int | None, method: str,
               labels: int, accuracy: float, n_test: int, note: str = "", fingerprint: str = "") -> dict[str, Any]:
    """One row of the results table (accuracy rounded to 6 places, as written); `fingerprint` is the digest
    (`parts.decomposition.fingerprint.digest`) of what made it."""
    return {"model": model, "task": task, "template": template, "seed": seed, "shots": shots,
            "limit": "all" if limit is None else limit, "method": method, "labels": labels,
            "accuracy": round(accuracy, 6), "n_test": n_test, "note": note, "fingerprint": fingerprint}


def results_frame(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts or a frame) as the results table: the columns in order, with their types."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(COLUMNS))
    if "fingerprint" not in frame.columns:
        frame = frame.assign(fingerprint="")  # a table written before parts recorded fingerprints
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise PartsError(f"the results table lacks columns {missing}: pass rows of `parts evaluate`'s results.csv")
    frame = frame[list(COLUMNS)].copy()
    frame[["note", "fingerprint"]] = frame[["note", "fingerprint"]].fillna("")
    return frame.astype(DTYPES)


def read_results(path: str | Path) -> pd.DataFrame:
    """The results table at `path` (empty, with the columns, when there is no file)."""
    path = Path(path)
    if not path.is_file():
        return results_frame([])
    try:
        return results_frame(pd.read_csv(path, dtype=str, keep_default_na=False))
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, ValueError,
            PartsError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PartsError(f"{path} is not a results table parts wrote ({reason}): move it away or choose another --out") \
            from err


def text_records(results: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """The table's rows as dicts of text, each value as the file writes it."""
    return results_frame(results).astype(str).to_dict("records")  # type: ignore[return-value]


def merge_results(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """`old` with `new` merged in: a new row replaces the old row of its key in place; other new rows follow."""
    combined = pd.concat([results_frame(old), results_frame(new)], ignore_index=True)
    keys = combined[list(KEY)].apply(tuple, axis=1)
    last = ~keys.duplicated(keep="last")
    position = keys.map({key: i for i, key in reversed(list(enumerate(keys)))})  # each key's first position
    return combined[last].assign(_position=position[last]).sort_values("_position", kind="stable").drop(
        columns="_position").reset_index(drop=True)


def write_results(path: str | Path, rows: pd.DataFrame | Iterable[Mapping[str, Any]],
                  fingerprints: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Merge `rows` into the CSV at `path` (a new row replaces one with the same key), atomically, and
    `fingerprints` (digest -> fields, of the rows' `fingerprint` column) into its `.fingerprints.json`.

    A lock file serialises read-merge-write, so sweeps sharing one output root keep each other's rows.
    """
    path = Path(path)
    io.check_file(path, _IS_RESULTS)  # before reading: a user's file of that name is neither merged nor replaced
    with io.lock(path):
        merged = merge_results(read_results(path), results_frame(rows))
        if fingerprints or fingerprints_path(path).is_file():
            # The fields of the digests the table's rows hold, in digest order: equal tables, equal files.
            known = {**read_fingerprints(path), **(fingerprints or {})}
            io.write_json(fingerprints_path(path), {d: known[d] for d in sorted(set(merged["fingerprint"])) if d in known})

        def write(staging: Path) -> None:
            with staging.open("w", newline="") as handle:
                merged.to_csv(handle, index=False, lineterminator="\r\n")  # the csv module's dialect, as before

        io.write_file(path, write, legacy=_IS_RESULTS)
    return path


def fingerprints_path(csv_path: str | Path) -> Path:
    """Where the fields of a results table's row fingerprints are kept: `results.csv` -> `results.fingerprints.json`."""
    path = Path(csv_path)
    return path.with_name(path.stem + FINGERPRINTS)


def read_fingerprints(csv_path: str | Path) -> dict[str, dict[str, Any]]:
    """Digest -> fingerprint fields of a results table's rows (empty when none are recorded)."""
    try:
        recorded = json.loads(fingerprints_path(csv_path).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in recorded.items() if isinstance(v, dict)} if isinstance(recorded, dict) else {}


def rows_reusable(csv_path: str | Path, rows: pd.DataFrame, wanted: Mapping[str, Any], recompute: bool,
                  what: str) -> bool:
    """Whether a setting's rows already in the table (`rows`) may stand for a setting whose fingerprint is
    `wanted`: False when there are none, or some were made otherwise and `recompute` says to redo them; a
    one-line PartsError naming what changed when some were made otherwise (or before fingerprints) without it."""
    if rows.empty:
        return False
    mine = digest(wanted)
    other = [d for d in dict.fromkeys(rows["fingerprint"]) if d != mine]
    if not other:
        return True
    recorded = read_fingerprints(csv_path).get(other[0]) if other[0] else None
    return check_reuse(f"{what} in {csv_path}", recorded, wanted, recompute, whose="the rows'")


def check_outputs(csv_path: str | Path, table: str | Path) -> None:
    """Raise now if a results CSV or table cannot be written (a file parts did not write stands there)."""
    io.check_file(csv_path, _IS_RESULTS)
    io.check_file(table, io.contains(TABLE_HEAD))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def method_summary(results: pd.DataFrame, include_oracle: bool = False, scale: float = 1.0) -> pd.DataFrame:
    """Mean and sample standard deviation of `scale` x accuracy over templates x seeds, per task and method
    (columns task, method, labels, shots, label, mean, std, count), methods in the paper's order, tasks in
    the order they first appear."""
    missing = [c for c in ("task", "method", "labels", "shots", "accuracy") if c not in results.columns]
    if missing:
        raise PartsError(f"the results table lacks columns {missing}: pass runs/results.csv from `parts evaluate`")
    if not include_oracle:
        results = results[results["method"] != "oracle"]
    labels, shots = results["labels"].astype(int), results["shots"].astype(int)
    labelled = results.assign(
        labels=labels, shots=shots, accuracy=[scale * float(a) for a in results["accuracy"]],
        label=[method_label(m, n, k) for m, n, k in zip(results["method"], labels, shots, strict=True)])
    # One cell per task and name: k-shot ICL is one column whatever each task's k.
    grouped = labelled.groupby(["task", "label"], sort=False)
    summary = grouped[["method", "labels", "shots"]].first()
    summary["mean"] = grouped["accuracy"].agg(lambda values: mean_std(list(values))[0])
    summary["std"] = grouped["accuracy"].agg(lambda values: mean_std(list(values))[1])
    summary["count"] = grouped.size()
    summary = summary.reset_index()[["task", "method", "labels", "shots", "label", "mean", "std", "count"]]
    order = [method_order(m, n, k) for m, n, k in zip(summary["method"], summary["labels"], summary["shots"], strict=True)]
    task_order = {t: i for i, t in enumerate(dict.fromkeys(results["task"]))}
    ranks = pd.DataFrame({"order": order, "task_rank": summary["task"].map(task_order)})
    chosen = sorted(range(len(summary)), key=lambda i: (ranks["order"][i], ranks["task_rank"][i]))
    return summary.iloc[chosen].reset_index(drop=True)


def markdown_table(frame: pd.DataFrame) -> str:
    """A pipe table: header, rule, one line per row (cells as text, empty for a missing value)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def mean_std_table(results: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The main table as a frame: accuracy (%) per task and method, 'mean ± std' over templates x seeds, then a
    row 'average' of the per-task means (for methods every task has). A transfer table, holding source tasks and
    shifts ("source -> target"), averages like with like: a row 'average of the sources' and one 'average of the
    shifts', never the two together."""
    frame = results_frame(results)
    summary = method_summary(frame, include_oracle=True, scale=100)
    tasks = list(dict.fromkeys(frame["task"]))
    columns = list(dict.fromkeys(summary["label"]))  # already in the paper's order
    cells = summary.pivot_table(index="task", columns="label", values="mean", aggfunc="first", sort=False)
    spread = summary.pivot_table(index="task", columns="label", values="std", aggfunc="first", sort=False)
    runs = frame.drop_duplicates(["task", "template", "seed"]).groupby("task", sort=False).size()
    table = pd.DataFrame({"task": tasks, "runs": [int(runs[t]) for t in tasks]})
    for column in columns:
        table[column] = ["" if pd.isna(cells.at[t, column]) else f"{cells.at[t, column]:.1f} ± {spread.at[t, column]:.1f}"
                         for t in tasks]
    shifts = [t for t in tasks if TRANSFER_ARROW in t]
    sources = [t for t in tasks if TRANSFER_ARROW not in t]
    groups = {"average of the sources": sources, "average of the shifts": shifts} if shifts and sources else \
        {"average": tasks}
    averages = []
    for name, group in groups.items():
        complete = [column for column in columns if cells.loc[group, column].notna().all()]
        averages.append({"task": name, "runs": int(runs[group].sum()),
                         **{c: f"{statistics.fmean(cells.loc[group, c]):.1f}" if c in complete else "" for c in columns}})
    return pd.concat([table, pd.DataFrame(averages)], ignore_index=True)


def results_table(results: pd.DataFrame | Iterable[Mapping[str, Any]]) -> str:
    """`mean_std_table` in markdown, its average rows in bold."""
    frame = results_frame(results)
    if frame.empty:
        return "(no results)"
    table = mean_std_table(frame)
    for row in table.index[table["task"].str.startswith("average")]:
        table.loc[row] = [f"**{v}**" if v != "" and column != "runs" else v for column, v in table.loc[row].items()]
    return markdown_table(table)


def setting_keys(results: pd.DataFrame) -> pd.Series:
    """Each row's setting as a tuple (model, task, template, seed, shots, limit), limit as text."""
    return pd.Series(list(zip(*(results[c] for c in SETTING), strict=True)), index=results.index, dtype=object)


def setting_key(model: str, task: str, template: int, seed: int, shots: int, limit: int | None) -> tuple:
    """A setting as `setting_keys` gives it."""
    return model, task, template, seed, shots, "all" if limit is None else str(limit)


def write_table(path: str | Path, table: str, header: str = "") -> Path:
    """A markdown results table (from `results_table`) with a header line, written atomically."""
    return io.write_text(path, (header + "\n\n" if header else "") + table + "\n", legacy=io.contains(TABLE_HEAD))
