import math

import numpy as np
import pytest
import torch
from torch.func import grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilm import DilmError
from dilm.archs.finetune import finetune_ensemble
from dilm.archs.tfidf import tfidf_logreg
from dilm.evaluate import Evaluator
from dilm.models import load_model, load_tokenizer
from dilm.protocol import EvalConfig
from dilm.softlabel import SoftLabelConfig, hard_label_ceiling, learn_soft_labels, select_fewer_than_classes
from dilm.synset import SynSet, read_set, write_set
from dilm.tasks import Example, TaskData
from dilm.text import encode
from dilm.unroll import (
    FullProxy,
    HeadProxy,
    UnrollConfig,
    build_proxy,
    functional_inner_grad,
    mean_unrolled_loss,
    soft_cross_entropy,
    syn_inputs,
)

TINY = UnrollConfig(learner="tiny-bert", steps=10, learners=2, real_per_class=60, real_batch=64, max_length=32)


def hard_set(task: TaskData, per_class: int, flip: int = 0) -> SynSet:
    """The first ``per_class`` examples of each class; the first ``flip`` of them get the other label (2 classes)."""
    picked = [ex for g in task.by_class() for ex in g[:per_class]]
    picked = [Example(e.text, 1 - e.label) if i < flip else e for i, e in enumerate(picked)]
    return SynSet.from_examples(picked, task.label_names)


def test_soft_labels_are_distributions(toy_task, tmp_path):
    hard = hard_set(toy_task, 3)
    out = learn_soft_labels(hard, toy_task, SoftLabelConfig(steps=5, unroll=TINY), "cpu")
    soft = np.array([e.soft_label for e in out.examples])
    assert soft.shape == (6, 2)
    assert (soft >= 0).all() and np.allclose(soft.sum(1), 1.0)
    assert [e.text for e in out.examples] == [e.text for e in hard.examples]
    assert [e.label for e in out.examples] == list(soft.argmax(1))
    assert out.meta["soft_label"]["learner"] == "tiny-bert" and out.meta["soft_label"]["learned_lr"] > 0
    back = read_set(write_set(tmp_path / "soft.jsonl", out), toy_task.label_names)  # validates the distributions
    assert np.allclose([e.soft_label for e in back.examples], soft, atol=1e-5)


def test_zero_steps_evaluates_exactly_as_the_hard_twin(toy_task):
    hard = hard_set(toy_task, 3)
    soft = learn_soft_labels(hard, toy_task, SoftLabelConfig(steps=0, unroll=TINY), "cpu")
    assert all(e.soft_label is not None and max(e.soft_label) == 1.0 for e in soft.examples)
    cfg = EvalConfig(archs=("tiny-bert", "tfidf-logreg"), seeds=1, steps=5, test_limit=40, device="cpu",
                     progress=False)
    test = toy_task.test[:40]
    p_hard, p_soft = finetune_ensemble("tiny-bert", [(hard, 0), (soft, 0)], test, cfg, torch.device("cpu"))
    assert np.array_equal(p_hard, p_soft)  # one ensemble: same head init, same batches, same targets
    assert np.array_equal(tfidf_logreg(hard, 0, test), tfidf_logreg(soft, 0, test))
    scores = Evaluator(toy_task, cfg).evaluate([hard, soft]).by_arch
    for arch in cfg.archs:
        assert scores[arch].accuracies[0] == scores[arch].accuracies[1]


