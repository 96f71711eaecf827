import pytest
import torch

from dilm import DilmError
from dilm.device import pick_device
from dilm.models import head_param_names, is_causal, load_model, load_tokenizer, resolve_model


def test_missing_model_path():
    with pytest.raises(DilmError, match="model path '/no/such/model' does not exist"):
        resolve_model("/no/such/model")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_requested_without_gpu():
    with pytest.raises(DilmError, match="no CUDA GPU is available"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def test_tiny_models_are_reproducible_bodies_with_seeded_heads():
    a = load_model("tiny-bert", "classifier", 3, seed=1)
    b = load_model("tiny-bert", "classifier", 3, seed=2)
    assert torch.equal(a.bert.embeddings.word_embeddings.weight, b.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    lm = load_model("tiny-llama", "causal-lm")
    assert lm.config.vocab_size == len(load_tokenizer("tiny-llama"))


def test_packaged_models_resolve():
    assert resolve_model("minilm-l6").family == "encoder"
    assert resolve_model("smollm2-135m").family == "decoder"
    tok = load_tokenizer("minilm-l6")
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


# ---- one answer to "is this model causal?" and one list of head parameters


def _tiny_encoder(kind: str):
    from transformers import AlbertConfig, AutoModelForSequenceClassification, MPNetConfig, XLMRobertaConfig

    kw = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
              max_position_embeddings=64, pad_token_id=1, num_labels=2)
    cfg = {"xlm-roberta": lambda: XLMRobertaConfig(**kw), "mpnet": lambda: MPNetConfig(**kw),
           "albert": lambda: AlbertConfig(embedding_size=8, **kw)}[kind]()
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def _last_token_changed(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[..., -1] = 2 + (out[..., -1] + 1) % 90
    return out


@pytest.mark.parametrize("kind", ["xlm-roberta", "mpnet", "albert"])
def test_encoders_outside_any_list_get_no_causal_mask(kind):
    """The classifier reads position 0, which sees the last token only without a causal mask: changing the last
    token must move the logits, in the evaluation ensemble and in the soft-label proxy alike."""
    from dilm.ensemble import Ensemble
    from dilm.unroll import FullProxy

    model = _tiny_encoder(kind)
    assert not is_causal(model) and not is_causal(model.config)
    heads = head_param_names(model)
    assert heads and all(k.startswith("classifier.") for k in heads)
    assert set(heads) == {k for k, _ in model.named_parameters() if not k.startswith(model.base_model_prefix)}

    ids = torch.randint(3, 100, (3, 6))
    am = torch.ones_like(ids)
    ens = Ensemble(model, [0, 1], "cpu")
    with torch.no_grad():
        moved = (ens.logits(ids, am, batched=False) - ens.logits(_last_token_changed(ids), am, batched=False)).abs()
    assert moved.max() > 1e-7

    proxy = FullProxy(model, {"input_ids": ids, "attention_mask": am}, torch.zeros(3, dtype=torch.long))
    params = {**proxy.body, **proxy.head}
    with torch.no_grad():
        a = proxy.forward(params, {"input_ids": ids, "attention_mask": am})
        b = proxy.forward(params, {"input_ids": _last_token_changed(ids), "attention_mask": am})
    assert (a - b).abs().max() > 1e-7


def test_causal_answers_for_the_registry_models():
    assert not is_causal(load_model("tiny-bert", "classifier"))
    llama = load_model("tiny-llama", "classifier")
    assert is_causal(llama) and head_param_names(llama) == ["score.weight"]
    assert head_param_names(load_model("tiny-bert", "classifier")) == ["classifier.weight", "classifier.bias"]
    assert head_param_names(load_model("tiny-bert", "base")) == []  # a bare backbone has no head


def test_embed_keeps_fixed_texts_features_on_disk_and_batches_by_length(tmp_path, monkeypatch):
    """``embed`` returns features in the texts' order whatever order it computes them in (by length), and with
    ``cache=True`` writes a packaged model's features once under the cache dir and reads them after (another
    pooling, other texts or an unpackaged model get their own entry, or none)."""
    from dilm.features import embed, feature_cache_path

    monkeypatch.setenv("DILM_CACHE", str(tmp_path))
    texts = ["a long , winding and rather beautiful film about nothing much", "dull", "a fine cast", "ok", "why ?"]
    one_by_one = torch.cat([embed([t], "minilm-l6", "cpu") for t in texts])
    together = embed(texts, "minilm-l6", "cpu", batch_size=2)  # batches of similar length, then put back in order
    assert torch.allclose(together, one_by_one, atol=1e-5)
    path = feature_cache_path(texts, "minilm-l6", "cpu", "mean", 128)
    assert not path.exists()
    first = embed(texts, "minilm-l6", "cpu", cache=True)
    assert path.exists() and torch.equal(first, torch.load(path))

    class Refuses(torch.nn.Module):  # the cached call must not run a model at all
        def forward(self, **_):
            raise AssertionError("features were recomputed")

    assert torch.equal(embed(texts, "minilm-l6", "cpu", model=Refuses(), cache=True), first)
    assert feature_cache_path(texts, "minilm-l6", "cpu", "cls", 128) != path
    assert feature_cache_path(texts[:-1], "minilm-l6", "cpu", "mean", 128) != path
    assert feature_cache_path(texts, "tiny-bert", "cpu", "mean", 128) is None  # random weights: never cached
