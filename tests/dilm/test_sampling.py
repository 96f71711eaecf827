"""The batched sampling loop: nucleus semantics, equality with HF greedy decoding, seeds, class batching; its
precision and the CPU thread count; the packed LM loss."""

import dataclasses
import random

import pytest
import torch

import dilm.device
from dilm.device import cpu_threads, training_attention
from dilm.generator import (
    PACKED_TYPES,
    PAIR_MARK,
    TokenizedCorpus,
    lm_loss,
    make_sampler,
    packed,
    parse,
    prompt,
    sample_classes,
    to_sample,
)
from dilm.models import load_model, load_tokenizer
from dilm.sampling import Sampler, SamplingSpec, top_p_sample

CPU = torch.device("cpu")
GREEDY = SamplingSpec(top_p=0.0)  # top_p → 0: the most probable token, as HF's greedy decoding
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


@pytest.mark.parametrize("top_p", [0.3, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shortlisted_top_p_draws_what_the_full_sort_draws(top_p, temperature):
    """The topk shortlist: rows whose nucleus fits in it (peaked rows), rows whose nucleus needs the 8x larger
    second shortlist and rows whose nucleus needs the full sort (flat rows, top_p 1) draw the full sort's tokens
    from the same seed; the caller's logits are left as they were."""
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(40, 500, generator=g) * 6
    middle = torch.randn(40, 500, generator=g) * 2
    flat = torch.randn(24, 500, generator=g) * 0.1
    logits = torch.cat([peaked, middle, flat])
    kept = logits.clone()
    for seed in range(5):
        full = top_p_sample(logits, top_p, temperature, torch.Generator().manual_seed(seed))
        short = top_p_sample(logits, top_p, temperature, torch.Generator().manual_seed(seed), shortlist=16)
        assert torch.equal(full, short)
    assert torch.equal(logits, kept)
    if (top_p, temperature) == (0.9, 1.0):  # not vacuous: each of the three paths draws some rows
        nucleus = (torch.softmax(logits, -1).sort(-1, descending=True).values.cumsum(-1) < top_p).sum(-1) + 1
        assert (nucleus <= 16).any() and ((nucleus > 16) & (nucleus <= 128)).any() and (nucleus > 128).any()


@pytest.mark.parametrize("static", [False, True])
def test_greedy_batch_of_mixed_prompts_equals_hf_generate(lm, static):
    model, tok = lm
    prompts = prompts_of(tok)
    assert len({len(p) for p in prompts}) > 1  # the batch really is left-padded
    spec = dataclasses.replace(GREEDY, max_new_tokens=10, batch_size=4, mode="static" if static else "dynamic")
    sampler = Sampler(model, CPU, spec, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert sampler.sample(prompts) == hf_greedy(model, tok, prompts, 10)
    # a second batch reuses the (static) cache and still agrees; two chunks of batch_size 2 (a call's own spec)
    assert sampler.sample(prompts[::-1], spec=dataclasses.replace(spec, batch_size=2)) == \
        hf_greedy(model, tok, prompts[::-1], 10)
    # rows sharing a prompt (one prefill for them with the dynamic cache)
    shared = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[0]]
    assert sampler.sample(shared, spec=dataclasses.replace(spec, batch_size=8)) == hf_greedy(model, tok, shared, 10)
    with pytest.raises(ValueError, match="mode and precision are fixed"):
        sampler.sample(shared, spec=dataclasses.replace(spec, precision="bf16"))


def test_finished_rows_leave_the_batch_without_changing_the_others(lm):
    """Dynamic cache: rows that sampled EOS are dropped from the batch (cache rows too); greedy decoding of the
    others is what the static loop (which keeps every row) gives. The EOS is a token some rows reach early."""
    model, tok = lm
    prompts = prompts_of(tok) * 2
    spec = dataclasses.replace(GREEDY, max_new_tokens=10, batch_size=8)
    free = Sampler(model, CPU, spec, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id).sample(prompts)
    eos = free[0][2]  # row 0 ends at its third token
    dynamic = Sampler(model, CPU, spec, eos_id=eos, pad_id=tok.pad_token_id).sample(prompts)
    static = dataclasses.replace(spec, mode="static")
    assert dynamic == Sampler(model, CPU, static, eos_id=eos, pad_id=tok.pad_token_id).sample(prompts)
    lengths = {len(r) for r in dynamic}
    assert len(lengths) > 1 and min(lengths) < 10  # not vacuous: rows did finish at different steps


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(lm):
    model, tok = lm
    prompts = prompts_of(tok)
    sampler = Sampler(model, CPU, dataclasses.replace(GREEDY, max_new_tokens=8, batch_size=4, mode="compiled"),
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, prompt_width=12)
    assert sampler.sample(prompts) == hf_greedy(model, tok, prompts, 8)
    assert sampler.sample(prompts[:2]) == hf_greedy(model, tok, prompts[:2], 8)


def test_seeded_sampling_is_reproducible_and_rows_stop_at_eos(lm):
    model, tok = lm
    sampler = Sampler(model, CPU, SamplingSpec(max_new_tokens=6, batch_size=8), eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id)
    prompts = prompts_of(tok) * 4
    a, b = sampler.sample(prompts, seed=3), sampler.sample(prompts, seed=3)
    assert a == b and a != sampler.sample(prompts, seed=4)
    for row in a:
        assert 1 <= len(row) <= 6 and tok.eos_token_id not in row[:-1]


def test_unfinished_rows_are_kept_unless_dropped():
    """a row that hit the token limit is kept by default (the reference keeps it), EOS appended for the
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
    """"repair:" is not the marker; the first two parts of an exact split are kept."""
    assert parse(" The repair: was costly", is_pair=True) is None
    assert parse(" The repair: was costly\npair: It cost a lot", is_pair=True) == ("The repair: was costly",
                                                                                  "It cost a lot")
    assert parse(" A\npair: B\npair: C", is_pair=True) == ("A", "B")
    assert parse(" A\npair: B\nlabel: yes\ntext: C", is_pair=True) == ("A", "B")
    assert parse(" A sentence.\nlabel: no\ntext: another", is_pair=False) == ("A sentence.", None)
    assert parse(" \npair: B", is_pair=True) is None


def test_sample_ids_are_trimmed_to_the_parsed_text():
    """the tokens the parser cut off (a second example) are not in the sample's ids, so the generation
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
    sampler = make_sampler(model, tok, CPU, SamplingSpec(max_new_tokens=6, batch_size=16, is_pair=True), LABELS[:2])
    out = sample_classes(sampler, tok, LABELS[:2], [4, 4], seed=0)
    assert [len(o) for o in out] == [4, 4]
    for samples in out:
        for s in samples:
            assert s.text and s.text_pair and PAIR_MARK in tok.decode(s.ids[s.prompt_len:])


def test_sample_classes_shares_batches_and_meets_counts(lm):
    model, tok = lm
    sampler = make_sampler(model, tok, CPU, SamplingSpec(max_new_tokens=6, batch_size=16), LABELS)
    out = sample_classes(sampler, tok, LABELS, [5, 0, 3], seed=0)
    assert [len(o) for o in out] == [5, 0, 3]
    for samples, name in zip(out, LABELS):
        assert len({s.text for s in samples}) == len(samples)  # distinct within a class
        for s in samples:
            assert tok.decode(s.ids[: s.prompt_len]) == prompt(name) and s.ids[-1] == tok.eos_token_id


def test_bf16_copy_keeps_buffers_and_ties_and_follows_sync(lm):
    """The bf16 inference copy: parameters bf16, buffers untouched (rotary inv_freq), tied weights still tied;
    ``sync`` carries weight updates into it in place (a compiled step keeps its addresses)."""
    model, tok = lm
    sampler = Sampler(model, CPU, dataclasses.replace(GREEDY, max_new_tokens=6, batch_size=4, precision="bf16"),
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    copy = sampler.model
    assert copy is not model and all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert {n: b.dtype for n, b in copy.named_buffers()} == {n: b.dtype for n, b in model.named_buffers()}
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tie kept (tiny-llama ties them)
    addresses = [p.data_ptr() for p in copy.parameters()]
    before = sampler.sample(prompts_of(tok))
    saved = perturb(model)
    try:
        sampler.sync()
        assert [p.data_ptr() for p in copy.parameters()] == addresses
        assert all(torch.equal(d, s.to(torch.bfloat16)) for d, s in zip(copy.parameters(), model.parameters()))
        assert sampler.sample(prompts_of(tok)) != before
    finally:
        model.load_state_dict(saved)  # the fixture is shared


def test_bf16_sampler_returns_valid_samples(lm):
    """precision=bf16 on the CPU (emulated where the CPU has no native bf16): a bf16 copy that samples
    parseable texts of each class, as many as asked."""
    model, tok = lm
    sampler = make_sampler(model, tok, CPU, SamplingSpec(max_new_tokens=6, batch_size=16, precision="bf16"), LABELS)
    assert sampler.model is not model and all(p.dtype == torch.bfloat16 for p in sampler.model.parameters())
    out = sample_classes(sampler, tok, LABELS, [3, 2, 3], seed=0)
    assert [len(o) for o in out] == [3, 2, 3]
    for samples, name in zip(out, LABELS):
        for s in samples:
            assert s.text and tok.decode(s.ids[: s.prompt_len]) == prompt(name) and s.ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(lm, monkeypatch, native):
    model, tok = lm
    monkeypatch.setattr(dilm.device, "cpu_has_bf16", lambda: native)
    spec = SamplingSpec(max_new_tokens=4, batch_size=4)
    sampler = make_sampler(model, tok, CPU, spec, LABELS)
    assert (sampler.model is not model) == native
    assert next(sampler.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert make_sampler(model, tok, CPU, dataclasses.replace(spec, precision="fp32")).model is model
    assert len(sampler.sample(prompts_of(tok), seed=0)) == len(LABELS)


@pytest.mark.parametrize("cpus, omp, limit, expected", [
    ({0, 1, 2, 3}, None, None, 4),
    ({0, 1, 2, 3}, "2", None, 2),  # Ray's OMP_NUM_THREADS = the task's num_cpus
    ({0, 1}, "8", None, 2),  # never more than the CPUs the process may run on
    ({0, 1, 2, 3}, None, 1.5, 1),  # floor of a fractional CPU share
    ({0, 1, 2, 3}, "3", 0.5, 1),  # at least one
    ({5}, "", None, 1),
    ({0, 1, 2}, "x", 2, 2),  # an unreadable OMP_NUM_THREADS is ignored
])
def test_cpu_threads_never_exceed_affinity_omp_or_limit(monkeypatch, cpus, omp, limit, expected):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: cpus)
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert cpu_threads(limit) == expected


def tiny_causal_lm(kind: str, vocab: int):
    """A random 2-layer causal LM of each packed model type (eval: no dropout), float64."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=vocab)
    cfg, cls = {"gpt2": (GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                    bos_token_id=0, eos_token_id=0), GPT2LMHeadModel),
                "llama": (LlamaConfig(**small), LlamaForCausalLM), "qwen2": (Qwen2Config(**small), Qwen2ForCausalLM),
                "mistral": (MistralConfig(**small), MistralForCausalLM)}[kind]
    return cls(cfg).double().eval()


@pytest.mark.parametrize("kind", sorted(PACKED_TYPES))
def test_packed_lm_loss_and_gradient_equal_the_padded_ones(kind):
    """Packing changes the work, not the loss: each sequence attends to itself only (position_ids restart), the
    same tokens are scored; checked for every model type that lm_loss packs."""
    model = tiny_causal_lm(kind, 97)
    rng = random.Random(0)
    corpus = TokenizedCorpus([[rng.randrange(1, 97) for _ in range(rng.randrange(1, 15))] for _ in range(40)], 0)
    for _ in range(3):
        batch = corpus.batch(8, rng, CPU)
        rows = packed(batch)
        assert rows["input_ids"].shape[0] < 8 and rows["input_ids"].shape[1] == batch["input_ids"].shape[1]
        assert (rows["labels"] != -100).sum() == (batch["labels"][:, 1:] != -100).sum()
        ref = model(**batch, use_cache=False).loss
        g_ref = torch.autograd.grad(ref, list(model.parameters()))
        got = lm_loss(model, batch, CPU)
        g_got = torch.autograd.grad(got, list(model.parameters()))
        assert got.item() == pytest.approx(ref.item(), abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ref, g_got))


@pytest.mark.parametrize("kind", sorted(PACKED_TYPES))
def test_training_attention_is_eager_on_a_cpu_for_short_sequences_with_the_same_loss(kind, monkeypatch):
    """The LM stage's attention kernel (training_attention): eager on a CPU up to EAGER_UP_TO tokens, with the
    packed loss and gradients of the padded batch under the model's own kernel; the model's own kernel again on
    leaving; unchanged for longer sequences and on the GPU's code paths."""
    model = tiny_causal_lm(kind, 97)
    own = model.config._attn_implementation
    assert own != "eager"
    rng = random.Random(0)
    corpus = TokenizedCorpus([[rng.randrange(1, 97) for _ in range(rng.randrange(1, 15))] for _ in range(40)], 0)
    batch = corpus.batch(8, rng, CPU)
    ref = model(**batch, use_cache=False).loss
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    with training_attention(model, CPU, 14):
        assert model.config._attn_implementation == "eager"
        got = lm_loss(model, batch, CPU)
        g_got = torch.autograd.grad(got, list(model.parameters()))
    assert model.config._attn_implementation == own
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ref, g_got))
    with training_attention(model, CPU, dilm.device.EAGER_UP_TO + 1):
        assert model.config._attn_implementation == own
    monkeypatch.setenv(dilm.device.GPU_PATHS_ENV, "1")
    with training_attention(model, CPU, 14):
        assert model.config._attn_implementation == own


def test_lm_loss_packs_the_registry_generator(lm):
    """tiny-llama (and so smollm2-135m, a Llama) is of a packed type: lm_loss runs on the packed batch."""
    model, tok = lm
    assert model.config.model_type in PACKED_TYPES
    rng = random.Random(1)
    corpus = TokenizedCorpus(tok([prompt(n) + " a film" for n in LABELS] * 3, add_special_tokens=False)["input_ids"],
                             tok.pad_token_id)
    batch = corpus.batch(6, rng, CPU)
    with torch.no_grad():
        assert lm_loss(model, batch, CPU).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)


