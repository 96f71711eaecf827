"""Invariants of the gradient-matching math (tiny models, CPU)."""

import torch

from dilm.evaluate import encode
from dilm.generator import TokenizedCorpus, generation_loss, pad_samples, sample_class
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import load_model, load_tokenizer

CPU = torch.device("cpu")


def _learner(dtype=torch.float32):
    model = load_model("tiny-bert", "classifier", 2, seed=3).to(dtype).eval()
    tok = load_tokenizer("tiny-bert")
    return model, tok


def _inputs(tok, texts):
    return encode(tok, texts, 32, CPU)


def test_real_gradient_leaves_learner_unchanged():
    model, tok = _learner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = class_gradient(model, matched_params(model, all_layers=True), _inputs(tok, ["good film", "fine"]), 1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(g) == {k for k, _ in model.named_parameters()}
    assert any(v.abs().sum() > 0 for v in g.values())


def test_match_loss_finite_difference_wrt_weights_float64():
    model, tok = _learner(torch.float64)
    params = matched_params(model)
    real = _inputs(tok, ["a wonderful film", "great acting", "lovely"])
    syn = _inputs(tok, ["superb", "a bad movie", "charming and fine", "dull"])
    g_real = class_gradient(model, params, real, 1)
    gen_losses = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64, requires_grad=True)

    def loss_of(losses):
        w = sample_weights(losses, temperature=0.7)
        return match_loss(g_real, class_gradient(model, params, syn, 1, weights=w))

    loss = loss_of(gen_losses)
    (analytic,) = torch.autograd.grad(loss, gen_losses)
    eps = 1e-6
    numeric = torch.zeros(4, dtype=torch.float64)
    for i in range(4):
        d = torch.zeros(4, dtype=torch.float64)
        d[i] = eps
        numeric[i] = (loss_of(gen_losses.detach() + d) - loss_of(gen_losses.detach() - d)) / (2 * eps)
    assert analytic.abs().sum() > 0
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-9)


def _generator_batch(gen, tok, n=6):
    samples = sample_class(gen, tok, "positive", n, False, CPU, max_new_tokens=8, batch_size=n, seed=0,
                           allow_unfinished=True)
    return samples, pad_samples(samples, tok.pad_token_id, CPU)


def test_matching_step_changes_generator_and_loss_decreases_on_fixed_pool():
    torch.manual_seed(0)
    gen = load_model("tiny-llama", "causal-lm")
    gtok = load_tokenizer("tiny-llama")
    learner, ltok = _learner()
    params = matched_params(learner)
    samples, (ids, am, tm) = _generator_batch(gen, gtok, 8)
    syn = _inputs(ltok, [s.text for s in samples])
    g_real = class_gradient(learner, params, _inputs(ltok, ["wonderful", "great film", "a delight"]), 1)
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    before = [p.detach().clone() for p in gen.parameters()]
    gen.train()
    losses = []
    for _ in range(15):
        w = sample_weights(generation_loss(gen, ids, am, tm, CPU), temperature=1.0)
        loss = match_loss(g_real, class_gradient(learner, params, syn, 1, weights=w))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert any(not torch.equal(b, p) for b, p in zip(before, gen.parameters()))
    assert losses[-1] < losses[0]


def test_label_conditioned_sampling_is_parseable_for_each_class():
    gen = load_model("tiny-llama", "causal-lm")
    tok = load_tokenizer("tiny-llama")
    for label in ("negative", "positive"):
        samples = sample_class(gen, tok, label, 4, False, CPU, max_new_tokens=8, batch_size=4,
                               allow_unfinished=True)
        assert len(samples) == 4 and all(s.text for s in samples)
        assert len({s.text for s in samples}) == 4  # distinct
        assert all(tok.decode(s.ids[: s.prompt_len]) == f"label: {label}\ntext:" for s in samples)


def test_generation_loss_masks_prompt_and_padding():
    gen = load_model("tiny-llama", "causal-lm").eval()
    tok = load_tokenizer("tiny-llama")
    samples, (ids, am, tm) = _generator_batch(gen, tok, 3)
    batched = generation_loss(gen, ids, am, tm, CPU)
    for i, s in enumerate(samples):  # each row alone (no padding) gives the same loss
        one = generation_loss(gen, *pad_samples([s], tok.pad_token_id, CPU), CPU)
        torch.testing.assert_close(batched[i], one[0], rtol=1e-4, atol=1e-4)


def test_pair_task_rendering_round_trips():
    from dilm.generator import parse, render
    from dilm.tasks import Example

    tok = load_tokenizer("tiny-llama")
    text = render("yes", "The cat sat .", "A cat was sitting .", tok.eos_token)
    completion = text.split("text:", 1)[1].removesuffix(tok.eos_token)
    assert parse(completion, is_pair=True) == ("The cat sat .", "A cat was sitting .")
    assert parse(" only one sentence", is_pair=True) is None
    corpus = TokenizedCorpus.build(tok, [Example("a", 1, "b")], ("no", "yes"), 32)
    assert tok.decode(corpus.sequences[0]).startswith("label: yes\ntext: a\npair: b")
