"""What a distillation leaves on disk to go on from: the run checkpoint and the LM-stage checkpoint.

* **run checkpoint** — ``<output_dir>/checkpoint/``: ``state.json`` (:class:`State` and the run's
  ``DistillConfig.to_dict()``, checked on resume) and ``weights.pt`` (the generator, the best-validated generator
  and the matching optimiser; after the last outer loop only the generator, which then holds the best-validated
  weights). Written atomically after the LM stage and every ``checkpoint_interval`` outer loops.
* **LM-stage checkpoint** — an ordinary Hugging Face folder (generator and tokenizer) with ``dilm_lm.json``
  (:data:`LM_META`): the cache key and what the generator was trained with, checked before a run starts from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dilm import DilmError
from dilm.distill.config import DistillConfig
from dilm.files import atomic_write_dir, write_json
from dilm.hf import quiet_transformers
from dilm.tasks import TaskData

LM_META = "dilm_lm.json"  # beside the Hugging Face files of an LM-stage checkpoint
# the config fields a resumed run may change: those declared so (dilm.distill.config.resume_free)
RESUME_FREE = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.metadata.get("resume_free"))


@dataclass
class State:
    stage: str = "lm"  # lm → match → select → done
    step: int = 0  # global step: lm steps, then matching steps continue the count
    outer: int = 0  # completed outer loops
    best_val: float | None = None
    best_step: int | None = None  # the step of the best validation (lm_steps: the LM-only generator was kept)
    history: list[dict] = field(default_factory=list)


def _ckpt_dir(cfg: DistillConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoint"


def save_checkpoint(cfg: DistillConfig, generator, state: State, best_state: dict | None,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Atomic: write into a fresh folder, then swap it in. The matching optimiser's moments go with it."""

    def fill(tmp: Path) -> None:
        torch.save({"generator": generator.state_dict(), "best": best_state,
                    "optimizer": optimizer.state_dict() if optimizer is not None else None}, tmp / "weights.pt")
        write_json(tmp / "state.json", {**dataclasses.asdict(state), "config": cfg.to_dict()})

    atomic_write_dir(_ckpt_dir(cfg), fill)


def load_checkpoint(cfg: DistillConfig, generator, device) -> tuple[State, dict | None, dict | None]:
    """(state, best generator weights, matching optimiser state) of the last checkpoint, or a fresh start; the
    generator's weights are loaded into ``generator``."""
    d = _ckpt_dir(cfg)
    if not (d / "state.json").exists():
        return State(), None, None
    with _readable(d / "state.json"):
        saved = json.loads((d / "state.json").read_text())
        theirs = saved.pop("config")  # a field it lacks is a difference; a field only it has is gone from the config
        state = State(**saved)
    mismatch = {k for k, v in cfg.to_dict().items() if k not in RESUME_FREE and (k not in theirs or theirs[k] != v)}
    if mismatch:
        raise DilmError(f"{d} holds a checkpoint of a different configuration ({sorted(mismatch)}); "
                        "use another --output-dir")
    with _readable(d / "weights.pt"):
        weights = torch.load(d / "weights.pt", map_location=device)
        generator.load_state_dict(weights["generator"])
        return state, weights["best"], weights.get("optimizer")


@contextlib.contextmanager
def _readable(path: Path):
    """Any failure to read or apply ``path`` (truncated, not JSON or not a torch file, a key or tensor missing or of
    another shape) as one line naming it: a damaged checkpoint cannot be resumed, only removed."""
    try:
        yield
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DilmError(f"distill checkpoint {path} is damaged ({type(e).__name__}: {reason}): delete "
                        f"{path.parent} to start this run again from the beginning") from e


def read_lm_meta(path: str | Path) -> dict:
    d = Path(path)
    if not d.is_dir():
        raise DilmError(f"LM checkpoint {d} does not exist")
    if not (d / LM_META).exists():
        raise DilmError(f"{d} is not an LM-stage checkpoint written by dilm (no {LM_META}); see train_lm")
    return json.loads((d / LM_META).read_text())


def lm_checkpoint_key(path: Path) -> str | None:
    """The cache key of the LM-stage checkpoint in ``path``, or None when there is none."""
    return json.loads((path / LM_META).read_text())["key"] if (path / LM_META).exists() else None


def write_lm_checkpoint(out: Path, generator, tokenizer, meta: dict) -> Path:
    """The generator and its tokenizer as a Hugging Face checkpoint with ``meta`` in ``dilm_lm.json``, atomically."""

    def fill(tmp: Path) -> None:
        with quiet_transformers():
            generator.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        write_json(tmp / LM_META, meta)

    atomic_write_dir(out, fill)
    return out


def load_lm_checkpoint(path: str | Path, cfg: DistillConfig, task: TaskData, template: str, device):
    """The generator saved by ``train_lm``, after checking it fits this run (generator, labels, prompt)."""
    meta = read_lm_meta(path)
    for what, theirs, ours in (("generator", meta["generator"], cfg.generator),
                               ("label names", meta["label_names"], list(task.label_names)),
                               ("prompt template", meta["prompt_template"], template)):
        if theirs != ours:
            raise DilmError(f"LM checkpoint {path} was trained with {what} {theirs!r}, this run has {ours!r}")
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
