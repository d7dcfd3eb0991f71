import warnings

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_ext  # noqa: F401  (registers the families)
from peft_ext.data import Example, make_batches
from peft_ext.tiny import build_model, char_tokenizer, save_tiny

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.set_num_threads(2)

ARCHITECTURES = ["tiny-llama", "tiny-qwen2"]


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def examples():
    return [Example(f"{a}+{b}=", str(a + b)) for a in range(4) for b in range(4)]


@pytest.fixture(scope="session")
def batches(tokenizer, examples):
    return make_batches(tokenizer, examples, batch_size=8)


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """``{architecture: folder}`` of tiny models saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny(root / name, name) for name in ARCHITECTURES}


@pytest.fixture
def input_ids():
    return torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def load_base(saved_models, name="tiny-llama", quantization=None, dtype=torch.float32):
    """Load a saved tiny model, optionally through bitsandbytes ('4bit', 'nf4', 'fp4' or '8bit') on the CPU."""
    kwargs = {"dtype": dtype}
    if quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization is not None:
        quant_type = "fp4" if quantization == "fp4" else "nf4"
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32
        )
    if quantization is not None:
        kwargs["device_map"] = "cpu"
    return AutoModelForCausalLM.from_pretrained(saved_models[name], **kwargs).eval()


def fresh(name="tiny-llama", dtype=torch.float32):
    return build_model(name, seed=0, dtype=dtype)


class OneLinear(nn.Module):
    """A single linear layer that takes ``input_ids`` as float features (so calibrate can drive it)."""

    def __init__(self, d_in=16, d_out=12, weight=None):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        if weight is not None:
            self.lin.weight.data.copy_(weight)

    def forward(self, input_ids, attention_mask=None):
        return self.lin(input_ids)
