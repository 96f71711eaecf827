"""Evaluation: the vmap ensemble equals separate models; learners beat chance on a separable toy; ICL scoring."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from dilm.archs.icl import label_logprobs
from dilm.ensemble import Ensemble
from dilm.evaluate import Evaluator
from dilm.models import load_model, load_tokenizer
from dilm.protocol import EvalConfig, linear_warmup_decay
from dilm.synset import SynSet
from dilm.text import encode, pad_ids, tokenize

CPU = torch.device("cpu")


def test_ensemble_logits_equal_separate_models():
    for name in ("tiny-bert", "tiny-llama"):
        base = load_model(name, "classifier", 2).eval()
        tok = load_tokenizer(name)
        ens = Ensemble(base, [0, 1], CPU)
        enc = encode(tok, ["a good film indeed", "bad"], 16, CPU)
        got = ens.logits(enc["input_ids"], enc["attention_mask"], batched=False)  # (2 members, 2, C)
        for i in range(2):
            ref = load_model(name, "classifier", 2).eval()
            ref.load_state_dict({k: v[i] for k, v in ens.params.items()}, strict=False)
            want = ref(**enc).logits
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_learners_beat_chance_on_separable_toy(toy_task):
    synset = SynSet.from_examples(toy_task.train[:40], toy_task.label_names)
    cfg = EvalConfig(archs=("tiny-bert", "tfidf-logreg"), seeds=2, steps=60, lr=1e-3, progress=False)
    summary = Evaluator(toy_task, cfg).evaluate([synset]).summary()
    assert summary["tfidf-logreg"]["accuracy"] > 90
    assert summary["tiny-bert"]["accuracy"] > 75
    assert summary["tiny-bert"]["n"] == 2


def test_icl_scoring_picks_the_likelier_label():
    model = load_model("tiny-llama", "causal-lm").eval()
    tok = load_tokenizer("tiny-llama")
    prompts = ["text: one\nlabel:", "text: a much longer review here\nlabel:"]
    words = ["negative", "positive"]
    got = label_logprobs(model, tok, prompts, words, CPU, batch_size=1)
    for i, p in enumerate(prompts):  # reference: full-sequence log-likelihood difference, one at a time
        for c, w in enumerate(words):
            ids_p = tok(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids_w = tok(" " + w, add_special_tokens=False, return_tensors="pt")["input_ids"]
            full = torch.cat([ids_p, ids_w], 1)
            logp = torch.log_softmax(model(full).logits[0, :-1], -1)
            ref = logp[torch.arange(ids_p.shape[1] - 1, full.shape[1] - 1), ids_w[0]].sum()
            torch.testing.assert_close(got[i, c], ref, rtol=1e-4, atol=1e-4)


def test_protocol_schedule_warms_up_over_half_then_decays():
    lrs = [linear_warmup_decay(s, 200, 0.5) for s in range(200)]
    assert max(lrs) == 1.0 and lrs.index(1.0) == 99 and lrs[0] < 0.02 and lrs[-1] < 0.02


def test_one_protocol_feeds_the_evaluator_the_matching_learner_and_the_unroll():
    from dilm.distill import LEARNER_MAX_LEN
    from dilm.protocol import PROTOCOL
    from dilm.unroll import UnrollConfig

    cfg = EvalConfig()
    assert {k: getattr(cfg, k) for k in vars(PROTOCOL)} == vars(PROTOCOL)
    assert (PROTOCOL.steps, PROTOCOL.lr, PROTOCOL.weight_decay, PROTOCOL.warmup_ratio, PROTOCOL.clip,
            PROTOCOL.batch_size, PROTOCOL.max_length) == (200, 1e-4, 0.01, 0.5, 1.0, 64, 128)
    assert LEARNER_MAX_LEN == UnrollConfig().max_length == PROTOCOL.max_length


def test_arch_names_find_their_kind_and_a_miss_names_the_kinds():
    from dilm import DilmError
    from dilm.archs import KINDS, check_arch, kind_of

    got = {a: (kind_of(a).name, kind_of(a).model(a)) for a in (
        "tfidf-logreg", "icl-smollm2", "icl-tiny-llama", "minilm-probe", "tiny-bert-probe", "minilm-l6",
        "smollm2-probe")}
    assert got == {"tfidf-logreg": ("tfidf", None), "icl-smollm2": ("icl", "smollm2-135m"),
                   "icl-tiny-llama": ("icl", "tiny-llama"), "minilm-probe": ("probe", "minilm-l6"),
                   "tiny-bert-probe": ("probe", "tiny-bert"), "minilm-l6": ("finetune", "minilm-l6"),
                   "smollm2-probe": ("probe", "smollm2-135m")}
    assert KINDS[-1].name == "finetune"  # takes any other name, so it is asked last
    with pytest.raises(DilmError, match=r"unknown architecture ''; known kinds: tfidf-logreg \(tfidf\), icl-<model>"):
        kind_of("")
    with pytest.raises(DilmError, match="in-context learning needs a decoder LM, tiny-bert is an encoder.*known kinds"):
        check_arch("icl-tiny-bert")


def test_pre_tokenised_batches_equal_encode():
    """The matching stage tokenises once and pads per step; its batches must be what ``encode`` builds."""
    tok = load_tokenizer("tiny-bert")
    texts = ["a fine film", "dull", "the plot is thin but the acting " * 30]  # the last one is truncated
    ids = tokenize(tok, texts, 16)
    got, want = pad_ids([ids[2], ids[0]], tok.pad_token_id, CPU), encode(tok, [texts[2], texts[0]], 16, CPU)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_pairs_go_through_the_tokenizers_pair_api():
    """A pair is encoded as the tokenizer encodes a pair — its separator and segment ids — not as the string
    "a [SEP] b"; pre-tokenised pairs pad to the same batch; the ensemble reads the segment ids."""
    tok = load_tokenizer("tiny-bert")
    a, b = ["a cat sat on the mat", "dogs bark"], ["a cat was sitting", "loud dogs " * 20]
    enc = encode(tok, a, 24, CPU, b)
    want = tok(a, b, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert all(torch.equal(enc[k], want[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert enc["token_type_ids"][0].max() == 1  # the second text is segment 1
    got = pad_ids(tokenize(tok, a, 24, b), tok.pad_token_id, CPU)
    assert got.keys() == enc.keys() and all(torch.equal(got[k], enc[k]) for k in enc)
    ens = Ensemble(load_model("tiny-bert", "classifier", 2).eval(), [0], CPU)
    ref = load_model("tiny-bert", "classifier", 2).eval()
    ref.load_state_dict({k: v[0] for k, v in ens.params.items()}, strict=False)
    torch.testing.assert_close(ens.forward(enc, batched=False)[0], ref(**enc).logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref(**enc).logits, ref(input_ids=enc["input_ids"],
                                                     attention_mask=enc["attention_mask"]).logits)


def test_members_in_turn_train_as_the_vmap_ensemble():
    """On the CPU the members are called in turn, their parameters views of the stacked ones: one protocol step
    must give the stacked gradients, and the updated parameters, that the vmap path gives."""
    from dilm.ensemble import train_ensemble

    tok = load_tokenizer("tiny-bert")
    enc = encode(tok, ["a good film", "bad", "dull plot", "fine acting"], 16, CPU)
    inputs = {k: v.view(2, 2, -1) for k, v in enc.items()}  # member i trains on its own two texts
    targets = torch.eye(2).expand(2, 2, 2)
    cfg = EvalConfig(archs=("tiny-bert",), steps=1, lr=1e-2, warmup_ratio=0.0, progress=False, precision="fp32")
    runs = {}
    for vectorized in (True, False):
        base = load_model("tiny-bert", "classifier", 2).eval()  # eval: no dropout, so both paths are deterministic
        ens = Ensemble(base, [0, 1], CPU, vectorized=vectorized)
        logits = ens.forward(inputs)
        (logits[0, 0, 1] + 2 * logits[1, 1, 0]).backward()  # members' grads differ
        grads = {k: v.grad.clone() for k, v in ens.params.items()}
        train_ensemble(ens, inputs, targets, [2, 2], [0, 1], cfg, CPU)
        runs[vectorized] = logits.detach(), grads, {k: v.detach().clone() for k, v in ens.params.items()}
    (l_v, g_v, p_v), (l_t, g_t, p_t) = runs[True], runs[False]
    torch.testing.assert_close(l_t, l_v, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_t.values())
    for k in g_v:
        torch.testing.assert_close(g_t[k], g_v[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p_t[k], p_v[k], rtol=1e-4, atol=1e-4)  # Adam: lr 1e-2 steps, noise ~1e-5
    assert not torch.equal(p_t["classifier.weight"][0], p_t["classifier.weight"][1])


def test_cpu_learners_train_with_eager_attention_and_predict_with_their_own(monkeypatch):
    """train_ensemble on a CPU: the training steps run under training_attention (eager for the protocol's short
    texts), the model's own kernel (SDPA) is back for predictions."""
    from dilm import ensemble

    seen = []
    step = ensemble.member_step
    monkeypatch.setattr(ensemble, "member_step", lambda ens, *a: seen.append(ens.base.config._attn_implementation)
                        or step(ens, *a))
    enc = encode(load_tokenizer("tiny-bert"), ["a good film", "bad", "dull plot", "fine acting"], 16, CPU)
    base = load_model("tiny-bert", "classifier", 2)
    own = base.config._attn_implementation
    ens = Ensemble(base, [0, 1], CPU, vectorized=False)
    cfg = EvalConfig(archs=("tiny-bert",), steps=2, progress=False, precision="fp32")
    ensemble.train_ensemble(ens, {k: v.view(2, 2, -1) for k, v in enc.items()}, torch.eye(2).expand(2, 2, 2),
                            [2, 2], [0, 1], cfg, CPU)
    assert own != "eager" and seen == ["eager"] * 4 and base.config._attn_implementation == own


