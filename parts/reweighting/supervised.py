"""Supervised baselines beyond the paper: linear probes and a per-class affine calibration, with the L2 strength
chosen by leave-one-out cross-validation on the labelled training examples only.

- `fit_probe`: multinomial logistic regression (scikit-learn) on any features of the training examples: the
  last-token final residual after the final norm (`probe-resid`), or the components x labels direct-effect
  logits (`probe-logits`: unconstrained CompRW, one free weight per component and label instead of one
  weight in [0, 1] per component). Features are standardised with the training examples' mean and std.
- `fit_affine_calibration`: one scale and one bias per class on the full model's label logits,
  softmax(a * z + b), fit by the same penalised likelihood (scipy's L-BFGS): a stronger calibration than
  Calib+'s one weight per class on the probabilities. The penalty pulls towards the model itself (a = 1, b = 0).

Every fit minimises `0.5 * penalty + C * sum over examples of cross-entropy` (scikit-learn's convention), with
C from `C_GRID` chosen by leave-one-out: the C whose held-out examples get the highest mean log-probability
of their gold label (ties: the smaller C, the stronger penalty). Only the training examples' features and
labels are read; test features are only predicted on. Leave-one-out needs every class at least twice among the
training examples (else one fold would train without a class): fewer is a one-line PartsError naming the method.

Why scikit-learn and not torch with LBFGS: the fit is small (tens of examples, at most a few thousand features),
strictly convex with the L2 term, and runs on the CPU; scikit-learn's `LogisticRegression` solves it to its
unique optimum deterministically with a documented penalty convention, with no learning rate, epochs or line
search to choose and test. The per-class calibration has no scikit-learn estimator (a diagonal weight matrix),
so it uses scipy's L-BFGS on the same objective, with its gradient written out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from torch import Tensor

from parts.errors import PartsError

C_GRID: tuple[float, ...] = tuple(10.0**e for e in range(-3, 4))  # inverse L2 strength: 0.001 ... 1000
MIN_PER_CLASS = 2  # leave-one-out keeps every class in every fold
MAX_ITER = 1000
PROBABILITY_FLOOR = 1e-12  # a held-out probability of 0 scores log(1e-12), not minus infinity


@dataclass
class Fitted:
    """A model fitted on all training examples at the chosen C, and how C was chosen."""

    C: float
    held_out_log_probability: float  # mean over the leave-one-out folds, at C
    train_accuracy: float
    log_probabilities: Callable[[np.ndarray], np.ndarray]  # features [example feature] -> [example label]

    def predict(self, features: Float[Tensor, " example *feature"]) -> Int[Tensor, " example"]:
        """Each example's label (ties go to the lower label index)."""
        return torch.from_numpy(self.log_probabilities(_array(features)).argmax(-1)).long()

    @property
    def note(self) -> str:
        """What a results row says about the fit."""
        return f"C {self.C:g} by leave-one-out; train acc {self.train_accuracy:.3f}"


def _array(features: Tensor) -> np.ndarray:
    return features.detach().double().cpu().flatten(1).numpy()


def check_per_class(labels: Int[Tensor, " example"], n_labels: int, method: str) -> None:
    """Every class at least `MIN_PER_CLASS` times among the training labels, else a one-line PartsError."""
    counts = torch.bincount(labels.long().cpu(), minlength=n_labels).tolist()
    short = [c for c in range(n_labels) if counts[c] < MIN_PER_CLASS]
    if short:
        raise PartsError(
            f"{method}: leave-one-out cross-validation needs at least {MIN_PER_CLASS} labelled training examples of "
            f"every class, but class {short[0]} has {counts[short[0]]} of {len(labels)}: use a larger --labels budget")


def _fit_with_cv(method: str, features: Tensor, labels: Tensor, n_labels: int, grid: Sequence[float],
                 fit: Callable[[np.ndarray, np.ndarray, float], Callable[[np.ndarray], np.ndarray]]) -> Fitted:
    """Choose C on `grid` by leave-one-out on (features, labels), then fit on all of them at that C."""
    if len(features) != len(labels):
        raise PartsError(f"{method}: {len(labels)} labels for {len(features)} training examples")
    check_per_class(labels, n_labels, method)
    x, y = _array(features), labels.long().cpu().numpy()
    best: tuple[float, float] | None = None  # (mean held-out log-probability, C)
    # One BLAS thread: fits this small gain nothing from more, and on a busy machine threads make them far slower.
    with threadpool_limits(limits=1):
        for C in sorted(grid):
            total = 0.0
            for i in range(len(y)):
                rest = np.arange(len(y)) != i
                total += float(fit(x[rest], y[rest], C)(x[i:i + 1])[0, y[i]])
            score = total / len(y)
            if best is None or score > best[0]:  # strictly better: a tie keeps the smaller C
                best = (score, C)
        assert best is not None
        model = fit(x, y, best[1])
    accuracy = float((model(x).argmax(-1) == y).mean())
    return Fitted(best[1], best[0], accuracy, model)


def _logistic(n_labels: int) -> Callable[[np.ndarray, np.ndarray, float], Callable[[np.ndarray], np.ndarray]]:
    def fit(x: np.ndarray, y: np.ndarray, C: float) -> Callable[[np.ndarray], np.ndarray]:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=MAX_ITER))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # large C on separable data: the optimum is far
            pipeline.fit(x, y)
        classes = pipeline.classes_.tolist()

        def log_probabilities(features: np.ndarray) -> np.ndarray:
            out = np.full((len(features), n_labels), math.log(PROBABILITY_FLOOR))
            out[:, classes] = np.log(np.maximum(pipeline.predict_proba(features), PROBABILITY_FLOOR))
            return out

        return log_probabilities

    return fit


def fit_probe(method: str, features: Float[Tensor, " example *feature"], labels: Int[Tensor, " example"],
              n_labels: int, grid: Sequence[float] = C_GRID) -> Fitted:
    """Multinomial logistic regression on standardised features (flattened after the example axis), C by
    leave-one-out on these training examples; `method` names it in errors."""
    return _fit_with_cv(method, features, labels, n_labels, grid, _logistic(n_labels))


def _affine(x: np.ndarray, y: np.ndarray, C: float) -> Callable[[np.ndarray], np.ndarray]:
    """softmax(a * z + b) fit by C * cross-entropy + 0.5 * (|a - 1|^2 + |b|^2), from a = 1, b = 0."""
    n_labels = x.shape[1]
    target = np.eye(n_labels)[y]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = theta[:n_labels], theta[n_labels:]
        log_p = log_softmax(x * a + b, axis=1)
        residual = C * (np.exp(log_p) - target)  # d loss / d logit, per example and label
        loss = -C * float((log_p * target).sum()) + 0.5 * float(((a - 1) ** 2).sum() + (b**2).sum())
        gradient = np.concatenate([(residual * x).sum(0) + (a - 1), residual.sum(0) + b])
        return loss, gradient

    start = np.concatenate([np.ones(n_labels), np.zeros(n_labels)])
    theta = minimize(objective, start, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER}).x
    a, b = theta[:n_labels], theta[n_labels:]

    def log_probabilities(z: np.ndarray) -> np.ndarray:
        return np.asarray(log_softmax(z * a + b, axis=1))

    return log_probabilities


def fit_affine_calibration(label_logits: Float[Tensor, "example label"], labels: Int[Tensor, " example"],
                           grid: Sequence[float] = C_GRID, method: str = "supervised calibration") -> Fitted:
    """One scale and one bias per class on the full model's label logits, C by leave-one-out."""
    return _fit_with_cv(method, label_logits, labels, label_logits.shape[-1], grid, _affine)

