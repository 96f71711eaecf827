"""Gradient matching through generation probabilities (DiLM steps 2–5), as small functions.

Per class c and generator step:  g_real = ∇_θ CE(learner(real_c), c)  (a constant for the generator);
w = softmax(−ℓ/T) over the generation losses ℓ of B synthetic class-c texts;
g_syn = ∇_θ Σ_i w_i CE(learner(x_i), c)  — differentiable in w, hence in the generator;
loss_c = (1 − cos(g_real, g_syn)) / C.   θ: the classifier head by default, all learner layers optionally.

Only θ is differentiated: the learner's other parameters enter :func:`class_gradient` as detached constants, so
the backward pass of the matching loss reaches the generator through w and fills no ``.grad`` of the learner, and
the body's activations keep no graph. g_real needs no graph at all (the caller computes it under ``no_grad``;
``torch.func.grad`` still differentiates inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from dilm.models import head_param_names


def matched_params(learner: torch.nn.Module, all_layers: bool = False) -> dict[str, torch.Tensor]:
    """The learner parameters whose gradients are compared (detached copies; the learner is not changed)."""
    head = set(head_param_names(learner))
    return {k: v.detach() for k, v in learner.named_parameters() if all_layers or k in head}


def class_gradient(learner: torch.nn.Module, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                   label: int, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """∇_params of the (weighted) CE of ``inputs`` all labelled ``label``.

    ``weights`` (B,) sum to 1 and may require grad: the result is then differentiable with respect to them.
    Without weights the batch mean is used. The learner's own parameters are read, never written; those not in
    ``params`` are passed detached, so nothing but ``params`` (and ``weights``) is differentiated.
    """
    frozen = {k: v.detach() for k, v in learner.named_parameters() if k not in params}

    def loss_fn(p):
        logits = functional_call(learner, {**frozen, **p}, (), inputs).logits  # (B, C)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        ce = F.cross_entropy(logits, torch.full((logits.shape[0],), label, device=logits.device),
                             reduction="none")  # (B,)
        return ce.mean() if weights is None else (weights * ce).sum()

    return grad(loss_fn)(params)


def flatten(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in g.values()])


def match_loss(g_real: dict[str, torch.Tensor], g_syn: dict[str, torch.Tensor]) -> torch.Tensor:
    """1 − cosine similarity of the flattened gradients (scalar)."""
    return 1 - F.cosine_similarity(flatten(g_real).detach(), flatten(g_syn), dim=0)


def sample_weights(gen_losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = softmax(−ℓ / T) over a class's synthetic mini-batch."""
    return torch.softmax(-gen_losses / temperature, dim=0)
