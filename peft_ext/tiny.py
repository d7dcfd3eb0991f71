"""Tiny models and a character tokenizer built from ``configs/``: no weights or data leave this machine.

Tests, the demo and the benchmarks build models here, save them with ``save_pretrained`` and load them back with
``from_pretrained``, so the real loading path (including bitsandbytes quantization) is exercised.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.printable[:95] + "\n"  # digits, letters, punctuation, space, newline


def config_path(name: str) -> Path:
    """``configs/<name>.json`` (or ``name`` itself when it is a path to a JSON file)."""
    path = Path(name) if name.endswith(".json") else CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []
        raise FileNotFoundError(f"no model config {path}; available in {CONFIG_DIR}: {available}")
    return path


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer (ids 0-3 special, then 96 characters) that prepends ``<s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.Fuse()  # characters join without separators
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def model_config(name: str = "tiny-llama", **overrides):
    """The ``transformers`` config of ``configs/<name>.json``, with ``overrides`` (e.g. a wider ``hidden_size``)."""
    return AutoConfig.for_model(**{**json.loads(config_path(name).read_text()), **overrides})


def build_model(name: str = "tiny-llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM from ``configs/<name>.json`` (deterministic for a given seed)."""
    config = model_config(name)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def save_tiny(directory: str | Path, name: str = "tiny-llama", seed: int = 0) -> Path:
    """Build ``name`` and save model and tokenizer to ``directory`` (a loadable ``from_pretrained`` folder)."""
    directory = Path(directory)
    build_model(name, seed).save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory
