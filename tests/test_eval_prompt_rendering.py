"""Training and evaluation see the same prompts.

Regression: `avgalign evaluate --prompts <HH file>` wrapped the raw HH transcripts
("\\n\\nHuman: ...\\n\\nAssistant:"), which training had tokenised as they are, in the chat
template (system prompt included), and could not read conversational datasets at all. Now a
dataset's prompts become exactly the token ids `tokenize_pairs` gives them, and plain prompts are
rendered as the policy's training prompts were, read from its prompt_rendering.json.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from conftest import make_model, make_tokenizer

from avgalign import evaluation
from avgalign.data import (
    PROMPT_RENDERING_FILE,
    DataError,
    PreferenceExample,
    load_preferences,
    prompt_rendering,
    read_prompt_rendering,
    tokenize_pairs,
    write_prompt_rendering,
)
from avgalign.evaluation import (
    PromptSet,
    add_evaluate_parser,
    choose_chat_template,
    encode_prompts,
    read_prompts,
)

# A template that, like SmolLM2's, adds a system prompt when the conversation has none.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|> w9 w9<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PROBE = "<|system|> w9 w9<|end|>\n<|user|> {prompt}<|end|>\n<|assistant|> "
HH_RECORDS = [
    {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}
    for q, a, b in [("what is w1", "good w2", "bad"), ("why w3", "yes", "no w4")]
]


def chat_tokenizer():
    tokenizer = make_tokenizer()
    specials = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def conversation(question: str, answer: str, other: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": answer}],
        "rejected": [{"role": "assistant", "content": other}],
    }


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def training_prompt_ids(path, tokenizer) -> list[list[int]]:
    """The prompt ids training conditions on, each distinct prompt once, in order."""
    examples = load_preferences(str(path), tokenizer=tokenizer).examples
    pairs, _ = tokenize_pairs(examples, tokenizer, max_length=10_000)
    return list({tuple(p.prompt_ids): p.prompt_ids for p in pairs}.values())


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny policy whose tokenizer has a chat template, saved as a training run saves it."""
    path = tmp_path_factory.mktemp("chat-model")
    tokenizer = chat_tokenizer()
    make_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def policy(tmp_path, model_folder):
    """A fresh copy of the tiny policy (each test writes its own prompt_rendering.json)."""
    return shutil.copytree(model_folder, tmp_path / "policy")


