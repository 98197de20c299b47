"""Shared fixtures: a tiny Llama built from a config and an offline word-level tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["good", "bad", "the", "a", "answer", "question", "is", "what", "why", "yes", "no"] + [
    f"w{i}" for i in range(30)
]
# Tiny models are dominated by threading overhead; one thread is faster and avoids
# oversubscription when the machine's 2 cores are busy.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    return tokenizer


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """Pairs where the chosen answer says 'good' and the rejected one 'bad', of varied lengths."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS[2:], k=rng.randint(2, 6)))
        filler = lambda: " ".join(rng.choices(WORDS[11:], k=rng.randint(1, 5)))  # noqa: E731
        records.append(
            {
                "prompt": prompt,
                "chosen": f"good {filler()}",
                "rejected": f"bad {filler()}",
            }
        )
    return records


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(48)))
    return path
