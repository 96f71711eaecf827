"""dilm: text dataset distillation by distilling a dataset into a language model (DiLM).

Vocabulary used throughout the package:

* **DPC** — data per class: how many synthetic examples each class gets in a final set.
* **generator** — the causal LM that is fine-tuned to *generate* class-conditioned texts.
* **learner** — the classifier whose gradients compare real and synthetic data (an encoder by default).
* **outer loop** — one re-initialisation of the learner followed by ``inner_loop`` generator steps.
* **inner loop** — a generator (matching) step followed by ``model_step_per_inner_step`` learner steps on real data.
* **pool** — the synthetic texts pre-generated per class, regenerated every ``generate_interval`` outer loops.
* **representative set** — a fixed subset of real examples per class used as the matching target.

``dilm`` never imports Ray or Optuna; orchestration lives in the sibling package ``tune``.
"""

__version__ = "0.1.0"


class DilmError(ValueError):
    """A user-facing error: its message is one line that names the problem."""
