"""Where learned labels live, how far they may move, and the labelings they are compared with.

Vocabulary (used by :mod:`dilm.softlabel` and :mod:`dilm.tdd`):

* **label point** ``y`` (n, C): the learned labels themselves — a point of the probability simplex per example,
  not logits. They start at the hard labels **exactly** (one-hot; ``init_smoothing`` s > 0 starts them at
  (1 − s)·onehot + s/C instead), so mass can reach any class, including classes no example is labelled with.
* **projection**: after every outer Adam step each row is projected back onto the simplex (Euclidean
  projection, :func:`project_simplex`) and then onto the **movement limit**: the total-variation distance
  ½‖y − y₀‖₁ from its start is at most ``max_shift`` (a row beyond it is pulled back along the segment to y₀,
  which keeps it a distribution; :func:`limit_shift`). ``max_shift`` = 1 leaves the labels free, as the paper's.
* **weights** (optional): a per-example weight w = exp(a) on the label distribution, |a| ≤ log ``max_weight``;
  the training target is w · y, so soft cross-entropy on it is w × cross-entropy. Written to the set's JSONL.

Controls for the bench, at the same texts: label smoothing at the same mean confidence as a learned set
(:func:`smoothed_twin`), and **teacher** labels from a logistic-regression probe fitted on the real pool the
labels were learned from (:class:`Teacher`). (The bench's paired intervals: :mod:`dilm.stats`.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dilm import DilmError
from dilm.synset import SynSet


def initial_labels(labels: list[int], num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(n, C) float64 starting labels: one-hot, or smoothed by ``smoothing`` ∈ [0, 1)."""
    onehot = torch.nn.functional.one_hot(torch.tensor(labels), num_classes).double()
    return (1 - smoothing) * onehot + smoothing / num_classes


def project_simplex(y: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``y`` (n, C) onto the probability simplex (Duchi et al., 2008):
    max(y − τ, 0) with τ chosen so the row sums to 1."""
    u = y.sort(-1, descending=True).values  # (n, C)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, y.shape[-1] + 1, device=y.device, dtype=y.dtype)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)  # (n, 1): the support size, >= 1
    tau = css.gather(-1, rho - 1) / rho
    return (y - tau).clamp_min(0)


def shift(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """Total-variation distance ½‖y − y₀‖₁ of each row → (n,)."""
    return 0.5 * (y - y0).abs().sum(-1)


def limit_shift(y: torch.Tensor, y0: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Rows of ``y`` farther than ``max_shift`` (TV) from ``y0`` pulled back along the segment to ``y0``."""
    d = shift(y, y0)[:, None]
    scale = torch.where(d > max_shift, max_shift / d.clamp_min(1e-12), torch.ones_like(d))
    return y0 + scale * (y - y0)


@torch.no_grad()
def project_labels(y: torch.Tensor, y0: torch.Tensor, max_shift: float) -> None:
    """In place: back onto the simplex, then within ``max_shift`` of the start (both keep rows distributions)."""
    y.copy_(limit_shift(project_simplex(y), y0, max_shift))


def check_label_keys(max_shift: float, init_smoothing: float, max_weight: float) -> None:
    """Shared validation of the label keys of SoftLabelConfig and TDDConfig."""
    if not 0 < max_shift <= 1:
        raise DilmError(f"max_shift must be in (0, 1] (a total-variation distance), got {max_shift}")
    if not 0 <= init_smoothing < 1:
        raise DilmError(f"init_smoothing must be in [0, 1), got {init_smoothing}")
    if not max_weight >= 1:
        raise DilmError(f"max_weight must be >= 1, got {max_weight}")


def learnable_labels(labels: list[int], num_classes: int, init_smoothing: float, weights: bool, device,
                     dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The label tensors to learn ({"y": (n, C)} and, with weights, {"log_w": (n,)}) and the start y₀."""
    y0 = initial_labels(labels, num_classes, init_smoothing).to(device=device, dtype=dtype)
    learn = {"y": y0.clone().requires_grad_()}
    if weights:
        learn["log_w"] = torch.zeros(len(labels), device=device, dtype=dtype, requires_grad=True)
    return learn, y0


def targets_of(learn: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unroll's training targets (n, C): w · y (y alone without weights)."""
    return learn["y"] * learn["log_w"].exp()[:, None] if "log_w" in learn else learn["y"]


def after_step(learn: dict[str, torch.Tensor], y0: torch.Tensor, max_shift: float, max_weight: float) -> None:
    """The projections after one outer Adam step."""
    project_labels(learn["y"], y0, max_shift)
    if "log_w" in learn:
        with torch.no_grad():
            learn["log_w"].clamp_(-math.log(max_weight), math.log(max_weight))


def learned_labels(learn: dict[str, torch.Tensor]) -> tuple[list[list[float]], list[float] | None]:
    """(distributions, weights or None) as Python lists for :meth:`SynSet.with_soft_labels`."""
    y = learn["y"].detach().double().cpu()
    y = y / y.sum(-1, keepdim=True)  # exact sums after float32 steps
    w = learn["log_w"].detach().double().exp().cpu().tolist() if "log_w" in learn else None
    return y.tolist(), w


# --------------------------------------------------------------------------- controls


def mean_confidence(synset: SynSet) -> float:
    """Mean over examples of the largest class probability (1 for a hard set)."""
    c = synset.num_classes
    return float(np.mean([max(e.distribution(c)) for e in synset.examples]))


def smoothed_twin(hard: SynSet, confidence: float) -> SynSet:
    """``hard``'s texts with label smoothing whose every label puts ``confidence`` on its hard class:
    (1 − ε)·onehot + ε/C with ε = (1 − confidence)·C/(C − 1)."""
    c = hard.num_classes
    if not 1 / c <= confidence <= 1:
        raise DilmError(f"confidence must be in [1/C, 1], got {confidence}")
    eps = (1 - confidence) * c / (c - 1)
    soft = [[(1 - eps) * (k == e.label) + eps / c for k in range(c)] for e in hard.examples]
    out = hard.with_soft_labels(soft)
    return SynSet(out.examples, out.label_names, {**hard.meta, "labels": f"smoothed to confidence {confidence:.4f}"})


class Teacher:
    """A probe fitted on real examples' features (logistic regression): its predicted distributions on a set's
    texts are the "teacher" labels (knowledge distillation from the same real pool the soft labels used)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, seed: int = 0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
        self.probe.fit(features, labels)

    def label(self, synset: SynSet, features: np.ndarray) -> SynSet:
        """``synset``'s texts (their features (n, H) given) with the probe's distributions as labels."""
        proba = np.zeros((len(synset), synset.num_classes))
        proba[:, self.probe.classes_] = self.probe.predict_proba(features)
        out = synset.with_soft_labels(proba.tolist())
        return SynSet(out.examples, out.label_names, {**synset.meta, "labels": "teacher probe"})
