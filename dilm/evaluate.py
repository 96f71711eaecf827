"""Evaluation protocol: train a fresh learner on a synthetic set and report test accuracy (DESIGN.md).

Protocol: 200 steps, AdamW lr 1e-4, weight decay 0.01, linear warm-up over the first half then linear decay,
gradient clip 1.0 (per model), batch 64 (the whole set when smaller), soft cross-entropy on the set's targets.

Architectures (``--arch``):

* a model name (``minilm-l6``, ``smollm2-135m``, ``tiny-bert``, any HF id/path) — fine-tuned with a fresh
  classification head;
* ``tfidf-logreg`` — TF-IDF + logistic regression trained from scratch (soft labels by weighted expansion);
* ``<encoder>-probe`` (``minilm-probe`` = ``minilm-l6``) — the frozen encoder's mean-pooled, unit-norm sentence
  embeddings + logistic regression trained on the set (soft labels by weighted expansion); deterministic, so one
  fit per set whatever ``seeds`` says. Cheap on a CPU and, unlike 200 fine-tuning steps on 20 texts, it separates
  good sets from bad ones;
* ``icl-<model>`` — k-shot in-context learning: the set's examples as demonstrations, the label chosen by
  comparing label-word log-likelihoods. A soft label shows its arg-max label word; the distribution (and the
  example's weight) decides which examples are shown (:func:`icl_demonstrations`); the scores say so.

Many evaluations run at once: the fine-tuned learners of one architecture are trained as an *ensemble* —
parameters stacked with ``torch.func.stack_module_state`` and the forward ``vmap``-ed over members, each member
with its own set, seed and data order. One process then keeps a GPU busy with many small evaluations. On the CPU
the learners are trained one at a time: on 2 cores (MiniLM-L6, SST-2 DPC 10, fused AdamW) 0.36 s per learner step
alone vs 0.43 in an ensemble of 5 whose members are called in turn and 0.50 when ``vmap``-ed
(``python bench/cpu_ensemble.py``; ~0.7 s vmap-ed with the unfused AdamW of before).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from dilm import DilmError
from dilm.ensemble import Ensemble, predict_ensemble, train_ensemble
from dilm.models import autocast, load_model, load_tokenizer, pick_device, resolve_model
from dilm.options import option
from dilm.probe import fit_logreg, predict, sentence_embeddings
from dilm.synset import SynExample, SynSet
from dilm.tasks import Example, TaskData
from dilm.text import encode, join_pair, left_pad, pair_args

TFIDF = "tfidf-logreg"
ICL_PREFIX = "icl-"
ICL_ALIASES = {"icl-smollm2": "smollm2-135m"}
PROBE_SUFFIX = "-probe"
PROBE_ALIASES = {"minilm-probe": "minilm-l6"}


@dataclass(frozen=True)
class EvalConfig:
    archs: tuple[str, ...] = option(("minilm-l6",), "architectures, comma-separated: model names, tfidf-logreg, "
                                                    "<encoder>-probe, icl-<model>")
    seeds: int = option(5, "training seeds per set")
    steps: int = option(200, "learner steps per training")
    lr: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_ratio: float = option(0.5, "share of the steps of linear learning-rate warm-up, then linear decay")
    clip: float = option(1.0, "gradient-norm clip per model")
    batch_size: int = option(64, "examples per step (the whole set when smaller)")
    max_length: int = option(128, "token limit per text")
    ensemble: int = option(16, "learners trained at once (vmap) on a GPU; capped by memory for large models; "
                               "one at a time on the CPU, where that is faster")
    icl_shots: int = option(8, "demonstrations per prompt of icl-<model>")
    test_limit: int | None = option(None, "evaluate on the first N test examples only (smoke runs)")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    progress: bool = option(True, "show progress bars")

    def __post_init__(self):
        if not self.archs:
            raise DilmError("evaluation needs at least one architecture")
        if self.seeds < 1 or self.steps < 0 or self.batch_size < 1 or self.ensemble < 1:
            raise DilmError("seeds, batch_size and ensemble must be >= 1 and steps >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise DilmError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        object.__setattr__(self, "archs", tuple(self.archs))


@dataclass
class ArchScores:
    accuracies: list[float] = field(default_factory=list)  # one per (set, seed)
    f1s: list[float] = field(default_factory=list)
    note: str | None = None  # how the architecture read the sets, where that is not obvious (ICL and soft labels)

    @staticmethod
    def _ms(xs):
        if not xs:
            return None
        return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    def summary(self) -> dict:
        out = {"n": len(self.accuracies)}
        mean, std = self._ms(self.accuracies)
        out.update(accuracy=100 * mean, accuracy_std=100 * std)
        if self.f1s:
            f_mean, f_std = self._ms(self.f1s)
            out.update(f1=100 * f_mean, f1_std=100 * f_std)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Scores:
    by_arch: dict[str, ArchScores]

    def summary(self) -> dict[str, dict]:
        return {arch: s.summary() for arch, s in self.by_arch.items()}

    def mean_accuracy(self) -> float:
        """Mean accuracy (%) over architectures (the validation score of a distillation run)."""
        return statistics.fmean(s.summary()["accuracy"] for s in self.by_arch.values())


def arch_kind(arch: str) -> str:
    if arch == TFIDF:
        return "tfidf"
    if arch.startswith(ICL_PREFIX):
        return "icl"
    if arch.endswith(PROBE_SUFFIX):
        return "probe"
    return "finetune"


def icl_model(arch: str) -> str:
    return ICL_ALIASES.get(arch, arch[len(ICL_PREFIX):])


def probe_encoder(arch: str) -> str:
    return PROBE_ALIASES.get(arch, arch.removesuffix(PROBE_SUFFIX))


def check_arch(arch: str) -> None:
    """Fail early (before training) on an architecture that cannot resolve."""
    kind = arch_kind(arch)
    if kind == "finetune":
        resolve_model(arch)
    elif kind == "icl" and resolve_model(icl_model(arch)).family != "decoder":
        raise DilmError(f"{arch}: in-context learning needs a decoder LM, {icl_model(arch)} is an encoder")
    elif kind == "probe" and resolve_model(probe_encoder(arch)).family != "encoder":
        raise DilmError(f"{arch}: a probe needs an encoder, {probe_encoder(arch)} is a decoder LM")


# --------------------------------------------------------------------------- ensembles of fine-tuned learners


def finetune_ensemble(model_name: str, jobs: list[tuple[SynSet, int]], test: list[Example], cfg: EvalConfig,
                      device, base: torch.nn.Module | None = None) -> list[np.ndarray]:
    """Train one learner per (set, seed) job, all at once; return each member's test predictions."""
    tok = load_tokenizer(model_name)
    num_classes = jobs[0][0].num_classes
    base = base or load_model(model_name, "classifier", num_classes, device)
    base.train()
    n = len(jobs)
    ens = Ensemble(base, [seed for _, seed in jobs], device)

    # Training data, (N, max_n, T) per model input and (N, max_n, C) targets; each set tokenized once, a pair
    # through the tokenizer's pair API (separator, segment ids).
    sizes = [len(s) for s, _ in jobs]
    texts, pairs = pair_args([e for s, _ in jobs for e in s.examples])
    enc = encode(tok, texts, cfg.max_length, device, pairs)
    t = enc["input_ids"].shape[1]
    inputs = {k: torch.full((n, max(sizes), t), tok.pad_token_id if k == "input_ids" else 0, dtype=torch.long,
                            device=device) for k in enc}
    targets = torch.zeros((n, max(sizes), num_classes), device=device)
    start = 0
    for i, (s, _) in enumerate(jobs):
        for k, v in enc.items():
            inputs[k][i, : len(s)] = v[start: start + len(s)]
        targets[i, : len(s)] = torch.tensor([e.target(num_classes) for e in s.examples], device=device)
        start += len(s)

    train_ensemble(ens, inputs, targets, sizes, [seed for _, seed in jobs], cfg, device)
    return predict_ensemble(ens, tok, test, cfg, device)


