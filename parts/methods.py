"""The methods compared in the paper's main table: one registry of their keys, names and label use.

A result row names its method by `key` (`results.csv`'s `method` column) and says how many labelled
examples it used (`labels`): k, the demonstrations alone, or a label budget L (k demonstrations plus
L - k training examples). `method_label` is the one name a method has in tables and figures;
`method_order` the one order they are shown in (the paper's: the k-shot methods, then per budget,
largest first, L-shot ICL, Calib+ and CompRW, then the references fitted on the test set).

Methods beyond the paper (`beyond_paper`: published since, or obvious variants; docs/guide/methods.md) carry
`BEYOND_PAPER_MARK` after their name in every table, and come after the paper's methods of the same budget.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One method of the comparison."""

    key: str  # `method` in results.csv
    name: str  # its column heading (before the label budget, for budgeted methods)
    at_k: bool  # has a row with labels = k: it sees only the k demonstrations' labels
    at_budget: bool  # has a row per label budget L: it sees all L labelled examples
    upper_bound: bool = False  # not a method: fitted or chosen on the test labels, an optimistic reference
    main: bool = True  # in the paper's main table (`parts evaluate`); else in the transfer table only
    description: str = ""
    beyond_paper: bool = False  # not in the paper: marked with BEYOND_PAPER_MARK in tables
    optional: bool = False  # costly: run only when asked (`parts evaluate --gates`), else no row is expected

    @property
    def heading(self) -> str:
        """The name as tables show it: marked when the method is beyond the paper."""
        return self.name + BEYOND_PAPER_MARK if self.beyond_paper else self.name


BEYOND_PAPER_MARK = "†"  # after a method's name in tables: not in the paper (docs/guide/methods.md)


METHODS = (
    Method("icl", "ICL", at_k=True, at_budget=True,
           description="the full model with the k demonstrations, or all L labelled examples as demonstrations"),
    Method("contextual", "ContextualCal", at_k=True, at_budget=False,
           description="k-shot probabilities divided by the content-free prior (Zhao et al. 2021)"),
    Method("batch", "BatchCal", at_k=True, at_budget=False,
           description="k-shot probabilities minus the test batch's mean (Zhou et al. 2024)"),
    Method("calib+", "Calib+", at_k=False, at_budget=True,
           description="per-class weights on the k-shot probabilities, trained on the L - k others"),
    Method("comprw", "CompRW", at_k=False, at_budget=True,
           description="per-component weights, trained on the L - k others (parts.reweighting.reweight)"),
    # Beyond the paper (issue 24): each sees exactly the labelled examples CompRW sees, never the test labels.
    Method("comprw-signed", "SignedRW", at_k=False, at_budget=True, beyond_paper=True,
           description="CompRW with weights clipped to [-1, 1] instead of [0, 1]: a bad component can be flipped"),
    Method("probe-resid", "ResidProbe", at_k=False, at_budget=True, beyond_paper=True,
           description="logistic regression on the last-token final residual after the final norm, L2 by "
                       "leave-one-out on the L - k others"),
    Method("probe-logits", "LogitProbe", at_k=False, at_budget=True, beyond_paper=True,
           description="logistic regression on the components x labels logits (unconstrained CompRW), L2 by "
                       "leave-one-out on the L - k others"),
    Method("calib-affine", "SupCal", at_k=False, at_budget=True, beyond_paper=True,
           description="a scale and a bias per class on the k-shot label logits, L2 by leave-one-out on the L - k others"),
    Method("mask-biased", "BiasMask", at_k=False, at_budget=True, beyond_paper=True,
           description="the sum of the components that do not predict one label on all L - k training prompts "
                       "(no weights learned; after UniBias, Zhou et al. 2024)"),
    Method("gates", "Gates", at_k=False, at_budget=True, beyond_paper=True, optional=True,
           description="one gate per head and MLP inside the forward pass at the last token (later layers read the "
                       "gated outputs), CompRW's recipe by backpropagation on the L - k others (parts.reweighting.gates)"),
    Method("oracle", "Oracle RW (fit on test)", at_k=True, at_budget=False, upper_bound=True,
           description="per-component weights fitted on the test set itself: an optimistic reference, not a bound"),
    # The paper's Table 3 (transfer): one component's own predictions on the target test set.
    Method("transfer-1", "transfer-1", at_k=True, at_budget=False, main=False,
           description="the component most accurate on the source test set"),
    Method("oracle-1", "oracle-1", at_k=True, at_budget=False, upper_bound=True, main=False,
           description="the component most accurate on the target test set itself"),
)
BY_KEY = {method.key: method for method in METHODS}
MAIN_METHODS = tuple(method for method in METHODS if method.main)


def method_labels(key: str, shots: int, budget: int) -> int:
    """The `labels` a method's row records: the budget for a method that trains on it, else k."""
    return budget if not BY_KEY[key].at_k else shots


def method_label(key: str, labels: int, shots: int) -> str:
    """The method's name in tables and figures: 'k-shot ICL', '24-shot ICL', 'Calib+ 24', 'BatchCal', ..."""
    method = BY_KEY.get(key)
    if method is None:
        return key
    if key == "icl":
        return "k-shot ICL" if labels == shots else f"{labels}-shot ICL"
    return f"{method.heading} {labels}" if method.at_budget else method.heading


def label_order(label: str) -> tuple[int, int, int]:
    """`method_order` of a name `method_label` gave ('k-shot ICL', '24-shot ICL', 'Calib+ 24', 'BatchCal'...)."""
    if label == "k-shot ICL":
        return method_order("icl", 0, 0)
    if label.endswith("-shot ICL") and label.removesuffix("-shot ICL").isdigit():
        return method_order("icl", int(label.removesuffix("-shot ICL")), 0)
    name, _, budget = label.rpartition(" ")
    for method in METHODS:
        if method.at_budget and method.heading == name and budget.isdigit():
            return method_order(method.key, int(budget), 0)
        if not method.at_budget and method.heading == label:
            return method_order(method.key, 0, 0)
    return method_order(label, 0, 0)


def method_order(key: str, labels: int, shots: int) -> tuple[int, int, int]:
    """Sort key of the paper's order: k-shot methods, then each budget (largest first), then the test-set references."""
    method = BY_KEY.get(key)
    if method is None:
        return 3, 0, 0
    rank = METHODS.index(method)
    if method.upper_bound:
        return 2, 0, rank
    if method.at_k and (labels == shots or not method.at_budget):
        return 0, 0, rank
    return 1, -labels, rank
