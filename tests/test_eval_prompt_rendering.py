"""Training and evaluation see the same prompts.

Regression: `avgalign evaluate --prompts <HH file>` wrapped the raw HH transcripts
("\\n\\nHuman: ...\\n\\nAssistant:"), which training had tokenised as they are, in the chat
template (system prompt included), and could not read conversational datasets at all. Now a
dataset's prompts become exactly the token ids `tokenize_pairs` gives them, and plain prompts are
rendered as the policy's training prompts were, read from its prompt_rendering.json.

Regression: a policy trained with `data.system_prompt` was evaluated on plain prompts without it.
Now the record names the system prompt and plain prompts wrapped in the chat template get it first.
"""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from conftest import make_model, make_tokenizer

from avgalign.cli.parsers import add_evaluate_parser
from avgalign.data import (
    PROMPT_RENDERING_FILE,
    DataError,
    PreferenceExample,
    chat_template_probe,
    load_preferences,
    prompt_rendering,
    read_prompt_rendering,
    tokenize_pairs,
    write_prompt_rendering,
)
from avgalign.errors import UsageError
from avgalign.evaluation import (
    PromptSet,
    choose_chat_template,
    encode_prompts,
    generate_completions,
    read_prompts,
)
from avgalign.evaluation import evaluate as evaluation  # where evaluate_policy samples

# A template that, like SmolLM2's, adds a system prompt when the conversation has none.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|> w9 w9<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
PROBE = "<|system|> w9 w9<|end|>\n<|user|> {prompt}<|end|>\n<|assistant|> "
SYSTEM = "be w5"  # data.system_prompt: replaces the template's own system prompt
SYSTEM_PROBE = "<|system|> be w5<|end|>\n<|user|> {prompt}<|end|>\n<|assistant|> "
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


def training_prompt_ids(path, tokenizer, system_prompt=None) -> list[list[int]]:
    """The prompt ids training conditions on (under data.system_prompt), each distinct prompt
    once, in order."""
    report = load_preferences(str(path), tokenizer=tokenizer, system_prompt=system_prompt)
    examples = report.examples
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
        "system_prompt": None,
        "chat_template_probe": None,
    }
    assert prompt_rendering([templated], tokenizer) == {
        "rendering": "chat_template",
        "system_prompt": None,
        "chat_template_probe": PROBE,  # shows the system prompt the template adds
    }
    assert prompt_rendering([raw, templated], tokenizer) == {
        "rendering": "mixed",
        "system_prompt": None,
        "chat_template_probe": PROBE,
    }
    with pytest.raises(ValueError, match="at least one example"):
        prompt_rendering([], tokenizer)


def test_prompt_rendering_records_the_system_prompt():
    tokenizer = chat_tokenizer()
    raw = PreferenceExample("p", "c", "r", "x:1")
    templated = PreferenceExample("<|user|> p", "c", "r", "x:2", "chat_template")
    assert prompt_rendering([templated], tokenizer, SYSTEM) == {
        "rendering": "chat_template",
        "system_prompt": SYSTEM,
        "chat_template_probe": SYSTEM_PROBE,  # the given system prompt, not the template's own
    }
    assert chat_template_probe(tokenizer, SYSTEM) == SYSTEM_PROBE
    assert chat_template_probe(tokenizer) == PROBE
    # the setting is recorded; evaluation uses it only when it wraps prompts in the template
    assert prompt_rendering([raw], tokenizer, SYSTEM) == {
        "rendering": "raw",
        "system_prompt": SYSTEM,
        "chat_template_probe": None,
    }
    # "" puts no system message in training either
    assert prompt_rendering([templated], tokenizer, "")["system_prompt"] is None
    assert prompt_rendering([templated], tokenizer, "")["chat_template_probe"] == PROBE


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
    path.write_text('{"rendering": "chat_template", "system_prompt": ["w5"]}')
    with pytest.raises(DataError, match=f"^{path}: 'system_prompt' must be a string or null"):
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