# --------------------------------------------------------------------------- TF-IDF + logistic regression


def tfidf_logreg(synset: SynSet, seed: int, test: list[Example]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, labels, weights = [], [], []
    for e in synset.examples:  # soft labels: one row per class, weighted by its probability
        for c, p in enumerate(e.target(synset.num_classes)):
            if p > 0:
                texts.append(join_pair(e.text, e.text_pair))
                labels.append(c)
                weights.append(p)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    vec.fit([join_pair(e.text, e.text_pair) for e in synset.examples])  # IDF over the set's texts, not the expansion
    x = vec.transform(texts)
    if len(set(labels)) < 2:  # a one-class set predicts that class
        return np.full(len(test), labels[0])
    clf = LogisticRegression(C=10.0, max_iter=1000, random_state=seed)
    clf.fit(x, labels, sample_weight=weights)
    return clf.predict(vec.transform([join_pair(e.text, e.text_pair) for e in test]))


# --------------------------------------------------------------------------- in-context learning


def icl_prompt(text: str, pair: str | None, label: str | None = None) -> str:
    body = f"text: {join_pair(text, pair, ' || ')}\nlabel:"
    return body if label is None else f"{body} {label}\n\n"


@torch.no_grad()
def label_logprobs(model, tok, prompts: list[str], label_words: list[str], device,
                   batch_size: int = 16) -> torch.Tensor:
    """Log-likelihood of each label word (all its tokens) after each prompt → (len(prompts), C)."""
    out = torch.zeros(len(prompts), len(label_words))
    for c, word in enumerate(label_words):
        word_ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i: i + batch_size]
            enc = tok([p for p in chunk], add_special_tokens=False)["input_ids"]
            seqs = [e + word_ids for e in enc]
            ids, am = left_pad(seqs, tok.pad_token_id, device)  # left padding keeps the label word at the end
            with autocast(device):
                logits = model(input_ids=ids, attention_mask=am).logits.float()
            logp = torch.log_softmax(logits[:, -len(word_ids) - 1: -1], -1)  # positions predicting the word
            target = torch.tensor(word_ids, device=device).expand(len(seqs), -1)
            out[i: i + len(chunk), c] = logp.gather(-1, target[..., None]).squeeze(-1).sum(-1).cpu()
    return out


