"""The batched sampling loop: nucleus semantics, equality with HF greedy decoding, seeds, class batching."""

import pytest
import torch

from dilm.generator import PAIR_MARK, make_sampler, parse, prompt, sample_classes, to_sample
from dilm.models import load_model, load_tokenizer
from dilm.sampling import Sampler, top_p_sample

CPU = torch.device("cpu")
LABELS = ["negative", "positive", "a much longer label name"]


@pytest.fixture(scope="module")
def lm():
    """A tiny Llama with large random weights, so greedy decoding is not one repeated token."""
    tok = load_tokenizer("tiny-llama")
    model = load_model("tiny-llama", "causal-lm", device=CPU, seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), tok


def perturb(model) -> dict:
    """Add fixed noise to every matrix (a stand-in for a training step); returns the weights before."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.3)
    return saved


def prompts_of(tok):
    return [tok(prompt(n), add_special_tokens=False)["input_ids"] for n in LABELS]


def hf_greedy(model, tok, prompts, n):
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        row = g[0, len(p):].tolist()
        out.append(row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row)
    return out


def test_top_p_keeps_only_the_nucleus_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    picks = top_p_sample(logits, 0.7, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(picks, minlength=4).float() / len(picks)
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 already reach 0.7
    assert freq[0] == pytest.approx(0.5 / 0.8, abs=0.02)
    x = torch.randn(50, 9)
    assert torch.equal(top_p_sample(x, 0.0, 1.0, torch.Generator().manual_seed(1)), x.argmax(-1))


@pytest.mark.parametrize("static", [False, True])
def test_greedy_batch_of_mixed_prompts_equals_hf_generate(lm, static):
    model, tok = lm
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) > 1  # the batch really is left-padded
    sampler = Sampler(model, CPU, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=10,
                      batch_size=4, static=static)
    assert sampler.sample(prompts, top_p=0.0) == hf_greedy(model, tok, prompts, 10)
    # a second batch reuses the (static) cache and still agrees; two chunks of batch_size 2
    sampler.batch_size = 2
    assert sampler.sample(prompts[::-1], top_p=0.0) == hf_greedy(model, tok, prompts[::-1], 10)


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(lm):
    model, tok = lm
    prompts = prompts_of(tok)
    sampler = Sampler(model, CPU, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=8,
                      batch_size=4, prompt_width=12, compile=True)
    assert sampler.sample(prompts, top_p=0.0) == hf_greedy(model, tok, prompts, 8)
    assert sampler.sample(prompts[:2], top_p=0.0) == hf_greedy(model, tok, prompts[:2], 8)


def test_seeded_sampling_is_reproducible_and_rows_stop_at_eos(lm):
    model, tok = lm
    sampler = Sampler(model, CPU, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6,
                      batch_size=8)
    prompts = prompts_of(tok) * 4
    a, b = sampler.sample(prompts, seed=3), sampler.sample(prompts, seed=3)
    assert a == b and a != sampler.sample(prompts, seed=4)
    for row in a:
        assert 1 <= len(row) <= 6 and tok.eos_token_id not in row[:-1]


def test_unfinished_rows_are_kept_unless_dropped():
    """Item 1: a row that hit the token limit is kept by default (the reference keeps it), EOS appended for the
    loss; dropped only when asked."""
    tok = load_tokenizer("tiny-llama")
    p = tok(prompt("positive"), add_special_tokens=False)["input_ids"]
    words = tok(" a fine film", add_special_tokens=False)["input_ids"]
    s = to_sample(words, p, tok, False)
    assert s.text == "a fine film" and s.ids == p + words + [tok.eos_token_id] and s.prompt_len == len(p)
    assert to_sample(words, p, tok, False, allow_unfinished=False) is None
    done = to_sample(words + [tok.eos_token_id], p, tok, False, allow_unfinished=False)
    assert done.text == "a fine film"


def test_pair_parser_splits_on_the_exact_marker_only():
    """Item 9: "repair:" is not the marker; the first two parts of an exact split are kept."""
    assert parse(" The repair: was costly", is_pair=True) is None
    assert parse(" The repair: was costly\npair: It cost a lot", is_pair=True) == ("The repair: was costly",
                                                                                  "It cost a lot")
    assert parse(" A\npair: B\npair: C", is_pair=True) == ("A", "B")
    assert parse(" A\npair: B\nlabel: yes\ntext: C", is_pair=True) == ("A", "B")
    assert parse(" A sentence.\nlabel: no\ntext: another", is_pair=False) == ("A sentence.", None)
    assert parse(" \npair: B", is_pair=True) is None


def test_sample_ids_are_trimmed_to_the_parsed_text():
    """Item 9: the tokens the parser cut off (a second example) are not in the sample's ids, so the generation
    loss scores only what the learner sees."""
    tok = load_tokenizer("tiny-llama")
    p = tok(prompt("yes"), add_special_tokens=False)["input_ids"]
    row = tok(" A cat sat.\npair: A cat was sitting.\nlabel: no\ntext: Dogs bark.",
              add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    s = to_sample(row, p, tok, is_pair=True)
    assert (s.text, s.text_pair) == ("A cat sat.", "A cat was sitting.")
    assert tok.decode(s.ids) == prompt("yes") + " A cat sat.\npair: A cat was sitting." + tok.eos_token
    assert s.ids[-1] == tok.eos_token_id and len(s.ids) < len(p) + len(row)


def test_pair_samples_without_the_marker_are_continued_after_one(lm):
    """A (tiny, random) generator never writes the pair marker; every pair sample still parses into two texts,
    its ids holding the marker that was put after the first."""
    model, tok = lm
    sampler = make_sampler(model, tok, CPU, max_new_tokens=6, batch_size=16, label_names=LABELS[:2])
    out = sample_classes(sampler, tok, LABELS[:2], [4, 4], True, seed=0)
    assert [len(o) for o in out] == [4, 4]
    for samples in out:
        for s in samples:
            assert s.text and s.text_pair and PAIR_MARK in tok.decode(s.ids[s.prompt_len:])


def test_sample_classes_shares_batches_and_meets_counts(lm):
    model, tok = lm
    sampler = make_sampler(model, tok, CPU, max_new_tokens=6, batch_size=16, label_names=LABELS)
    out = sample_classes(sampler, tok, LABELS, [5, 0, 3], False, seed=0, allow_unfinished=True)
    assert [len(o) for o in out] == [5, 0, 3]
    for samples, name in zip(out, LABELS):
        assert len({s.text for s in samples}) == len(samples)  # distinct within a class
        for s in samples:
            assert tok.decode(s.ids[: s.prompt_len]) == prompt(name) and s.ids[-1] == tok.eos_token_id


def test_bf16_copy_keeps_buffers_and_ties_and_follows_sync(lm):
    """The bf16 inference copy: parameters bf16, buffers untouched (rotary inv_freq), tied weights still tied;
    ``sync`` carries weight updates into it in place (a compiled step keeps its addresses)."""
    model, tok = lm
    sampler = Sampler(model, CPU, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=6,
                      batch_size=4, bf16=True)
    copy = sampler.model
    assert copy is not model and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert {n: b.dtype for n, b in copy.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tie kept (tiny-llama ties them)
    addresses = [p.data_ptr() for p in copy.parameters()]
    before = sampler.sample(prompts_of(tok), top_p=0.0)
    saved = perturb(model)
    try:
        sampler.sync()
        assert [p.data_ptr() for p in copy.parameters()] == addresses
        assert all(torch.equal(d, s.to(torch.bfloat16)) for d, s in zip(copy.parameters(), model.parameters()))
        assert sampler.sample(prompts_of(tok), top_p=0.0) != before
    finally:
        model.load_state_dict(saved)  # the fixture is shared


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["dynamic", "compiled"])
def test_gpu_sampler_follows_the_trained_weights(lm, mode):
    """On CUDA: a bf16 copy by default, in every mode; after a weight update and ``sync`` it holds the new weights
    and (compiled: without a stale graph) samples differently."""
    model, tok = lm
    cuda = torch.device("cuda")
    model, saved = model.to(cuda), None
    try:
        prompts = prompts_of(tok)
        sampler = make_sampler(model, tok, cuda, max_new_tokens=8, batch_size=4, label_names=LABELS, mode=mode)
        assert next(sampler.model.parameters()).dtype == torch.bfloat16
        before = sampler.sample(prompts, top_p=0.0)
        saved = perturb(model)
        sampler.sync()
        assert all(torch.equal(d, s.to(torch.bfloat16)) for d, s in zip(sampler.model.parameters(),
                                                                         model.parameters()))
        assert sampler.sample(prompts, top_p=0.0) != before
    finally:
        if saved is not None:
            model.load_state_dict(saved)
        model.to(CPU)
