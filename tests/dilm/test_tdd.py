
import pytest
import torch
from torch.func import grad
from torch.nn.attention import SDPBackend, sdpa_kernel

from dilm import DilmError
from dilm.evaluate import Evaluator
from dilm.features import embed
from dilm.models import load_model
from dilm.protocol import EvalConfig
from dilm.synset import read_set
from dilm.tdd import TDDConfig, distill_tdd, evaluate_tdd, load_tdd, pooled_features, save_tdd
from dilm.unroll import HeadProxy, UnrollConfig, mean_unrolled_loss

TINY = UnrollConfig(learner="tiny-bert", steps=3, learners=2, real_per_class=40, real_batch=32, max_length=16)
EVAL = EvalConfig(archs=("tiny-bert",), seeds=2, steps=4, test_limit=20, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny_tdd(toy_task):
    return distill_tdd(toy_task, TDDConfig(dpc=1, seq_len=8, steps=3, unroll=TINY), torch.device("cpu"))


def test_tdd_set_shapes_and_roundtrip(tiny_tdd, tmp_path):
    assert tiny_tdd.inputs_embeds.shape == (2, 8, 32) and tiny_tdd.soft_labels.shape == (2, 2)
    assert torch.allclose(tiny_tdd.soft_labels.sum(1), torch.ones(2))
    paths = save_tdd(tiny_tdd, tmp_path / "tdd")
    assert {p.name for p in paths.values()} == {"tdd.pt", "tdd.jsonl", "tdd.meta.json"}
    back = load_tdd(tmp_path / "tdd.pt")
    assert torch.equal(back.inputs_embeds, tiny_tdd.inputs_embeds) and back.learner == "tiny-bert"
    assert back.readings == tiny_tdd.readings and back.readings[0].startswith("[CLS]")


def test_tdd_refuses_another_architecture(tiny_tdd, toy_task, tmp_path):
    paths = save_tdd(tiny_tdd, tmp_path / "tdd")
    with pytest.raises(DilmError, match=r"TDD set .*tdd\.pt is evaluable only on tiny-bert") as err:
        evaluate_tdd(paths["pt"], toy_task, "minilm-l6", EVAL)
    assert "\n" not in str(err.value)
    readings = read_set(paths["jsonl"], toy_task.label_names)  # the readings carry tdd_learner in their meta
    with pytest.raises(DilmError, match="evaluable only on tiny-bert"):
        Evaluator(toy_task, EvalConfig(archs=("tfidf-logreg",), seeds=1, progress=False)).evaluate([readings])


def test_evaluate_tdd_trains_fresh_learners(tiny_tdd, toy_task):
    scores = evaluate_tdd(tiny_tdd, toy_task, "tiny-bert", EVAL).by_arch["tiny-bert"]
    assert len(scores.accuracies) == 2  # one learner per seed
    assert all(abs(a * 20 - round(a * 20)) < 1e-9 for a in scores.accuracies)  # k right out of the 20 test examples
    again = evaluate_tdd(tiny_tdd, toy_task, "tiny-bert", EVAL).by_arch["tiny-bert"]
    assert again.accuracies == scores.accuracies  # seeded: the same learners again


def test_tdd_embedding_gradient_matches_finite_differences(toy_task):
    """d outer loss / d inputs_embeds through the frozen tiny BERT and 3 unrolled head steps, float64."""
    torch.manual_seed(0)
    body = load_model("tiny-bert", "base").double().requires_grad_(False)
    real_ex = toy_task.train[:24]
    feats = embed([e.text for e in real_ex], "tiny-bert", torch.device("cpu"), model=body).double()
    proxy = HeadProxy(feats, torch.tensor([e.label for e in real_ex]), 2)
    params0 = proxy.init_params(torch.Generator().manual_seed(0), 2)
    ucfg = UnrollConfig(learner="tiny-bert", steps=3)
    mask = torch.tensor([[1] * 6 + [0, 0], [1] * 8])
    targets = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)

    def loss(e):
        syn = proxy.standardise(pooled_features(body, e, mask, "mean"))
        return mean_unrolled_loss(proxy, params0, syn, targets, ucfg.lr, proxy.real, proxy.real_labels, ucfg, None)

    e, d = torch.randn(2, 8, 32, dtype=torch.float64) * 0.02, torch.randn(2, 8, 32, dtype=torch.float64)
    with sdpa_kernel([SDPBackend.MATH]):
        g = grad(loss)(e)
        eps = 1e-6
        fd = (loss(e + eps * d) - loss(e - eps * d)) / (2 * eps)
    assert g[0, 6:].abs().max() == 0  # masked positions get no gradient
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-5, atol=1e-10)


def test_tdd_outer_steps_move_embeddings_and_labels(toy_task):
    # labels start inside the simplex (smoothed): from a one-hot corner they move only when the gradient points
    # away from it, which depends on the examples drawn
    cfg = TDDConfig(dpc=1, seq_len=8, steps=4, lr=0.5, label_lr=0.5, init_smoothing=0.2, unroll=TINY)
    start = distill_tdd(toy_task, TDDConfig(dpc=1, seq_len=8, steps=0, init_smoothing=0.2, unroll=TINY),
                        torch.device("cpu"))
    moved = distill_tdd(toy_task, cfg, torch.device("cpu"))
    assert not torch.allclose(start.inputs_embeds, moved.inputs_embeds)
    assert not torch.allclose(start.soft_labels, moved.soft_labels)


def test_tdd_needs_an_encoder_learner(toy_task):
    with pytest.raises(DilmError, match="TDD needs an encoder learner"):
        distill_tdd(toy_task, TDDConfig(unroll=UnrollConfig(learner="tiny-llama")), torch.device("cpu"))
    with pytest.raises(DilmError, match="unknown TDD init"):
        TDDConfig(init="zeros")


def test_cli_tdd(toy_task, tmp_path, capsys, task_file_args, run_cli):
    task_args = task_file_args
    common = [*task_args, "--device", "cpu", "--evaluate", "--eval-seeds", "1", "--eval-steps", "2",
              "--test-limit", "10"]
    assert run_cli(["tdd", *common, "--learner", "tiny-bert", "--dpc", "1", "--seq-len", "8", "--steps", "2",
                    "--unroll", "2", "--learners", "1", "--real-per-class", "20", "-o", str(tmp_path / "t")]) == 0
    assert "tiny-bert: accuracy" in capsys.readouterr().out
    with pytest.raises(DilmError, match="evaluable only on tiny-bert"):
        run_cli(["tdd", str(tmp_path / "t.pt"), *common, "--arch", "tiny-llama"])