ICL_SOFT_NOTE = ("ICL shows each demonstration's arg-max label word; soft labels and weights decide which "
                 "examples are shown (drawn with probability ∝ weight × (max p − 1/C)), not the words")


def icl_demonstrations(synset: SynSet, seed: int, shots: int) -> list[tuple[SynExample, int]]:
    """The ``shots`` demonstrations of one ICL evaluation, each with the class whose label word it shows.

    A prompt holds one label word per example, so a soft label shows the word of its **arg-max**. The
    distribution still counts: with more examples than shots, demonstrations are drawn without replacement with
    probability ∝ weight × (max p − 1/C), the label's margin over uniform — an example whose label is near
    uniform (which one word would misstate) or whose weight is 0 is shown only when nothing else is left.
    Sets whose examples all have the same margin (hard sets) get a plain seeded shuffle, as before soft labels.
    """
    c = synset.num_classes
    dists = [e.distribution(c) for e in synset.examples]
    argmax = [max(range(c), key=d.__getitem__) for d in dists]
    margin = np.array([e.weight * (max(d) - 1 / c) for e, d in zip(synset.examples, dists)])
    rng = random.Random(seed)
    if np.allclose(margin, margin[0]):
        order = list(range(len(dists)))
        rng.shuffle(order)
    else:  # weighted sampling without replacement: the k largest u^(1/w) (Efraimidis & Spirakis); w = 0 last
        keys = [rng.random() ** (1 / m) if m > 1e-12 else -rng.random() for m in margin]
        order = sorted(range(len(dists)), key=lambda i: -keys[i])
    return [(synset.examples[i], argmax[i]) for i in order[:shots]]


def icl_predict(model, tok, synset: SynSet, seed: int, test: list[Example], shots: int, device) -> np.ndarray:
    demos = icl_demonstrations(synset, seed, shots)
    prefix = "".join(icl_prompt(e.text, e.text_pair, synset.label_names[c]) for e, c in demos)
    prompts = [prefix + icl_prompt(e.text, e.text_pair) for e in test]
    return label_logprobs(model, tok, prompts, list(synset.label_names), device).argmax(-1).numpy()


# --------------------------------------------------------------------------- the evaluator


