"""Shared fixtures: tiny random LLaMA models, a word-level tokenizer and the data mirror."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

# The tiny models' matrices are too small to gain from intra-op threads, and on a machine shared
# with other jobs the OpenMP barriers slow every op many times over. On a busy 2-core machine
# the unit suite took 27 s with 2 threads and 3 s with 1.
torch.set_num_threads(1)

VOCAB_SIZE = 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Decoder linear layers per LLaMA layer: q, k, v, o, gate, up, down.
LINEARS_PER_LAYER = 7


def tiny_llama_config(num_layers: int = 2) -> LlamaConfig:
    """Return a LLaMA config small enough to run a forward pass in milliseconds."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )


def build_tiny_llama(num_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """Build a randomly initialised tiny LLaMA in evaluation mode, the same for the same seed.

    The default initialiser (std 0.02) gives activations near zero, so every 2-D weight is
    redrawn with std 0.3, which makes quantization visibly change the logits.
    """
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_layers))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    """Two-layer tiny LLaMA, seed 0."""
    return build_tiny_llama(num_layers=2, seed=0)


@pytest.fixture
def tiny_model_3layers() -> LlamaForCausalLM:
    """Three-layer tiny LLaMA, seed 0."""
    return build_tiny_llama(num_layers=3, seed=0)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer offline in which the word ``w{i}`` has token id ``i``.

    Ids 0 to 3 are ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS) and ``<unk>``. Words are split on
    whitespace.
    """
    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
    for token_id in range(4, VOCAB_SIZE):
        vocab[f"w{token_id}"] = token_id
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


def mirror_dir() -> Path:
    """Return the data mirror folder: ``$SPIKELIB_DATA_DIR``, else ``shared/data`` beside the repository."""
    configured = os.environ.get("SPIKELIB_DATA_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The local WikiText-2 and C4 mirror. Tests that use it are skipped when it is missing."""
    folder = mirror_dir()
    if not (folder / "wikitext-2-raw-v1" / "test.txt").is_file():
        pytest.skip(f"data mirror not found at {folder}; set SPIKELIB_DATA_DIR to a folder with wikitext-2-raw-v1/test.txt")
    return folder
