"""Invariants of the gradient-matching math (tiny models, CPU)."""

import pytest
import torch

from dilm.generator import (
    GEN_LOSS_NORMS,
    Sample,
    TokenizedCorpus,
    generation_loss,
    pad_samples,
    prompt,
    sample_class,
)
from dilm.matching import class_gradient, match_loss, matched_params, sample_weights
from dilm.models import load_model, load_tokenizer
from dilm.sampling import SamplingSpec
from dilm.text import encode

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
    samples = sample_class(gen, tok, "positive", n, CPU, SamplingSpec(max_new_tokens=8, batch_size=n), seed=0)
    return samples, pad_samples(samples, tok.pad_token_id, CPU)


def test_matching_step_changes_generator_and_loss_decreases_on_fixed_pool():
    """In float64: the tiny models' head gradients are nearly collinear (a loss of ~1.6e-6), and float32's rounding
    of 1 - cos (~1e-7) is within a few percent of the decrease, so its order flips with the BLAS."""
    torch.manual_seed(0)
    gen = load_model("tiny-llama", "causal-lm").double()
    gtok = load_tokenizer("tiny-llama")
    learner, ltok = _learner(torch.float64)
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
    assert losses[-1] < 0.95 * losses[0]  # measured 0.83 of the start; float64 noise is ~1e-16 of it


def test_label_conditioned_sampling_is_parseable_for_each_class():
    gen = load_model("tiny-llama", "causal-lm")
    tok = load_tokenizer("tiny-llama")
    for label in ("negative", "positive"):
        samples = sample_class(gen, tok, label, 4, CPU, SamplingSpec(max_new_tokens=8, batch_size=4))
        assert len(samples) == 4 and all(s.text for s in samples)
        assert len({s.text for s in samples}) == 4  # distinct
        assert all(tok.decode(s.ids[: s.prompt_len]) == f"label: {label}\ntext:" for s in samples)


def test_generation_loss_masks_prompt_and_padding():
    gen = load_model("tiny-llama", "causal-lm").eval()
    tok = load_tokenizer("tiny-llama")
    samples, (ids, am, tm) = _generator_batch(gen, tok, 3)
    batched = generation_loss(gen, ids, am, tm, CPU, "text")  # per-text mean: independent of the batch
    for i, s in enumerate(samples):  # each row alone (no padding) gives the same loss
        one = generation_loss(gen, *pad_samples([s], tok.pad_token_id, CPU), CPU, "text")
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


def test_matching_backward_reaches_generator_only_and_real_gradient_keeps_no_graph():
    """the learner's non-head parameters are constants in the matching step (no ``.grad`` filled by the
    generator's backward pass), and g_real computed under no_grad carries no graph."""
    gen = load_model("tiny-llama", "causal-lm")
    gtok = load_tokenizer("tiny-llama")
    learner, ltok = _learner()
    assert all(p.requires_grad for p in learner.parameters())  # the inner loop still trains the whole learner
    params = matched_params(learner)
    samples, (ids, am, tm) = _generator_batch(gen, gtok, 4)
    with torch.no_grad():
        g_real = class_gradient(learner, params, _inputs(ltok, ["wonderful", "a delight"]), 1)
    assert all(v.grad_fn is None and not v.requires_grad for v in g_real.values())
    assert any(v.abs().sum() > 0 for v in g_real.values())  # no_grad did not switch the gradient off
    w = sample_weights(generation_loss(gen, ids, am, tm, CPU), 1.0)
    match_loss(g_real, class_gradient(learner, params, _inputs(ltok, [s.text for s in samples]), 1,
                                      weights=w)).backward()
    assert all(p.grad is None for p in learner.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def _texts_of_different_lengths(tok):
    """Samples of class ``positive`` whose texts (EOS included) are 2 to 7 tokens long, right-padded."""
    p = tok(prompt("positive"), add_special_tokens=False)["input_ids"]
    texts = [" fine", " a fine film", " a fine film with a good cast", " dull and long"]
    samples = [Sample(t.strip(), None, p + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                      len(p)) for t in texts]
    return samples, pad_samples(samples, tok.pad_token_id, CPU)


@pytest.mark.parametrize("norm", GEN_LOSS_NORMS)
def test_generation_loss_finite_difference_float64(norm):
    """Both normalisations: the analytic gradient of Σ c_i ℓ_i w.r.t. a generator tensor equals central
    differences in float64."""
    gen = load_model("tiny-llama", "causal-lm").double().eval()
    tok = load_tokenizer("tiny-llama")
    samples, (ids, am, tm) = _texts_of_different_lengths(tok)
    c = torch.tensor([0.3, -1.2, 0.7, 2.0], dtype=torch.float64)
    p = gen.model.norm.weight

    def objective():
        return (c * generation_loss(gen, ids, am, tm, CPU, norm)).sum()

    (analytic,) = torch.autograd.grad(objective(), p)
    numeric = torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        for i in range(8):
            p[i] += 1e-6
            up = objective()
            p[i] -= 2e-6
            down = objective()
            p[i] += 1e-6
            numeric[i] = (up - down) / 2e-6
    assert analytic[:8].abs().sum() > 0
    torch.testing.assert_close(analytic[:8], numeric, rtol=1e-5, atol=1e-8)


def test_generation_loss_batch_norm_is_sum_over_longest_text():
    """``batch`` (default): Σ NLL / the batch's longest text, one constant per batch (the reference's
    Σ NLL / (padded length − 1)); ``text``: the per-text mean. Same sums, different divisors."""
    gen = load_model("tiny-llama", "causal-lm").eval()
    tok = load_tokenizer("tiny-llama")
    samples, (ids, am, tm) = _texts_of_different_lengths(tok)
    lengths = torch.tensor([len(s.ids) - s.prompt_len for s in samples], dtype=torch.float32)
    assert len(set(lengths.tolist())) > 1
    by_batch = generation_loss(gen, ids, am, tm, CPU)  # the default
    by_text = generation_loss(gen, ids, am, tm, CPU, "text")
    torch.testing.assert_close(by_batch * lengths.max(), by_text * lengths)
    for i, s in enumerate(samples):  # the sum of one row's NLLs, from HF's own loss on the row alone
        row = torch.tensor([s.ids])
        labels = row.clone()
        labels[0, : s.prompt_len] = -100
        total = gen(input_ids=row, labels=labels).loss * (len(s.ids) - s.prompt_len)
        torch.testing.assert_close(by_batch[i] * lengths.max(), total, rtol=1e-4, atol=1e-4)
