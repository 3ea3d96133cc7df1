"""The method registry: one name and one order for every method, in every table and figure."""

from __future__ import annotations

from parts.methods import BY_KEY, MAIN_METHODS, label_order, method_label, method_labels, method_order


def test_names():
    assert [method_label(*row) for row in (("icl", 4, 4), ("icl", 24, 4), ("calib+", 12, 3), ("batch", 4, 4),
                                            ("oracle", 3, 3), ("transfer-1", 4, 4), ("unknown", 4, 4))] == [
        "k-shot ICL", "24-shot ICL", "Calib+ 12", "BatchCal", "Oracle RW (fit on test)", "transfer-1", "unknown"]


def test_one_order_k_shot_then_budgets_largest_first_then_upper_bounds():
    rows = [("oracle-1", 4), ("comprw", 12), ("oracle", 4), ("calib+", 24), ("icl", 12), ("batch", 4), ("comprw", 24),
            ("transfer-1", 4), ("icl", 24), ("contextual", 4), ("icl", 4), ("calib+", 12)]
    ordered = [method_label(m, n, 4) for m, n in sorted(rows, key=lambda r: method_order(r[0], r[1], 4))]
    assert ordered == ["k-shot ICL", "ContextualCal", "BatchCal", "transfer-1", "24-shot ICL", "Calib+ 24", "CompRW 24",
                       "12-shot ICL", "Calib+ 12", "CompRW 12", "Oracle RW (fit on test)", "oracle-1"]
    assert sorted(ordered[::-1], key=label_order) == ordered  # the same order from the names alone


def test_labels_used_and_the_main_table():
    assert [method_labels(m, 4, 24) for m in ("icl", "batch", "calib+", "comprw", "oracle")] == [4, 4, 24, 24, 4]
    assert [m.key for m in MAIN_METHODS if not m.beyond_paper] == ["icl", "contextual", "batch", "calib+", "comprw",
                                                                   "oracle"]
    assert [k for k, m in BY_KEY.items() if m.upper_bound] == ["oracle", "oracle-1"]


def test_methods_beyond_the_paper_are_marked_and_follow_the_papers_of_their_budget():
    beyond = [m.key for m in MAIN_METHODS if m.beyond_paper]
    assert {"comprw-signed", "mask-biased"} <= set(beyond)
    assert method_label("comprw-signed", 24, 4) == "SignedRW\N{DAGGER} 24" and method_label("comprw", 24, 4) == "CompRW 24"
    names = [method_label(m, 24, 4) for m in ("mask-biased", "comprw", "icl", "comprw-signed", "calib+")]
    assert sorted(names, key=label_order) == ["24-shot ICL", "Calib+ 24", "CompRW 24", "SignedRW\N{DAGGER} 24",
                                              "BiasMask\N{DAGGER} 24"]
    assert all(not BY_KEY[key].at_k and BY_KEY[key].at_budget for key in beyond)  # each sees the L labelled examples