class Evaluator:
    """Scores synthetic sets on one task across architectures; keeps models and tokenizers loaded between calls
    (the evaluation actors of a sweep hold one each)."""

    def __init__(self, task: TaskData, cfg: EvalConfig):
        self.task = task
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        for arch in cfg.archs:
            check_arch(arch)
        self.test = task.test[: cfg.test_limit] if cfg.test_limit else task.test
        self.gold = np.array([e.label for e in self.test])
        self._models: dict[tuple[str, str], torch.nn.Module] = {}
        self._embeddings: dict[tuple[str, str], np.ndarray] = {}

    def _model(self, name: str, head: str) -> torch.nn.Module:
        key = (name, head)
        if key not in self._models:
            self._models[key] = load_model(name, head, self.task.num_classes, self.device)
        return self._models[key]

    def _probe(self, encoder: str, synset: SynSet) -> np.ndarray:
        """Test predictions of a logistic regression on the frozen encoder's embeddings of ``synset``."""
        model = self._model(encoder, "base")
        if (encoder, "test") not in self._embeddings:  # the test split is embedded once per encoder
            self._embeddings[encoder, "test"] = sentence_embeddings(
                [join_pair(e.text, e.text_pair) for e in self.test], encoder, self.device, model)
        x = sentence_embeddings([join_pair(e.text, e.text_pair) for e in synset.examples], encoder, self.device, model)
        targets = np.array([e.target(synset.num_classes) for e in synset.examples], dtype=np.float64)
        return predict(fit_logreg(x, targets), self._embeddings[encoder, "test"])

    def _record(self, scores: ArchScores, preds: np.ndarray) -> None:
        scores.accuracies.append(float((preds == self.gold).mean()))
        if self.task.num_classes == 2 and self.task.is_pair:  # MRPC-style tasks also report F1
            from sklearn.metrics import f1_score

            scores.f1s.append(float(f1_score(self.gold, preds)))

    def evaluate(self, sets: list[SynSet]) -> Scores:
        for s in sets:
            if s.label_names != self.task.label_names:
                raise DilmError(f"set labels {list(s.label_names)} do not match task {self.task.name} "
                                f"labels {list(self.task.label_names)}")
            if s.meta.get("tdd_learner"):
                raise DilmError(f"this is an embedding-level TDD set, evaluable only on {s.meta['tdd_learner']}")
        jobs = [(s, seed) for s in sets for seed in range(self.cfg.seeds)]
        out: dict[str, ArchScores] = {}
        bar = tqdm(total=len(jobs) * len(self.cfg.archs), desc="evaluate", disable=not self.cfg.progress)
        for arch in self.cfg.archs:
            scores = out.setdefault(arch, ArchScores())
            kind = arch_kind(arch)
            if kind == "finetune":
                base = self._model(arch, "classifier")  # members copy its weights; it stays untouched
                size = self.cfg.ensemble if self.device.type != "cpu" else 1  # CPU: one at a time is faster
                for i in range(0, len(jobs), size):
                    chunk = jobs[i: i + size]
                    for preds in finetune_ensemble(arch, chunk, self.test, self.cfg, self.device, base):
                        self._record(scores, preds)
                    bar.update(len(chunk))
            elif kind == "probe":
                for s in sets:  # deterministic: one fit per set
                    self._record(scores, self._probe(probe_encoder(arch), s))
                    bar.update(self.cfg.seeds)
            elif kind == "tfidf":
                for s, seed in jobs:
                    self._record(scores, tfidf_logreg(s, seed, self.test))
                    bar.update()
            else:
                name = icl_model(arch)
                model, tok = self._model(name, "causal-lm").eval(), load_tokenizer(name)
                if any(e.soft_label is not None or e.weight != 1.0 for s in sets for e in s.examples):
                    scores.note = ICL_SOFT_NOTE
                for s, seed in jobs:
                    self._record(scores, icl_predict(model, tok, s, seed, self.test, self.cfg.icl_shots,
                                                     self.device))
                    bar.update()
        bar.close()
        return Scores(out)


def evaluate(sets: list[SynSet], task: TaskData, cfg: EvalConfig) -> Scores:
    return Evaluator(task, cfg).evaluate(sets)
