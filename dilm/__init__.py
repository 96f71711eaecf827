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

import os
import subprocess
from pathlib import Path

__version__ = "0.1.0"
GIT_REVISION_ENV = "DILM_GIT_REVISION"  # set where the code runs from a copy without .git (a Ray job's working dir)


def git_revision() -> str:
    """The git commit of this code, for provenance: ``$DILM_GIT_REVISION`` when set, else ``git rev-parse HEAD`` of
    the checkout this package lives in (only when ``dilm/`` is that checkout's own: not a copy installed inside some
    other repository), else ``"unknown"``."""
    if os.environ.get(GIT_REVISION_ENV):
        return os.environ[GIT_REVISION_ENV]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=here)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.split()
    if out.returncode or len(lines) != 2 or Path(lines[0]).resolve() / "dilm" != here:
        return "unknown"
    return lines[1]


class DilmError(ValueError):
    """A user-facing error: its message is one line that names the problem."""
