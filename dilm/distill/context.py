"""What the stages of one distillation share: :class:`RunContext`.

Built once per run from its config: the device, the task and its split (``train`` for the LM stage and the learner,
``val`` held out of it for validation; the test split is never looked at), the generator and learner tokenizers, the
generator (fresh, or from an LM-stage checkpoint), the token limits derived from the data, the tokenised corpus, the
learner's pre-trained body for features, the label-agreement probe, the validation evaluator, the sampler, and the
helpers that turn examples or samples into learner inputs. The stages (:mod:`dilm.distill.lm_stage`,
:mod:`dilm.distill.match_stage`, :mod:`dilm.distill.select`) take it explicitly.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from dilm.device import autocast, device_kind, inference_dtype, pick_device
from dilm.distill.checkpoint import State, load_lm_checkpoint
from dilm.distill.config import DistillConfig
from dilm.evaluate import Evaluator
from dilm.features import embed, pool
from dilm.files import json_made_once, keyed_cache_path
from dilm.generator import Sample, TokenizedCorpus, make_sampler, prompt, resolve_template, sample_classes
from dilm.memorisation import CopyIndex, joined
from dilm.models import load_model, load_tokenizer, packaged_identity
from dilm.probe import LabelProbe, task_fingerprint
from dilm.protocol import PROTOCOL, EvalConfig
from dilm.sampling import Sampler, SamplingSpec
from dilm.tasks import Example, TaskData, check_dpc, length_limit, load_task
from dilm.text import encode, pad_ids, pair_args, tokenize

LEARNER_MAX_LEN = PROTOCOL.max_length  # learner tokens per text in the matching stage: the evaluation's
Callback = Callable[[dict], None]  # sees every logged row: {"step": global step, "stage": ..., metric: value}


def split_train(cfg: DistillConfig, task: TaskData) -> tuple[list[Example], list[Example]]:
    """(train, val): a seeded validation part held out of the training split (the test split is never looked at).
    The LM stage and the matching stage train on the first."""
    train = list(task.train)
    random.Random(cfg.seed).shuffle(train)
    n_val = min(cfg.val_size, len(train) // 5) if cfg.val_interval else 0
    return train[n_val:], train[:n_val]


class RunContext:
    """Models, data and helpers of one distillation, shared by its stages. ``rng`` drives the LM batches, the
    inner learner's batches and the ``lm_lambda`` mix; ``timings`` collects seconds per stage for provenance."""

    def __init__(self, cfg: DistillConfig, callback: Callback | None = None, task: TaskData | None = None):
        self.cfg = cfg
        self.callback = callback or (lambda m: None)
        self.device = pick_device(cfg.device)
        cfg.check_models()  # before the data is read
        self.task = task or load_task(cfg.task)
        for d in cfg.dpc:
            check_dpc(self.task, d)
        self.rng = random.Random(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.train, self.val = split_train(cfg, self.task)
        self.template = resolve_template(cfg.prompt_template, self.task.described_by)
        self.gen_tok = load_tokenizer(cfg.generator)
        self.learn_tok = load_tokenizer(cfg.learner)
        if cfg.lm_checkpoint:
            self.generator = load_lm_checkpoint(cfg.lm_checkpoint, cfg, self.task, self.template, self.device)
        else:
            self.generator = load_model(cfg.generator, "causal-lm", device=self.device)
        self.timings: dict[str, float] = {}
        self._train_ids: dict[int, list[int]] = {}  # learner token ids of training examples, filled as drawn

    def emit(self, state: State, **metrics) -> None:
        row = {"step": state.step, **metrics}
        state.history.append(row)
        self.callback(dict(row))

    @functools.cached_property
    def sampling(self) -> SamplingSpec:
        """How this run samples (pools, validation and final candidates): the config's sampling fields, the
        rendered template, the task's pair flag, the ``max_new_tokens`` limit and the precision on this device, all
        resolved. What sampling reads besides the weights, the counts and the seed: the keys of kept samples hash
        it whole."""
        cfg = self.cfg
        precision = "bf16" if inference_dtype(self.device) == torch.bfloat16 else "fp32"
        return SamplingSpec(generator=cfg.generator, template=self.template, is_pair=self.task.is_pair,
                            max_new_tokens=self.limits["max_new_tokens"], top_p=cfg.top_p,
                            batch_size=cfg.gen_batch_size, mode=cfg.sampler, precision=precision,
                            allow_unfinished=not cfg.drop_unfinished)

    @functools.cached_property
    def sampler(self) -> Sampler:
        return make_sampler(self.generator, self.gen_tok, self.device, self.sampling, self.task.label_names)

    def sample(self, counts: list[int], seed: int, label_names: list[str] | None = None) -> list[list[Sample]]:
        """``counts[i]`` distinct usable samples of ``label_names[i]`` (default: the task's classes; fewer if the
        generator cannot), all sampled in shared batches (:attr:`sampling`)."""
        out = sample_classes(self.sampler, self.gen_tok, label_names or self.task.label_names, counts, seed)
        self.generator.train()
        return out

    @functools.cached_property
    def full_corpus(self) -> TokenizedCorpus:
        """The training split rendered and tokenised once, whole."""
        return TokenizedCorpus.build(self.gen_tok, self.train, self.task.label_names, template=self.template)

    @functools.cached_property
    def limits(self) -> dict[str, int]:
        """Token limits: the config's, or (0) the ``length_quantile`` of the training data's, at most
        ``length_cap``: ``max_length`` of a rendered example (prompt and EOS included) for the LM stage,
        ``max_new_tokens`` of what follows the prompt for sampling."""
        cfg = self.cfg
        data = {} if cfg.max_length and cfg.max_new_tokens else self.data_limits()
        return {"max_length": cfg.max_length or data["max_length"],
                "max_new_tokens": cfg.max_new_tokens or data["max_new_tokens"]}

    def data_limits(self) -> dict[str, int]:
        """The limits the training data gives (``length_quantile``, ``length_cap``). Tokenising a whole training
        split takes seconds (SST-2: 8 s a process), so with a packaged generator they are kept on disk
        (``<cache dir>/limits/<hash>.json``: the generator's files, template, labels, the split's content, quantile
        and cap) and every later trial reads them."""
        cfg = self.cfg

        def compute() -> dict[str, int]:
            prompt_len = [len(self.gen_tok(prompt(n, self.template), add_special_tokens=False)["input_ids"])
                          for n in self.task.label_names]
            rendered = [len(s) for s in self.full_corpus.sequences]
            new = [n - prompt_len[e.label] for n, e in zip(rendered, self.train)]
            return {"max_length": length_limit(rendered, cfg.length_quantile, cfg.length_cap),
                    "max_new_tokens": length_limit(new, cfg.length_quantile, cfg.length_cap)}

        generator = packaged_identity(cfg.generator)
        if generator is None:
            return compute()
        key = json.dumps([*generator, self.template, list(self.task.label_names), cfg.length_quantile,
                          cfg.length_cap, task_fingerprint(self.train, self.task.label_names)])
        return json_made_once(keyed_cache_path("limits", key), compute)

    @functools.cached_property
    def corpus(self) -> TokenizedCorpus:
        """The LM stage's sequences: the training split cut at ``limits["max_length"]`` (LM stage and lm_lambda
        mixing share it)."""
        return self.full_corpus.truncated(self.limits["max_length"])

    @functools.cached_property
    def feature_model(self) -> torch.nn.Module:
        """The learner's backbone, loaded once per run for all feature computations."""
        return load_model(self.cfg.learner, "base", device=self.device)

    @functools.cached_property
    def val_evaluator(self) -> Evaluator:
        """Evaluation on the held-out part of train (the test split is never looked at); models stay loaded."""
        cfg = self.cfg
        task = TaskData(self.task.name, self.task.label_names, self.train, self.val, self.task.is_pair)
        return Evaluator(task, EvalConfig(archs=(cfg.learner,), seeds=cfg.val_seeds, steps=cfg.val_steps,
                                          device=cfg.device, progress=False))

    @functools.cached_property
    def copy_index(self) -> CopyIndex:
        """The training texts indexed for the copy filter and the copies report (built once per run)."""
        return CopyIndex(joined(e) for e in self.task.train)

    @functools.cached_property
    def probe(self) -> LabelProbe | None:
        """The label-agreement probe (fitted on the task's training split once, then cached on disk)."""
        cfg = self.cfg
        if not cfg.probe:
            return None
        model = self.feature_model if cfg.probe == cfg.learner else load_model(cfg.probe, "base", device=self.device)
        return LabelProbe.for_task(self.task, cfg.probe, self.device, model, cfg.probe_examples)

    def lm_only_cache_path(self, kind: str, fields: dict) -> Path | None:
        """Where a result of the LM-only generator (the LM checkpoint's weights, before any matching step) is kept:
        ``<cache dir>/<kind>/<hash>.json``, the hash of the checkpoint's weights files (place, size, time), device
        kind (:func:`~dilm.device.device_kind`), torch version and ``fields`` (every input of the result other than
        the weights). Such a result is the same for every run that starts from the checkpoint with those fields,
        whatever its matching keys. None without an LM checkpoint."""
        if not self.cfg.lm_checkpoint:
            return None
        folder = Path(self.cfg.lm_checkpoint)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not weights:
            return None
        files = [[str(w.resolve()), w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
        key = json.dumps([files, device_kind(self.device), torch.__version__, self.task.fingerprint, fields],
                         sort_keys=True, default=str)
        return keyed_cache_path(kind, key)

    def log_agreement(self, state: State, name: str, by_class: list[list]) -> None:
        """``name`` = % of texts the probe assigns to the class they were generated for (``by_class[c]``)."""
        if self.probe is not None:
            self.emit(state, stage=state.stage, **{name: 100 * self.probe.agreement(by_class)})

    def features(self, items) -> torch.Tensor:
        """Features of examples or samples under the pre-trained learner's body (``pooling``: [CLS] by default; a
        pair through the tokenizer's pair API) → (N, H) on CPU."""
        texts, pairs = pair_args(items)
        return embed(texts, self.cfg.learner, self.device, self.cfg.pooling, model=self.feature_model, pairs=pairs,
                     cache=True)  # real examples: the same for every trial, kept on disk

    @torch.no_grad()
    def learner_features(self, learner, rows: list[list[int]], batch: int = 256) -> torch.Tensor:
        """Features of pre-tokenised rows under a learner as it is now (its own last layer, ``pooling``)."""
        was_training = learner.training
        learner.eval()
        out = []
        for i in range(0, len(rows), batch):
            enc = pad_ids(rows[i: i + batch], self.learn_tok.pad_token_id, self.device)
            with autocast(self.device):
                hidden = learner(**enc, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H)
            out.append(pool(hidden, enc["attention_mask"], self.cfg.pooling).cpu())
        learner.train(was_training)
        return torch.cat(out)

    def fresh_learner(self, seed: int):
        return load_model(self.cfg.learner, "classifier", self.task.num_classes, self.device, seed=seed)

    def learner_inputs(self, examples) -> dict[str, torch.Tensor]:
        texts, pairs = pair_args(examples)  # a pair through the tokenizer's pair API (separator, segment ids)
        return encode(self.learn_tok, texts, LEARNER_MAX_LEN, self.device, pairs)

    def learner_ids(self, items) -> list[list[int]] | list[dict]:
        """Learner token ids of examples or samples (pairs: with segment ids), tokenised once so steps only pad
        (no per-step host work)."""
        texts, pairs = pair_args(items)
        return tokenize(self.learn_tok, texts, LEARNER_MAX_LEN, pairs)

    def train_ids(self, idx: list[int]) -> list[list[int]]:
        """Learner token ids of training examples by index, each tokenised the first time it is drawn."""
        missing = [i for i in dict.fromkeys(idx) if i not in self._train_ids]
        if missing:
            self._train_ids.update(zip(missing, self.learner_ids([self.train[i] for i in missing])))
        return [self._train_ids[i] for i in idx]