def test_head_inner_gradient_is_the_autograd_gradient():
    torch.manual_seed(0)
    params = {"weight": torch.randn(3, 4, 5, dtype=torch.float64), "bias": torch.randn(3, 4, dtype=torch.float64)}
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.softmax(torch.randn(6, 4, dtype=torch.float64), -1)
    closed = HeadProxy.inner_grad(params, x, y)
    auto = functional_inner_grad(HeadProxy.forward)(params, x, y)  # the mean over 3 heads: 1/3 of each head's
    for k in params:
        torch.testing.assert_close(closed[k], 3 * auto[k])
    hard = torch.nn.functional.one_hot(torch.tensor([0, 2, 1, 3, 3, 0]), 4).double()  # soft CE of one-hots = CE
    logits = HeadProxy.forward(params, x)[0]
    torch.testing.assert_close(soft_cross_entropy(logits, hard), torch.nn.functional.cross_entropy(logits, hard))


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "constant"), ("adam", "constant"), ("adam", "protocol")])
def test_unrolled_gradient_matches_finite_differences(optimizer, schedule):
    """d outer loss / d (label logits, log lr, log weights: targets w·softmax(z)), through 4 unrolled steps of 2
    linear heads (constant step or the protocol's warm-up/decay), in float64."""
    torch.manual_seed(0)
    f64 = torch.float64
    n, h, c = 5, 6, 3
    proxy = HeadProxy(torch.randn(40, h, dtype=f64), torch.randint(0, c, (40,)), c)
    gen = torch.Generator().manual_seed(0)
    params0 = proxy.init_params(gen, 2)
    real, real_y = proxy.real_batch(gen, 16)
    syn = proxy.standardise(torch.randn(n, h, dtype=f64))
    ucfg = UnrollConfig(learner="tiny-bert", steps=4, optimizer=optimizer, schedule=schedule)
    log_w = torch.randn(n, dtype=f64) * 0.3

    def loss(z, log_lr, log_w=log_w):
        return mean_unrolled_loss(proxy, params0, syn, torch.softmax(z, -1) * log_w.exp()[:, None], log_lr.exp(),
                                  real, real_y, ucfg, None)

    z, log_lr = torch.randn(n, c, dtype=f64), torch.tensor(math.log(ucfg.lr), dtype=f64)
    g_z, g_lr, g_w = grad(loss, argnums=(0, 1, 2))(z, log_lr, log_w)
    d = torch.randn(n, dtype=f64)
    fd_w = (loss(z, log_lr, log_w + 1e-6 * d) - loss(z, log_lr, log_w - 1e-6 * d)) / 2e-6
    assert g_w.abs().max() > 1e-6
    torch.testing.assert_close((g_w * d).sum(), fd_w, rtol=1e-4, atol=1e-11)
    eps = 1e-6
    fd = torch.zeros_like(z)
    for i in range(n):
        for j in range(c):
            e = torch.zeros_like(z)
            e[i, j] = eps
            fd[i, j] = (loss(z + e, log_lr) - loss(z - e, log_lr)) / (2 * eps)
    fd_lr = (loss(z, log_lr + eps) - loss(z, log_lr - eps)) / (2 * eps)
    assert g_z.abs().max() > 1e-4  # the check is not vacuous
    torch.testing.assert_close(g_z, fd, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(g_lr, fd_lr, rtol=1e-5, atol=1e-8)


def test_full_model_unroll_gradient_matches_finite_differences(toy_task):
    """The same through 2 Adam steps of the whole tiny BERT (functional_call), along one random direction."""
    torch.manual_seed(0)
    model = load_model("tiny-bert", "classifier", 2).double()
    tok = load_tokenizer("tiny-bert")
    real_ex, syn_ex = toy_task.train[:16], toy_task.train[16:20]
    real = encode(tok, [e.text for e in real_ex], 32, "cpu")
    proxy = FullProxy(model, real, torch.tensor([e.label for e in real_ex]))
    syn = encode(tok, [e.text for e in syn_ex], 32, "cpu")
    params0 = proxy.init_params(torch.Generator().manual_seed(0), 1)
    ucfg = UnrollConfig(learner="tiny-bert", mode="full", steps=2, optimizer="adam", lr=0.01)

    def loss(z):
        return mean_unrolled_loss(proxy, params0, syn, torch.softmax(z, -1), ucfg.lr, proxy.real, proxy.real_labels,
                                  ucfg, None)

    z, d = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):
        g = grad(loss)(z)
        eps = 1e-5
        fd = (loss(z + eps * d) - loss(z - eps * d)) / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-4, atol=1e-9)


