import pytest
import torch

from dilm import DilmError
from dilm.models import load_model, load_tokenizer, pick_device, resolve_model


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