@pytest.mark.parametrize("system_prompt", [None, SYSTEM])
@pytest.mark.parametrize("recorded", ["raw", "chat_template"])
def test_plain_prompts_follow_the_recorded_rendering(
    tmp_path, policy, evaluate, capsys, recorded, system_prompt
):
    tokenizer = chat_tokenizer()
    questions = ["what is w1", "why w2"]
    # the same questions as training data of the recorded kind, under data.system_prompt
    if recorded == "raw":
        records = [{"prompt": q, "chosen": "good", "rejected": "bad"} for q in questions]
    else:
        records = [conversation(q, "good", "bad") for q in questions]
    data = write_jsonl(tmp_path / "train.jsonl", records)
    examples = load_preferences(
        str(data), tokenizer=tokenizer, system_prompt=system_prompt
    ).examples
    write_prompt_rendering(policy, prompt_rendering(examples, tokenizer, system_prompt))
    (tmp_path / "prompts.txt").write_text("\n".join(questions) + "\n")

    ids, line = evaluate(policy, tmp_path / "prompts.txt", capsys=capsys)
    assert ids == training_prompt_ids(data, tokenizer, system_prompt)
    record = policy / PROMPT_RENDERING_FILE
    if recorded == "raw":  # training left raw text as it is, system prompt or not
        assert line == f"prompts: raw text, as recorded in {record}"
    elif system_prompt is None:  # as before system prompts were recorded
        assert ids == encode_prompts(tokenizer, questions, use_chat_template=True)
        assert line == f"prompts: wrapped in the chat template, as recorded in {record}"
    else:
        assert ids != training_prompt_ids(data, tokenizer)  # the system prompt matters
        assert ids == encode_prompts(tokenizer, questions, True, system_prompt=SYSTEM)
        assert line == (
            f"prompts: wrapped in the chat template, as recorded in {record}; "
            f"system prompt 'be w5' first, as recorded in {record}"
        )


def test_a_policy_trained_with_a_system_prompt_is_evaluated_with_it(tmp_path, evaluate, capsys):
    """End to end: `train` with data.system_prompt on conversational records, then `evaluate`
    on plain prompts with --chat-template trained, and with --system-prompt."""
    from helpers import tiny_config

    from avgalign.train import train

    tokenizer = chat_tokenizer()
    base = tmp_path / "base"
    make_model(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    questions = ["what is w1", "why w2", "what w3", "why is w4"]
    data = write_jsonl(
        tmp_path / "train.jsonl", [conversation(q, "good w6", "bad w7") for q in questions]
    )
    cfg = tiny_config(
        tmp_path,
        base,
        data,
        **{
            "data.system_prompt": f"'{SYSTEM}'",
            "data.eval_fraction": 0.0,
            "train.batch_size": 4,
            "train.micro_batch_size": 4,
            "train.max_steps": 1,
        },
    )
    train(cfg)
    capsys.readouterr()  # what training printed
    policy = tmp_path / "run" / "model"
    record = read_prompt_rendering(policy)
    assert record == {
        "rendering": "chat_template",
        "system_prompt": SYSTEM,
        "chat_template_probe": SYSTEM_PROBE,
    }
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(questions) + "\n")

    ids, line = evaluate(policy, prompts, capsys=capsys)
    assert ids == training_prompt_ids(data, tokenizer, SYSTEM)
    assert "system prompt 'be w5' first, as recorded in" in line
    assert "warning" not in line  # the recorded probe is the tokenizer's, with that system prompt

    # --system-prompt replaces the recorded one, for "trained" and for "yes" alike
    for flags in ([], ["--chat-template", "yes"]):
        ids, line = evaluate(policy, prompts, *flags, "--system-prompt", "w8", capsys=capsys)
        assert ids == training_prompt_ids(data, tokenizer, "w8")
        assert "system prompt 'w8' first (--system-prompt" in line
    # "" drops it: the ids of the same records trained without a system prompt
    ids, line = evaluate(policy, prompts, "--system-prompt", "", capsys=capsys)
    assert ids == training_prompt_ids(data, tokenizer)
    assert line.endswith(
        f"; no system prompt (--system-prompt; {policy / PROMPT_RENDERING_FILE} records 'be w5')"
    )
    # "yes" and "auto" do not read the record
    ids, line = evaluate(policy, prompts, "--chat-template", "auto", capsys=capsys)
    assert ids == training_prompt_ids(data, tokenizer)
    assert line == (
        "prompts: wrapped in the chat template (--chat-template auto: the tokenizer has a chat "
        "template)"
    )


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
    with pytest.raises(UsageError, match=f"^{bad}:2: not valid JSON"):
        evaluate(policy, bad, capsys=capsys)