def test_learned_soft_labels_reduce_the_outer_loss_and_repair_flipped_labels(toy_task):
    """Two of eight labels are wrong; learning moves them towards their true class and lowers the outer loss
    (measured on fixed learners and the whole real pool, not on the training batches)."""
    hard = hard_set(toy_task, 4, flip=2)  # examples 0 and 1 (true class 0) are labelled 1
    ucfg = UnrollConfig(learner="tiny-bert", steps=10, learners=2, real_per_class=60, real_batch=64, max_length=32)
    cfg = SoftLabelConfig(steps=30, lr=0.1, unroll=ucfg)
    cpu = torch.device("cpu")
    soft = learn_soft_labels(hard, toy_task, cfg, cpu)

    body = load_model("tiny-bert", "base")
    proxy = build_proxy(ucfg, toy_task, cpu, cfg.seed, body)
    syn = syn_inputs(proxy, [e.text for e in hard.examples], ucfg, cpu, body)
    params0 = proxy.init_params(torch.Generator().manual_seed(123), 8)

    def outer(targets):
        with torch.no_grad():
            return float(mean_unrolled_loss(proxy, params0, syn, targets, ucfg.lr, proxy.real, proxy.real_labels,
                                            ucfg, None))

    before = outer(torch.tensor([list(e.target(2)) for e in hard.examples], dtype=torch.float32))
    after = outer(torch.tensor([list(e.soft_label) for e in soft.examples], dtype=torch.float32))
    assert after < before
    assert all(soft.examples[i].soft_label[0] > 0.05 for i in (0, 1))  # from ~0.007 at the start
    m = soft.meta["soft_label"]
    assert m["outer_loss_last"] < m["outer_loss_first"]


def test_fewer_examples_than_classes(topic_task):
    task = topic_task
    picked = select_fewer_than_classes(task, 2, learner="tiny-bert", candidates_per_class=30, device="cpu")
    assert len(picked) == 2 and len({e.text for e in picked.examples}) == 2
    train_texts = {e.text for e in task.train}
    assert all(e.text in train_texts for e in picked.examples)
    soft = learn_soft_labels(picked, task, SoftLabelConfig(steps=5, unroll=TINY), "cpu")
    assert all(len(e.soft_label) == 4 and abs(sum(e.soft_label) - 1) < 1e-9 for e in soft.examples)
    assert hard_label_ceiling(task, 2) == pytest.approx(50.0)
    assert hard_label_ceiling(task, 3) == pytest.approx(75.0)
    with pytest.raises(DilmError, match="--total must be >= 1"):
        select_fewer_than_classes(task, 0, learner="tiny-bert")


def test_configs_are_validated():
    with pytest.raises(DilmError, match="unknown unroll mode"):
        UnrollConfig(mode="both")
    with pytest.raises(DilmError, match="unroll optimizer"):
        UnrollConfig(optimizer="lbfgs")
    with pytest.raises(DilmError, match="steps must be >= 0"):
        SoftLabelConfig(steps=-1)
    assert UnrollConfig(mode="full", optimizer="adam").lr == 1e-3  # the mode's default step size


def test_label_names_must_match(toy_task):
    other = SynSet.from_examples(toy_task.train[:2], ("bad", "good"))
    with pytest.raises(DilmError, match="do not match task toy"):
        learn_soft_labels(other, toy_task, SoftLabelConfig(steps=1, unroll=TINY), "cpu")


def test_cli_softlabel(toy_task, tmp_path, capsys, task_file_args, run_cli):
    task_args = task_file_args
    src = write_set(tmp_path / "hard.jsonl", hard_set(toy_task, 2))
    small = ["--learner", "tiny-bert", "--steps", "3", "--unroll", "3", "--learners", "2", "--real-per-class", "40",
             "--device", "cpu"]
    assert run_cli(["softlabel", str(src), *task_args, *small, "-o", str(tmp_path / "soft.jsonl")]) == 0
    out = read_set(tmp_path / "soft.jsonl", toy_task.label_names)
    assert len(out) == 4 and all(e.soft_label is not None for e in out.examples)
    assert "soft_label" in out.meta and "outer loss" in capsys.readouterr().out
    assert run_cli(["softlabel", "--total", "1", *task_args, *small, "-o", str(tmp_path / "one.jsonl")]) == 0
    assert len(read_set(tmp_path / "one.jsonl", toy_task.label_names)) == 1
    with pytest.raises(DilmError, match="either a SET.jsonl or --total"):
        run_cli(["softlabel", *task_args, *small, "-o", str(tmp_path / "x.jsonl")])