@pytest.fixture
def evaluate(tmp_path, monkeypatch):
    """run `avgalign evaluate` on the tiny policy; returns the prompt ids the model was
    conditioned on (one list per prompt) and what it printed."""
    (tmp_path / "scorers.py").write_text(
        "def n_words(prompts, completions):\n    return [len(c.split()) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    original = evaluation.generate_completions

    def spy(model, tokenizer, prompts, **kwargs):
        completions = original(model, tokenizer, prompts, **kwargs)
        seen.append([c.prompt_ids for c in completions if c.sample_index == 0])
        return completions

    monkeypatch.setattr(evaluation, "generate_completions", spy)

    def run(policy, prompts, *flags, capsys):
        parser = argparse.ArgumentParser()
        add_evaluate_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(
            ["evaluate", "--policy", str(policy), "--prompts", str(prompts)]
            + ["--scorer", "scorers:n_words", "--max-new-tokens", "2"]
            + ["--out", str(tmp_path / "out"), *flags]
        )
        seen.clear()
        args.func(args)
        (ids,) = seen  # no reference: one generation pass
        printed = capsys.readouterr().out
        return ids, printed.splitlines()[0]

    return run


# ------------------------------------------------------------------------------ the record


def test_examples_say_how_their_prompt_was_made(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [
            HH_RECORDS[0],
            {"prompt": "w1", "chosen": "good", "rejected": "bad"},
            conversation("w1", "good", "bad"),
        ],
    )
    examples = load_preferences(str(path), tokenizer=chat_tokenizer()).examples
    assert [e.rendering for e in examples] == ["raw", "raw", "chat_template"]
    assert PreferenceExample("p", "c", "r", "x:1").rendering == "raw"  # positional still works


def test_prompt_rendering_record():
    tokenizer = chat_tokenizer()
    raw = PreferenceExample("p", "c", "r", "x:1")
    templated = PreferenceExample("<|user|> p", "c", "r", "x:2", "chat_template")
    assert prompt_rendering([raw, raw], tokenizer) == {
        "rendering": "raw",
        "chat_template_probe": None,
    }
    assert prompt_rendering([templated], tokenizer) == {
        "rendering": "chat_template",
        "chat_template_probe": PROBE,  # shows the system prompt the template adds
    }
    assert prompt_rendering([raw, templated], tokenizer) == {
        "rendering": "mixed",
        "chat_template_probe": PROBE,
    }
    with pytest.raises(ValueError, match="at least one example"):
        prompt_rendering([], tokenizer)


def test_write_and_read_prompt_rendering(tmp_path):
    record = {"rendering": "chat_template", "chat_template_probe": PROBE}
    path = write_prompt_rendering(tmp_path / "model", record)
    assert path == tmp_path / "model" / PROMPT_RENDERING_FILE
    assert read_prompt_rendering(tmp_path / "model") == record
    assert [p.name for p in (tmp_path / "model").iterdir()] == [PROMPT_RENDERING_FILE]  # no tmp
    assert read_prompt_rendering(tmp_path) is None
    assert read_prompt_rendering("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"^{path}: not valid JSON"):
        read_prompt_rendering(tmp_path / "model")
    path.write_text('{"rendering": "templated"}')
    with pytest.raises(DataError, match=f"^{path}: 'rendering' must be one of"):
        read_prompt_rendering(tmp_path / "model")


# ----------------------------------------------------------------- dataset prompts, end to end


def test_hh_prompts_get_the_ids_training_gave_them(tmp_path, policy, evaluate, capsys):
    hh = write_jsonl(tmp_path / "hh.jsonl", HH_RECORDS)
    tokenizer = chat_tokenizer()
    examples = load_preferences(str(hh), tokenizer=tokenizer).examples
    write_prompt_rendering(policy, prompt_rendering(examples, tokenizer))  # as train.py does

    ids, line = evaluate(policy, hh, capsys=capsys)
    assert ids == training_prompt_ids(hh, tokenizer)
    # the tokenizer has a chat template, but the transcripts were trained on as they are
    assert ids != encode_prompts(tokenizer, [e.prompt for e in examples], use_chat_template=True)
    assert line.startswith("prompts: the dataset's own, raw text")


def test_conversational_dataset_prompts_get_the_ids_training_gave_them(
    tmp_path, policy, evaluate, capsys
):
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [conversation("what is w1", "good", "bad"), conversation("why w2", "yes", "no")],
    )
    prompts = read_prompts(str(data), tokenizer=chat_tokenizer())
    assert prompts.rendering == "chat_template"
    assert prompts.texts[0] == PROBE.replace("{prompt}", "what is w1")  # rendered once, as trained
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        read_prompts(str(data))

    ids, line = evaluate(policy, data, capsys=capsys)
    assert ids == training_prompt_ids(data, chat_tokenizer())
    assert len(ids[0]) == len(
        chat_tokenizer()(PROBE.replace("{prompt}", "what is w1"))["input_ids"]
    )
    assert line.startswith("prompts: the dataset's own, rendered with the chat template")
    assert "no chat template added" in line


# ------------------------------------------------------------------- plain prompts, end to end


@pytest.mark.parametrize("recorded", ["raw", "chat_template"])
def test_plain_prompts_follow_the_recorded_rendering(tmp_path, policy, evaluate, capsys, recorded):
    tokenizer = chat_tokenizer()
    questions = ["what is w1", "why w2"]
    # the same questions as training data of the recorded kind
    if recorded == "raw":
        records = [{"prompt": q, "chosen": "good", "rejected": "bad"} for q in questions]
    else:
        records = [conversation(q, "good", "bad") for q in questions]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    examples = load_preferences(str(data), tokenizer=tokenizer).examples
    write_prompt_rendering(policy, prompt_rendering(examples, tokenizer))
    (tmp_path / "prompts.txt").write_text("\n".join(questions) + "\n")

    ids, line = evaluate(policy, tmp_path / "prompts.txt", capsys=capsys)
    assert ids == training_prompt_ids(data, tokenizer)
    wording = "raw text" if recorded == "raw" else "wrapped in the chat template"
    assert line == f"prompts: {wording}, as recorded in {policy / PROMPT_RENDERING_FILE}"


def test_plain_prompts_without_a_record_fall_back_to_auto_and_say_so(
    tmp_path, policy, evaluate, capsys
):
    (tmp_path / "prompts.txt").write_text("what is w1\n")
    ids, line = evaluate(policy, tmp_path / "prompts.txt", capsys=capsys)
    assert ids == encode_prompts(chat_tokenizer(), ["what is w1"], use_chat_template=True)
    assert line == (
        f"prompts: wrapped in the chat template; no {PROMPT_RENDERING_FILE} in {policy}, so "
        "falling back to --chat-template auto (the tokenizer has a chat template)"
    )
    ids, line = evaluate(policy, tmp_path / "prompts.txt", "--chat-template", "no", capsys=capsys)
    assert ids == training_prompt_ids(
        write_jsonl(
            tmp_path / "raw.jsonl", [{"prompt": "what is w1", "chosen": "a", "rejected": "b"}]
        ),
        chat_tokenizer(),
    )
    assert line == "prompts: raw text (--chat-template no)"


def test_bad_prompt_file_is_a_one_line_error(tmp_path, policy, evaluate, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"prompt": \n')
    with pytest.raises(SystemExit, match=f"^error: {bad}:2: not valid JSON"):
        evaluate(policy, bad, capsys=capsys)


# ------------------------------------------------------------------- the decision, unit by unit


def test_mixed_or_missing_record_falls_back_to_auto(tmp_path):
    with_template, without = chat_tokenizer(), make_tokenizer()
    plain = PromptSet(["w1"])
    use, line = choose_chat_template(plain, "trained", tmp_path, with_template)
    assert use is True and f"no {PROMPT_RENDERING_FILE} in {tmp_path}" in line
    assert "falling back to --chat-template auto" in line
    use, _ = choose_chat_template(plain, "trained", tmp_path, without)
    assert use is False
    write_prompt_rendering(tmp_path, {"rendering": "mixed", "chat_template_probe": PROBE})
    use, line = choose_chat_template(plain, "trained", tmp_path, with_template)
    assert use is True and "records mixed renderings" in line and "falling back" in line


def test_explicit_choices_override_the_record(tmp_path):
    tokenizer = chat_tokenizer()
    write_prompt_rendering(tmp_path, {"rendering": "raw", "chat_template_probe": None})
    plain = PromptSet(["w1"])
    assert choose_chat_template(plain, "trained", tmp_path, tokenizer)[0] is False
    assert choose_chat_template(plain, "yes", tmp_path, tokenizer)[0] is True
    assert choose_chat_template(plain, "auto", tmp_path, tokenizer)[0] is True
    assert choose_chat_template(plain, "no", tmp_path, tokenizer)[0] is False
    with pytest.raises(ValueError, match="no chat template"):
        choose_chat_template(plain, "yes", tmp_path, make_tokenizer())


def test_dataset_prompts_are_never_templated_again(tmp_path):
    tokenizer = chat_tokenizer()
    write_prompt_rendering(tmp_path, {"rendering": "chat_template", "chat_template_probe": PROBE})
    use, line = choose_chat_template(PromptSet(["x"], "raw"), "yes", tmp_path, tokenizer)
    assert use is False
    assert "--chat-template yes applies only to plain prompts" in line
    assert "records rendered with the chat template in training" in line  # a mismatch is named


def test_recorded_template_needs_one_and_a_changed_template_is_flagged(tmp_path):
    write_prompt_rendering(tmp_path, {"rendering": "chat_template", "chat_template_probe": PROBE})
    with pytest.raises(ValueError, match="has no chat template"):
        choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, make_tokenizer())
    changed = chat_tokenizer()
    changed.chat_template = TEMPLATE.replace("w9 w9", "w8")  # another system prompt
    use, line = choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, changed)
    assert (
        use is True
        and "warning: the tokenizer's chat template renders a prompt differently" in line
    )