# ------------------------------------------------------------------- the decision, unit by unit


def test_mixed_or_missing_record_falls_back_to_auto(tmp_path):
    with_template, without = chat_tokenizer(), make_tokenizer()
    plain = PromptSet(["w1"])
    use, _, line = choose_chat_template(plain, "trained", tmp_path, with_template)
    assert use is True and f"no {PROMPT_RENDERING_FILE} in {tmp_path}" in line
    assert "falling back to --chat-template auto" in line
    use, _, _ = choose_chat_template(plain, "trained", tmp_path, without)
    assert use is False
    write_prompt_rendering(tmp_path, {"rendering": "mixed", "chat_template_probe": PROBE})
    use, _, line = choose_chat_template(plain, "trained", tmp_path, with_template)
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
    use, _, line = choose_chat_template(PromptSet(["x"], "raw"), "yes", tmp_path, tokenizer)
    assert use is False
    assert "--chat-template yes applies only to plain prompts" in line
    assert "records rendered with the chat template in training" in line  # a mismatch is named


def test_recorded_template_needs_one_and_a_changed_template_is_flagged(tmp_path):
    write_prompt_rendering(tmp_path, {"rendering": "chat_template", "chat_template_probe": PROBE})
    with pytest.raises(ValueError, match="has no chat template"):
        choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, make_tokenizer())
    changed = chat_tokenizer()
    changed.chat_template = TEMPLATE.replace("w9 w9", "w8")  # another system prompt
    use, _, line = choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, changed)
    assert (
        use is True
        and "warning: the tokenizer's chat template renders a prompt differently" in line
    )


def test_recorded_system_prompt_is_used_only_when_wrapping_under_trained(tmp_path):
    tokenizer = chat_tokenizer()
    plain = PromptSet(["w1"])
    record = {"rendering": "chat_template", "system_prompt": SYSTEM}
    write_prompt_rendering(tmp_path, {**record, "chat_template_probe": SYSTEM_PROBE})
    choice = choose_chat_template(plain, "trained", tmp_path, tokenizer)
    assert (choice.use_chat_template, choice.system_prompt) == (True, SYSTEM)
    assert "warning" not in choice.line
    # "yes" and "auto" do not read the record; --system-prompt sets one for them
    for explicit in ("yes", "auto"):
        assert choose_chat_template(plain, explicit, tmp_path, tokenizer)[:2] == (True, None)
        choice = choose_chat_template(plain, explicit, tmp_path, tokenizer, "w8")
        assert choice[:2] == (True, "w8")
        assert choice.line.endswith("; system prompt 'w8' first (--system-prompt)")
    # a mixed record: the templated training prompts had the system prompt
    write_prompt_rendering(tmp_path, {"rendering": "mixed", "system_prompt": SYSTEM})
    choice = choose_chat_template(plain, "trained", tmp_path, tokenizer)
    assert choice[:2] == (True, SYSTEM) and "falling back" in choice.line
    # raw training prompts never had it
    write_prompt_rendering(tmp_path, {"rendering": "raw", "system_prompt": SYSTEM})
    assert choose_chat_template(plain, "trained", tmp_path, tokenizer)[:2] == (False, None)


