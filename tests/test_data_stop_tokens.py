"""Completions end as the model generates them: one stop token (EOS or the chat template's
end-of-turn token), no whitespace after it, and no EOS appended after an end-of-turn token.

Regression: a conversational completion rendered by SmolLM2's template ("...<|im_end|>\\n") got its
EOS (<|im_end|> again) appended, so the model was trained to emit "<|im_end|>\\n<|im_end|>" and |y|
counted two extra tokens.
"""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer  # the shared word-level tokenizer: <pad> 0, <s> 1, </s> 2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from avgalign.data import (
    PreferenceExample,
    load_preferences,
    stop_token_ids,
    tokenize_pairs,
)

EOS = 2
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, with "\\n" a token of its own (as in real BPE vocabularies), and Gemma's turn
    markers as added special tokens."""
    words = ["<pad>", "<bos>", "<eos>", "<unk>", "\n", "user", "model", "good", "bad", "why"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}
    )
    tokenizer.chat_template = GEMMA_TEMPLATE
    return tokenizer


def conversation(answer: str, other: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": "why"}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": other}],
    }


def tokenize_records(tmp_path, records: list[dict], tokenizer, **kwargs):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_preferences(str(path), tokenizer=tokenizer).examples
    return examples, tokenize_pairs(examples, tokenizer, max_length=kwargs.pop("max_length", 64))


# ------------------------------------------------------------------------------ SmolLM2, for real


@pytest.fixture(scope="module")
def smollm2():
    from avgalign.config import ModelConfig
    from avgalign.models import load_tokenizer

    try:
        return load_tokenizer(ModelConfig(name="smollm2-135m"))
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"SmolLM2 tokenizer not available offline: {err}")


def test_smollm2_stop_tokens_are_its_end_of_turn(smollm2):
    im_end = smollm2.convert_tokens_to_ids("<|im_end|>")
    assert smollm2.eos_token_id == im_end  # SmolLM2's EOS is its end-of-turn token
    assert stop_token_ids(smollm2) == [im_end]


def test_smollm2_conversational_completion_ends_with_one_im_end(tmp_path, smollm2):
    im_end = smollm2.convert_tokens_to_ids("<|im_end|>")
    answer, other = "Because the sky scatters blue light.", "No idea."
    examples, (pairs, _) = tokenize_records(tmp_path, [conversation(answer, other)], smollm2)
    assert examples[0].chosen == answer + "<|im_end|>\n"  # as the template renders the turn
    content = smollm2(answer, add_special_tokens=False)["input_ids"]
    other_content = smollm2(other, add_special_tokens=False)["input_ids"]
    assert pairs[0].chosen_ids == [*content, im_end]
    assert pairs[0].rejected_ids == [*other_content, im_end]
    assert len(pairs[0].chosen_ids) == len(content) + 1  # |y|: the content and one stop token


def test_smollm2_raw_text_completion_still_gets_eos_appended(tmp_path, smollm2):
    chosen = "\n\nHuman: why?\n\nAssistant: Because.\n"  # ends with whitespace, no stop token
    record = {"chosen": chosen, "rejected": "\n\nHuman: why?\n\nAssistant: No."}
    examples, (pairs, _) = tokenize_records(tmp_path, [record], smollm2)
    assert examples[0].rendering == "raw"
    completion = smollm2(" Because.\n", add_special_tokens=False)["input_ids"]
    assert pairs[0].chosen_ids == [*completion, smollm2.eos_token_id]  # exactly as before


# ------------------------------------------------------------------------ templates written here


def test_gemma_style_end_of_turn_and_the_newline_after_it_are_handled(tmp_path):
    tokenizer = gemma_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    end_of_turn, newline = ids("<end_of_turn>"), ids("\n")
    assert stop_token_ids(tokenizer) == [EOS, end_of_turn]
    examples, (pairs, _) = tokenize_records(tmp_path, [conversation("good good", "bad")], tokenizer)
    assert examples[0].chosen == "good good<end_of_turn>\n"
    assert tokenizer(examples[0].chosen, add_special_tokens=False)["input_ids"] == [
        ids("good"),
        ids("good"),
        end_of_turn,
        newline,
    ]  # the newline is a real token, which generation (stopping at <end_of_turn>) never makes
    assert pairs[0].chosen_ids == [ids("good"), ids("good"), end_of_turn]
    assert pairs[0].rejected_ids == [ids("bad"), end_of_turn]
    assert pairs[0].prompt_ids == ids(
        [
            "<bos>",
            "<start_of_turn>",
            "user",
            "\n",
            "why",
            "<end_of_turn>",
            "\n",
            "<start_of_turn>",
            "model",
            "\n",
        ]
    )


def test_several_whitespace_tokens_after_the_stop_token_are_dropped():
    tokenizer = gemma_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    example = PreferenceExample("why", "good<end_of_turn>\n \n", "bad<eos>\n", "x:1", "raw")
    (pair,), _ = tokenize_pairs([example], tokenizer, max_length=16)
    assert pair.chosen_ids == [ids("good"), ids("<end_of_turn>")]
    assert pair.rejected_ids == [ids("bad"), EOS]  # EOS is a stop token too: not doubled


def test_whitespace_without_a_stop_token_before_it_is_kept_and_eos_appended():
    tokenizer = gemma_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    example = PreferenceExample("why", "good\n", "bad", "x:1")
    (pair,), _ = tokenize_pairs([example], tokenizer, max_length=16)
    assert pair.chosen_ids == [ids("good"), ids("\n"), EOS]
    assert pair.rejected_ids == [ids("bad"), EOS]


def test_a_cut_completion_loses_its_stop_token(tmp_path):
    tokenizer = gemma_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    # prompt 10 tokens; chosen 5 (four words and <end_of_turn>); max_length 12, prompt floor 6
    _, (pairs, report) = tokenize_records(
        tmp_path, [conversation("good bad good bad", "bad")], tokenizer, max_length=12
    )
    # the prompt is cut to max(12 - 5, 6) = 7 tokens, leaving 5: chosen fits exactly
    assert pairs[0].chosen_ids[-1] == ids("<end_of_turn>") and len(pairs[0].prompt_ids) == 7
    _, (pairs, report) = tokenize_records(
        tmp_path, [conversation("good bad good bad good bad", "bad")], tokenizer, max_length=12
    )
    # chosen needs 7; the prompt keeps its floor of 6, chosen is cut to 6 and loses its stop
    assert pairs[0].chosen_ids == ids(["good", "bad", "good", "bad", "good", "bad"])
    assert pairs[0].rejected_ids == ids(["bad", "<end_of_turn>"])
    assert (report.prompt_truncated, report.chosen_truncated) == (1, 1)


def test_llama3_style_eot_on_the_shared_word_tokenizer(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.chat_template = LLAMA3_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    eot = ids("<|eot_id|>")
    assert stop_token_ids(tokenizer) == [EOS, eot]
    examples, (pairs, _) = tokenize_records(
        tmp_path, [conversation("good answer", "bad")], tokenizer
    )
    assert examples[0].chosen == "good answer<|eot_id|>"
    assert pairs[0].chosen_ids == [ids("good"), ids("answer"), eot]  # |y| = 2 words + 1
    assert pairs[0].rejected_ids == [ids("bad"), eot]


@pytest.mark.parametrize(
    ("template", "why"),
    [
        (None, "no chat template"),
        ("{% for m in messages %}{{ m['content'] }} {% endfor %}", "nothing after a turn"),
        ("{% for m in messages %}{{ m['content'] }} good{% endfor %}", "ordinary text"),
        ("{{ raise_exception('no assistant turns') }}", "a template that refuses"),
        ("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}", "EOS itself"),
    ],
)
def test_stop_tokens_fall_back_to_eos(template, why):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    assert stop_token_ids(tokenizer) == [EOS], why