def test_micro_batches_cut_sorted_rows_at_the_least_padded_cost():
    from dilm.ensemble import micro_batches

    lengths = [3, 4, 4, 5, 30, 31]
    groups = micro_batches(lengths, call_cost=10)
    assert groups == [(0, 4), (4, 6)]  # four short texts, two long: 10 + 20 + 10 + 62 against 10 + 186 at once
    assert micro_batches(lengths, call_cost=1000) == [(0, 6)]  # a call dearer than any padding: one batch
    assert [b - a for a, b in micro_batches(list(range(1, 40)))] and sum(
        b - a for a, b in micro_batches(list(range(1, 40)))) == 39  # a partition of every row, in order


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_length_sorted_micro_batches_give_the_padded_batch_gradient(precision):
    """The CPU path trains each member on micro-batches of similar length, each cut to its own longest text: the
    gradient is the one padded batch's (no dropout: eval mode), in fp32 to float noise and in bf16 autocast to
    bf16's precision; and a whole protocol run in bf16 still learns the separable toy (below)."""
    from dilm.ensemble import member_step

    tok = load_tokenizer("tiny-bert")
    texts = ["bad", "a good film", "dull plot and a story that goes nowhere at all", "fine", "so so", "great fun"]
    enc = encode(tok, texts, 32, CPU)
    inputs = {k: v[None] for k, v in enc.items()}  # one member, six texts
    targets = torch.eye(2)[[0, 1, 0, 1, 0, 1]][None]
    base = load_model("tiny-bert", "classifier", 2).eval()
    ens = Ensemble(base, [0], CPU, vectorized=False)
    rows = torch.tensor([5, 0, 2, 3])  # a batch of four of the six, in schedule order
    member_step(ens, 0, inputs, targets, rows, enc["attention_mask"].sum(-1), precision, CPU)
    got = {k: v.grad.clone() for k, v in ens.params.items()}
    for v in ens.params.values():
        v.grad.zero_()
    logits = ens.member(0, {k: v[0, rows] for k, v in inputs.items()})  # one batch padded to the longest
    (-(targets[0, rows] * torch.log_softmax(logits, -1)).sum(-1).mean()).backward()
    tol = {"fp32": (1e-4, 1e-6), "bf16": (5e-2, 5e-3)}[precision]
    for k, v in ens.params.items():
        torch.testing.assert_close(got[k], v.grad, rtol=tol[0], atol=tol[1])
    assert any(g.abs().sum() > 0 for g in got.values())