def test_a_record_without_system_prompt_reads_as_none(tmp_path):
    """Records written before the key existed: no system prompt, the probe compared as before."""
    tokenizer = chat_tokenizer()
    write_prompt_rendering(tmp_path, {"rendering": "chat_template", "chat_template_probe": PROBE})
    choice = choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, tokenizer)
    assert choice == (
        True,
        None,
        f"prompts: wrapped in the chat template, as recorded in {tmp_path / PROMPT_RENDERING_FILE}",
    )


def test_recorded_probe_is_checked_with_the_recorded_system_prompt(tmp_path):
    record = {"rendering": "chat_template", "system_prompt": SYSTEM, "chat_template_probe": PROBE}
    write_prompt_rendering(tmp_path, record)  # a probe that does not show the system prompt
    line = choose_chat_template(PromptSet(["w1"]), "trained", tmp_path, chat_tokenizer()).line
    assert "warning: the tokenizer's chat template renders a prompt differently" in line


def test_system_prompt_on_raw_text_is_refused_and_dataset_prompts_ignore_it(tmp_path):
    tokenizer = chat_tokenizer()
    plain = PromptSet(["w1"])
    with pytest.raises(
        ValueError,
        match=r"^--system-prompt needs the chat template, but the "
        r"prompts stay raw text \(--chat-template no\)$",
    ):
        choose_chat_template(plain, "no", tmp_path, tokenizer, "w8")
    with pytest.raises(ValueError, match="stay raw text .*the tokenizer has no chat template"):
        choose_chat_template(plain, "auto", tmp_path, make_tokenizer(), "w8")
    write_prompt_rendering(tmp_path, {"rendering": "raw", "chat_template_probe": None})
    with pytest.raises(ValueError, match="stay raw text, as recorded in"):
        choose_chat_template(plain, "trained", tmp_path, tokenizer, "w8")
    # "" asks for no system prompt, which raw text has
    assert choose_chat_template(plain, "no", tmp_path, tokenizer, "")[:2] == (False, None)
    choice = choose_chat_template(PromptSet(["x"], "raw"), "trained", tmp_path, tokenizer, "w8")
    assert choice[:2] == (False, None)
    assert "--system-prompt applies only to plain prompts" in choice.line


def test_a_long_system_prompt_is_shortened_in_the_line(tmp_path):
    long = "w5 " * 40
    choice = choose_chat_template(PromptSet(["w1"]), "yes", tmp_path, chat_tokenizer(), long)
    assert choice.system_prompt == long  # used in full
    assert f"system prompt {long[:60]!r}... (120 characters) first" in choice.line


def test_encode_and_generate_with_a_system_prompt(tmp_path):
    tokenizer = chat_tokenizer()
    data = write_jsonl(tmp_path / "train.jsonl", [conversation("what is w1", "good", "bad")])
    expected = training_prompt_ids(data, tokenizer, SYSTEM)
    assert encode_prompts(tokenizer, ["what is w1"], system_prompt=SYSTEM) == expected
    assert encode_prompts(tokenizer, ["what is w1"]) == training_prompt_ids(data, tokenizer)
    completions = generate_completions(
        make_model(len(tokenizer)),
        tokenizer,
        ["what is w1"],
        max_new_tokens=2,
        system_prompt=SYSTEM,
        progress=False,
    )
    assert completions[0].prompt_ids == expected[0]
    assert completions[0].prompt == "what is w1"  # the scorer reads the prompt as given
    with pytest.raises(ValueError, match="needs the chat template"):
        encode_prompts(tokenizer, ["w1"], use_chat_template=False, system_prompt=SYSTEM)
    with pytest.raises(ValueError, match="token ids"):
        encode_prompts(tokenizer, [[5, 6]], system_prompt=SYSTEM)
