"""Tests of avgalign.data: formats, sources, validation messages, truncation, length statistics.

The tokenizer is built offline: a word-level vocabulary split on whitespace, so a text of n words
is n tokens (plus a BOS in front when special tokens are added).
"""

import gzip
import json
from pathlib import Path

import pytest

from avgalign.data import (
    DataError,
    PreferenceExample,
    TokenizedPair,
    _looks_like_path,
    format_length_stats,
    length_stats,
    load_preferences,
    split_implicit_prompt,
    tokenize_pairs,
)

HH_FILE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "data"
    / "hh-rlhf-harmless-base"
    / "test.jsonl.gz"
)
BOS, EOS = 1, 2
WORDS = [f"w{i}" for i in range(40)]  # "w<i>" has id i + 3
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def _tokenizer(eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<bos>": BOS, "<eos>": EOS} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    specials = {"bos_token": "<bos>", "unk_token": "<unk>"} | (
        {"eos_token": "<eos>"} if eos else {}
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def words(start: int, stop: int) -> str:
    return " ".join(WORDS[start:stop])


def ids(start: int, stop: int) -> list[int]:
    return [i + 3 for i in range(start, stop)]


def write_lines(path: Path, lines: list) -> Path:
    """One JSON line per dict; bytes are written as they are (to make broken lines)."""
    data = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


GOOD = {"prompt": "p1", "chosen": "c1", "rejected": "r1"}
GOOD2 = {"prompt": "p2", "chosen": "c2", "rejected": "r2"}
HH_PROMPT = "\n\nHuman: hi\n\nAssistant: ok\n\nHuman: more?\n\nAssistant:"
HH_CHOSEN, HH_REJECTED = HH_PROMPT + " Sure, here", HH_PROMPT + " Sorry, no"


# ------------------------------------------------------------------------------------- formats


def test_explicit_strings(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [GOOD, GOOD2])
    report = load_preferences(str(path))
    assert report.examples == [
        PreferenceExample("p1", "c1", "r1", f"{path}:1"),
        PreferenceExample("p2", "c2", "r2", f"{path}:2"),
    ]
    assert report.records == 2 and not report.skipped and not report.warnings


def test_implicit_prompt_strings_cut_at_last_shared_assistant_marker():
    prompt, chosen, rejected = split_implicit_prompt(HH_CHOSEN, HH_REJECTED)
    # The texts share "...Assistant: S"; the prompt stops right after the marker.
    assert prompt == HH_PROMPT
    assert (chosen, rejected) == (" Sure, here", " Sorry, no")


def test_implicit_prompt_diverging_early_keeps_multi_turn_completions_and_warns(tmp_path):
    chosen = "\n\nHuman: hi\n\nAssistant: yes\n\nHuman: why?\n\nAssistant: because"
    rejected = "\n\nHuman: hi\n\nAssistant: no"
    path = write_lines(tmp_path / "x.jsonl", [{"chosen": chosen, "rejected": rejected}])
    report = load_preferences(str(path))
    (example,) = report.examples
    assert example.prompt == "\n\nHuman: hi\n\nAssistant:"
    assert example.chosen == " yes\n\nHuman: why?\n\nAssistant: because"
    assert report.warnings == [
        f"{path}:1: chosen and rejected diverge before their last Assistant turn; "
        "the completions span several turns"
    ]


def test_conversational_with_explicit_prompt(tmp_path, tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    path = write_lines(tmp_path / "x.jsonl", [record])
    (example,) = load_preferences(str(path), tokenizer=tokenizer).examples
    assert (example.prompt, example.chosen, example.rejected) == (
        "<user> hi <assistant> ",
        "yes ",
        "no ",
    )


def test_conversational_with_implicit_prompt(tmp_path, tokenizer):
    user = {"role": "user", "content": "hi"}
    record = {
        "chosen": [user, {"role": "assistant", "content": "yes"}],
        "rejected": [user, {"role": "assistant", "content": "no"}],
    }
    path = write_lines(tmp_path / "x.jsonl", [record])
    (example,) = load_preferences(str(path), tokenizer=tokenizer).examples
    assert (example.prompt, example.chosen, example.rejected) == (
        "<user> hi <assistant> ",
        "yes ",
        "no ",
    )


def test_conversational_needs_a_chat_template(tmp_path):
    record = {"chosen": [{"role": "user", "content": "hi"}], "rejected": []}
    path = write_lines(tmp_path / "x.jsonl", [record])
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        load_preferences(str(path), on_error="skip")


def test_conversational_completion_must_start_with_assistant(tmp_path, tokenizer):
    record = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "user", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    path = write_lines(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=r":1: field 'chosen' must start with an assistant message"):
        load_preferences(str(path), tokenizer=tokenizer)


# ------------------------------------------------------------------------------------- sources


def _write_parquet(path: Path, records: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize(
    ("name", "write", "first_location"),
    [
        ("x.jsonl.gz", lambda p, r: write_lines(p, r), "{path}:1"),
        ("x.json", lambda p, r: p.write_text(json.dumps(r)), "{path}[0]"),
        ("x.json", lambda p, r: write_lines(p, r), "{path}:1"),  # JSON lines in a .json
        (
            "x.json.gz",
            lambda p, r: p.write_bytes(gzip.compress(json.dumps(r).encode())),
            "{path}[0]",
        ),
        ("x.parquet", _write_parquet, "{path}[0]"),
    ],
)
def test_file_types(tmp_path, name, write, first_location):
    path = tmp_path / name
    write(path, [GOOD, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    report = load_preferences(str(path))
    assert [e.chosen for e in report.examples] == ["c1", " Sure, here"]
    assert report.examples[0].location == first_location.format(path=path)


@pytest.mark.parametrize("name, delimiter", [("x.csv", ","), ("x.tsv", "\t")])
def test_csv_and_tsv_cells_are_read_as_written(tmp_path, name, delimiter):
    """Through `datasets`: quoted delimiters and newlines, numbers kept as text, and an empty
    cell is an empty completion that names its row."""
    import csv

    path = tmp_path / name
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["What is 6 x 7?", "42", "41, or\n43"])
        writer.writerow(["Say it", "ok", ""])
    report = load_preferences(str(path), on_error="skip")
    (example,) = report.examples
    assert (example.prompt, example.chosen, example.rejected) == ("What is 6 x 7?", "42",
                                                                  "41, or\n43")
    assert example.location == f"{path}[row 1]"
    assert report.skipped == [(f"{path}[row 2]", "field 'rejected' is an empty completion")]


def test_limit_stops_after_enough_examples(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [GOOD, GOOD2, GOOD])
    report = load_preferences(str(path), limit=2)
    assert len(report.examples) == 2 and report.records == 2


@pytest.mark.parametrize("source", ["data/missing.jsonl", "missing.parquet", "./missing", "a/b/c"])
def test_missing_path_is_no_such_file(source):
    with pytest.raises(DataError, match=f"^{source}: no such file$"):
        load_preferences(source)


def test_hub_ids_are_not_paths():
    assert not _looks_like_path("Anthropic/hh-rlhf:harmless-base")
    assert not _looks_like_path("imdb")


# ---------------------------------------------------------------------------------- validation

BAD_LINES = [
    ({"prompt": "p", "rejected": "r"}, "field 'chosen' is missing"),
    ({"prompt": "p", "chosen": " \n", "rejected": "r"}, "field 'chosen' is an empty completion"),
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "field 'rejected' must be a string, got int"),
    ({"prompt": None, "chosen": "c", "rejected": "r"}, "share no prefix ending in"),
    ({"chosen": HH_PROMPT + " ", "rejected": HH_CHOSEN}, "field 'chosen' is empty after the"),
    ([1, 2], "record must be a JSON object, got list"),
    (b'{"prompt": "p", "chosen": ', "not valid JSON"),
    (b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}', "invalid UTF-8 at byte 13"),
]


@pytest.mark.parametrize(("line", "reason"), BAD_LINES)
def test_bad_record_error_names_line_and_field(tmp_path, line, reason):
    path = write_lines(tmp_path / "x.jsonl", [GOOD, line])
    with pytest.raises(DataError) as caught:
        load_preferences(str(path))
    assert str(caught.value).startswith(f"{path}:2: ")
    assert reason in str(caught.value)


def test_skip_policy_reports_every_bad_record(tmp_path):
    bad = [line for line, _ in BAD_LINES]
    path = write_lines(tmp_path / "x.jsonl", [GOOD, *bad, b"", GOOD2])  # a blank line is no record
    report = load_preferences(str(path), on_error="skip")
    assert [e.location for e in report.examples] == [f"{path}:1", f"{path}:{len(bad) + 3}"]
    assert report.records == len(bad) + 2
    assert [loc for loc, _ in report.skipped] == [f"{path}:{i}" for i in range(2, len(bad) + 2)]
    assert all(want in got for (_, got), (_, want) in zip(report.skipped, BAD_LINES, strict=True))
    assert f"{len(bad)} skipped" in report.summary()


def test_identical_chosen_and_rejected_is_kept_with_a_warning(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "c"}])
    report = load_preferences(str(path))
    assert len(report.examples) == 1
    assert report.warnings == [f"{path}:1: chosen and rejected are identical"]


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH-RLHF data not present")
def test_hh_rlhf_harmless_base_test_split():
    report = load_preferences(str(HH_FILE), on_error="skip")
    assert report.records == 2312 and len(report.examples) == 2308
    assert report.skipped == [
        (f"{HH_FILE}:{line}", "field 'chosen' is empty after the shared prompt")
        for line in (87, 517, 926, 1104)
    ]
    assert all(e.prompt.endswith("\n\nAssistant:") for e in report.examples)
    with pytest.raises(DataError, match=f"^{HH_FILE}:87: field 'chosen'"):
        load_preferences(str(HH_FILE))


# -------------------------------------------------------------------------------- tokenisation


def example(prompt: str, chosen: str, rejected: str) -> PreferenceExample:
    return PreferenceExample(prompt, chosen, rejected, "x.jsonl:1")


def test_tokenize_adds_bos_to_prompt_and_eos_to_completions(tokenizer):
    pairs, report = tokenize_pairs(
        [example(words(0, 2), words(2, 4), words(4, 5))], tokenizer, max_length=64
    )
    assert pairs == [TokenizedPair([BOS, *ids(0, 2)], [*ids(2, 4), EOS], [*ids(4, 5), EOS])]
    assert (report.pairs, report.prompt_truncated, report.chosen_truncated) == (1, 0, 0)


def test_tokenize_makes_a_doubled_bos_single(tokenizer):
    pairs, _ = tokenize_pairs([example("<bos> w0", "w1", "w2")], tokenizer, max_length=64)
    assert pairs[0].prompt_ids == [BOS, *ids(0, 1)]


def test_truncation_cuts_prompt_left_then_completions_right(tokenizer):
    examples = [
        # prompt 11 tokens, completions 4 and 2: the prompt is cut to 12 - 4 = 8 tokens
        example(words(0, 10), words(10, 13), words(13, 14)),
        # chosen 10 tokens: the prompt keeps max_length // 2 = 6, chosen is cut to 12 - 6 = 6
        example(words(0, 10), words(10, 19), words(19, 20)),
        example(words(0, 2), words(2, 3), words(3, 4)),  # fits
    ]
    pairs, report = tokenize_pairs(examples, tokenizer, max_length=12)
    assert pairs[0] == TokenizedPair(ids(2, 10), [*ids(10, 13), EOS], [*ids(13, 14), EOS])
    assert pairs[1] == TokenizedPair(ids(4, 10), ids(10, 16), [*ids(19, 20), EOS])
    assert pairs[2] == TokenizedPair([BOS, *ids(0, 2)], [*ids(2, 3), EOS], [*ids(3, 4), EOS])
    assert all(len(p.prompt_ids) + len(p.chosen_ids) <= 12 for p in pairs)
    assert (report.pairs, report.prompt_truncated, report.chosen_truncated) == (3, 2, 1)
    assert (report.rejected_truncated, report.dropped) == (0, [])


def test_max_prompt_length_sets_the_prompt_floor(tokenizer):
    pairs, _ = tokenize_pairs(
        [example(words(0, 10), words(10, 19), "w19")], tokenizer, max_length=12, max_prompt_length=3
    )
    # chosen needs 10 of 12 tokens, but the prompt keeps its floor of 3: chosen is cut to 9
    assert pairs[0].prompt_ids == ids(7, 10) and pairs[0].chosen_ids == ids(10, 19)


def test_prompt_that_leaves_no_room_is_an_error_or_dropped(tokenizer):
    examples = [example(words(0, 12), "w12", "w13"), example("w0", "w1", "w2")]
    with pytest.raises(DataError, match="^x.jsonl:1: the prompt keeps 12 tokens"):
        tokenize_pairs(examples, tokenizer, max_length=12, max_prompt_length=12)
    pairs, report = tokenize_pairs(
        examples, tokenizer, max_length=12, max_prompt_length=12, on_error="skip"
    )
    assert len(pairs) == 1 and report.dropped == ["x.jsonl:1"]
    assert (
        report.summary() == "2 pairs: prompt truncated in 0, chosen in 0, rejected in 0; 1 dropped"
    )


def test_tokenizer_without_eos_is_refused():
    with pytest.raises(ValueError, match="no EOS token"):
        tokenize_pairs([example("w0", "w1", "w2")], _tokenizer(eos=False), max_length=8)


# --------------------------------------------------------------------------------- diagnostics


def pair(prompt: int, chosen: int, rejected: int) -> TokenizedPair:
    return TokenizedPair([0] * prompt, [0] * chosen, [0] * rejected)


def test_length_stats_by_hand():
    stats = length_stats([pair(4, 3, 1), pair(2, 2, 2), pair(6, 1, 5), pair(8, 6, 2)])
    # p95 sits at position 0.95 * 3 = 2.85 of the sorted lengths: x[2] + 0.85 * (x[3] - x[2])
    assert stats["prompt"] == pytest.approx({"mean": 5, "median": 5, "p95": 7.7, "max": 8})
    assert stats["chosen"] == pytest.approx({"mean": 3, "median": 2.5, "p95": 5.55, "max": 6})
    assert stats["rejected"] == pytest.approx({"mean": 2.5, "median": 2, "p95": 4.55, "max": 5})
    # gaps chosen - rejected: +2, 0, -4, +4
    assert stats["pairs"] == 4
    assert (stats["chosen_longer"], stats["equal"], stats["mean_gap"]) == (0.5, 0.25, 0.5)
    table = format_length_stats(stats)
    assert table.splitlines()[1].split() == ["prompt", "5.0", "5.0", "7.7", "8.0"]
    assert "chosen longer than rejected in 50.0%, equal in 25.0%" in table


def test_length_stats_of_one_pair():
    stats = length_stats([pair(3, 2, 1)])
    assert stats["prompt"] == {"mean": 3, "median": 3, "p95": 3, "max": 3}