@pytest.mark.integration
def test_bf16_learners_beat_chance_on_separable_toy(toy_task):
    synset = SynSet.from_examples(toy_task.train[:40], toy_task.label_names)
    cfg = EvalConfig(archs=("tiny-bert",), seeds=2, steps=60, lr=1e-3, progress=False, precision="bf16")
    assert Evaluator(toy_task, cfg).evaluate([synset]).summary()["tiny-bert"]["accuracy"] > 75


def test_training_the_used_embedding_rows_gives_the_full_tables_result(monkeypatch):
    """``used_rows`` trains a small table of the rows the texts use and decays the others alone: the weights after a
    protocol run (weight decay, clipping, warm-up) are the ones training the whole table gives, rows used or not."""
    import contextlib

    import dilm.ensemble as ensemble

    tok = load_tokenizer("tiny-bert")
    enc = encode(tok, ["a good film", "bad", "dull plot", "fine acting"], 16, CPU)
    inputs = {k: v.view(2, 2, -1) for k, v in enc.items()}
    targets = torch.eye(2).expand(2, 2, 2)
    cfg = EvalConfig(archs=("tiny-bert",), steps=6, lr=1e-2, weight_decay=0.1, progress=False, precision="fp32")
    runs = []
    for small in (True, False):
        if not small:
            monkeypatch.setattr(ensemble, "used_rows", contextlib.contextmanager(lambda ens, x, *a: (yield x)))
        ens = Ensemble(load_model("tiny-bert", "classifier", 2).eval(), [0, 1], CPU)
        ensemble.train_ensemble(ens, inputs, targets, [2, 2], [0, 1], cfg, CPU)
        runs.append({k: v.detach().clone() for k, v in ens.params.items()})
    key = ens.vocab_key
    assert key is not None and runs[0][key].shape == runs[1][key].shape  # the whole table is back
    used = torch.unique(enc["input_ids"])
    assert not torch.equal(runs[0][key][:, used], ens.base.get_input_embeddings().weight[used])  # trained
    for k in runs[1]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-6)