def test_lm_loss_in_bf16_autocast_is_the_fp32_loss_to_bf16_precision(lm):
    """The LM stage's ``lm_precision``: bf16 autocast computes in bf16 (the loss moves), to bf16's precision, and
    its gradients reach the fp32 master weights."""
    model, tok = lm
    corpus = TokenizedCorpus(tok([prompt(n) + " a fine film" for n in LABELS] * 4, add_special_tokens=False)[
        "input_ids"], tok.pad_token_id)
    batch = corpus.batch(8, random.Random(2), CPU)
    fp32, bf16 = lm_loss(model, batch, CPU, "fp32"), lm_loss(model, batch, CPU, "bf16")
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.item() != bf16.item()
    assert bf16.item() == pytest.approx(fp32.item(), rel=2e-2)
    bf16.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


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
        sampler = make_sampler(model, tok, cuda, dataclasses.replace(GREEDY, max_new_tokens=8, batch_size=4,
                                                                     mode=mode), LABELS)
        assert next(sampler.model.parameters()).dtype == torch.bfloat16
        before = sampler.sample(prompts)
        saved = perturb(model)
        sampler.sync()
        assert all(torch.equal(d, s.to(torch.bfloat16)) for d, s in zip(sampler.model.parameters(),
                                                                         model.parameters()))
        assert sampler.sample(prompts) != before
    finally:
        if saved is not None:
            model.load_state_dict(saved)
        model.to(CPU)