@pytest.mark.integration
def test_cpu_worker_processes_fit_as_the_process_itself(toy_task):
    """``workers`` > 1 trains the learners in spawned processes: the same fits (dropout seeded per job), so the same
    predictions as training them here; 0 chooses one per CPU for long fits only."""
    from dilm.archs.base import EvalContext
    from dilm.archs.finetune import MIN_POOL_STEPS, cpu_workers, score

    sets = [SynSet.from_examples(toy_task.train[i:i + 20], toy_task.label_names) for i in (0, 20)]
    preds = {}
    for workers in (1, 2):
        cfg = EvalConfig(archs=("tiny-bert",), seeds=1, steps=8, lr=1e-3, progress=False, precision="fp32",
                         workers=workers)
        preds[workers] = [p for p, _ in score(EvalContext(toy_task, cfg), "tiny-bert", sets)]
    assert len(preds[2]) == 2
    for a, b in zip(preds[1], preds[2]):
        assert (a == b).mean() >= 0.95  # fp32 sums in another thread count: a rare tie may flip
    auto = EvalConfig(archs=("tiny-bert",), progress=False)
    assert cpu_workers(auto, CPU, 1) == 1 and cpu_workers(auto, torch.device("cuda"), 8) == 1
    assert cpu_workers(EvalConfig(archs=("tiny-bert",), steps=MIN_POOL_STEPS - 1), CPU, 8) == 1



PARENT = """
import concurrent.futures, multiprocessing, os, time
from dilm.archs.finetune import exit_with_parent

if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=exit_with_parent, initargs=(0.1,))
    print(pool.submit(os.getpid).result(), flush=True)
    pool.submit(time.sleep, 600)  # the worker busy, as in the middle of a fine-tuning
    time.sleep(1)
    print("busy", flush=True)
    time.sleep(600)
"""


def test_a_busy_pool_worker_ends_with_its_killed_parent(tmp_path):
    """The CPU fine-tuning pool's workers (and cpu_quality's) watch their parent: SIGKILL the process that started
    them, mid-job, and the worker ends within seconds instead of finishing its job on a CPU nobody waits on."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "busy" and psutil.pid_exists(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the worker outlived its parent by 30 s"
            time.sleep(0.1)
    finally:
        parent.kill()
        if worker is not None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(worker).kill()
