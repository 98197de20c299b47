"""Tests of avgalign.data: formats, sources, validation messages, truncation, length statistics.

The tokenizer is built offline: a word-level vocabulary split on whitespace, so a text of n words
is n tokens (plus a BOS in front when special tokens are added).
"""

import csv
import gzip
import json
import math
from pathlib import Path

import pytest

from avgalign.config import ConfigError, DataConfig, SourceConfig, load_config
from avgalign.data import (
    DataError,
    PreferenceExample,
    TokenizedPair,
    _looks_like_path,
    format_length_stats,
    length_stats,
    load_data,
    load_mixture,
    load_preferences,
    mixture_counts,
    split_implicit_prompt,
    tokenize_pairs,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"
LLAMAFACTORY_DEMO = SHARED_DATA / "llamafactory-dpo-en-demo" / "dpo_en_demo.json.gz"
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


def test_llamafactory_sharegpt_ranking_record(tmp_path, tokenizer):
    record = {
        "conversations": [
            {"from": "system", "value": "be kind"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "ok"},
            {"from": "human", "value": "more"},
        ],
        "chosen": {"from": "gpt", "value": "yes"},
        "rejected": {"from": "gpt", "value": "no"},
    }
    path = write_lines(tmp_path / "x.jsonl", [record])
    (example,) = load_preferences(str(path), tokenizer=tokenizer).examples
    assert (example.prompt, example.chosen, example.rejected) == (
        "<system> be kind <user> hi <assistant> ok <user> more <assistant> ",
        "yes ",
        "no ",
    )
    assert example.rendering == "chat_template"


def test_llamafactory_openai_style_ranking_record_with_a_system_column(tmp_path, tokenizer):
    record = {
        "messages": [{"role": "user", "content": "hi"}],
        "chosen": {"role": "assistant", "content": "yes"},
        "rejected": {"role": "assistant", "content": "no"},
        "system": "be kind",
    }
    path = write_lines(tmp_path / "x.jsonl", [record])
    (example,) = load_preferences(str(path), tokenizer=tokenizer).examples
    assert (example.prompt, example.chosen, example.rejected) == (
        "<system> be kind <user> hi <assistant> ",
        "yes ",
        "no ",
    )


def test_llamafactory_alpaca_ranking_records(tmp_path, tokenizer):
    records = [
        {
            "instruction": "add",
            "input": "w1 w2",
            "system": "be kind",
            "history": [["hi", "ok"]],
            "chosen": "yes",
            "rejected": "no",
        },
        {"instruction": "add", "input": "", "chosen": "yes", "rejected": "no"},
    ]
    path = write_lines(tmp_path / "x.jsonl", records)
    first, second = load_preferences(str(path), tokenizer=tokenizer).examples
    assert (first.prompt, first.chosen, first.rejected) == (
        "<system> be kind <user> hi <assistant> ok <user> add\nw1 w2 <assistant> ",
        "yes ",
        "no ",
    )
    assert second.prompt == "<user> add <assistant> "  # an empty input adds no line
    assert first.rendering == second.rendering == "chat_template"


SHAREGPT_TURNS = [{"from": "human", "value": "q"}]
SHAREGPT = {
    "conversations": SHAREGPT_TURNS,
    "chosen": {"from": "gpt", "value": "y"},
    "rejected": {"from": "gpt", "value": "n"},
}
ALPACA = {"instruction": "q", "chosen": "y", "rejected": "n"}
BAD_LLAMAFACTORY_RECORDS = [
    (
        {"chosen": SHAREGPT["chosen"], "rejected": SHAREGPT["rejected"]},
        "field 'conversations' is missing",
    ),
    (SHAREGPT | {"conversations": []}, "field 'conversations' must be a non-empty list"),
    (
        SHAREGPT | {"conversations": [*SHAREGPT_TURNS, {"from": "observation", "value": "x"}]},
        "field 'conversations', message 1: role 'observation' is not supported",
    ),
    (
        SHAREGPT | {"conversations": [*SHAREGPT_TURNS, {"from": "gpt", "value": "x"}]},
        "field 'conversations' must end with a user message, got assistant",
    ),
    (
        SHAREGPT | {"conversations": [{"from": "human"}]},
        "field 'conversations', message 0 must be a message object",
    ),
    (
        SHAREGPT | {"conversations": [{"from": "human", "value": 3}]},
        "field 'conversations', message 0: 'value' must be a string, got int",
    ),
    (SHAREGPT | {"chosen": "y"}, "field 'chosen' must be a message object"),
    (
        SHAREGPT | {"rejected": {"from": "gpt", "value": " "}},
        "field 'rejected' is an empty completion",
    ),
    (
        SHAREGPT | {"chosen": {"from": "human", "value": "y"}},
        "field 'chosen' must start with an assistant message",
    ),
    (SHAREGPT | {"system": 1}, "field 'system' must be a string, got int"),
    (SHAREGPT | {"tools": "[{...}]"}, "field 'tools': tool descriptions are not supported"),
    (ALPACA | {"chosen": {"from": "gpt", "value": "y"}}, "field 'conversations' is missing"),
    (ALPACA | {"rejected": ["n"]}, "field 'rejected' must be a string, got list"),
    (ALPACA | {"rejected": ""}, "field 'rejected' is an empty completion"),
    (ALPACA | {"input": 2}, "field 'input' must be a string, got int"),
    (ALPACA | {"history": [["hi"]]}, "field 'history', turn 0 must be a [user, assistant] pair"),
    (ALPACA | {"history": "hi"}, "field 'history' must be a list, got str"),
]


@pytest.mark.parametrize(("record", "reason"), BAD_LLAMAFACTORY_RECORDS)
def test_bad_llamafactory_record_names_line_and_field(tmp_path, tokenizer, record, reason):
    path = write_lines(tmp_path / "x.jsonl", [SHAREGPT, record])
    with pytest.raises(DataError) as caught:
        load_preferences(str(path), tokenizer=tokenizer)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert reason in str(caught.value)


@pytest.mark.skipif(not LLAMAFACTORY_DEMO.exists(), reason="shared LLaMA-Factory demo not present")
def test_llamafactory_dpo_demo_file(tokenizer):
    """LLaMA-Factory's own demo file: 300 sharegpt ranking records, 80 with a system message."""
    report = load_preferences(str(LLAMAFACTORY_DEMO), tokenizer=tokenizer)
    assert report.records == 300 and len(report.examples) == 300 and not report.skipped
    assert {e.rendering for e in report.examples} == {"chat_template"}
    assert sum(e.prompt.startswith("<system> ") for e in report.examples) == 80
    first = report.examples[0]
    assert first.location == f"{LLAMAFACTORY_DEMO}[0]"
    assert first.prompt.startswith("<user> Hi! I'd like to create a new language game")
    assert first.prompt.endswith("<assistant> ")
    assert first.chosen.startswith("That sounds like a fun and engaging idea!")


# --------------------------------------------------------------------------------- system prompt


def test_system_prompt_goes_first_in_conversations_without_one(tmp_path, tokenizer):
    user = {"role": "user", "content": "hi"}
    records = [
        {  # conversational, implicit prompt
            "chosen": [user, {"role": "assistant", "content": "yes"}],
            "rejected": [user, {"role": "assistant", "content": "no"}],
        },
        SHAREGPT | {"system": "own"},  # has its own system message: kept
        ALPACA,
        GOOD,  # raw text: kept as it is
    ]
    path = write_lines(tmp_path / "x.jsonl", records)
    report = load_preferences(str(path), tokenizer=tokenizer, system_prompt="be brief")
    assert [e.prompt for e in report.examples] == [
        "<system> be brief <user> hi <assistant> ",
        "<system> own <user> q <assistant> ",
        "<system> be brief <user> q <assistant> ",
        "p1",
    ]
    without = load_preferences(str(path), tokenizer=tokenizer).examples[0]
    assert without.prompt == "<user> hi <assistant> "


# ------------------------------------------------------------------------------------ column map

COLUMNS = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
MAPPED_ROW = {"question": "q", "response_j": "c", "response_k": "r"}


def test_column_map_renames_columns_before_format_detection(tmp_path, tokenizer):
    rows = [
        {"qid": 7, "question": "q", "response_j": "good", "response_k": "bad"},
        {"qid": 8, "question": "q2", "response_j": "good2", "response_k": "bad2"},
    ]
    path = write_lines(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError, match=f"^{path}:1: field 'chosen' is missing$"):
        load_preferences(str(path))
    report = load_preferences(str(path), columns=COLUMNS)
    assert report.examples == [
        PreferenceExample("q", "good", "bad", f"{path}:1"),
        PreferenceExample("q2", "good2", "bad2", f"{path}:2"),
    ]
    # a column renamed to an alpaca field: the record is then read as alpaca
    (alpaca,) = load_preferences(
        str(path), tokenizer=tokenizer, limit=1, columns={**COLUMNS, "instruction": "question"}
    ).examples
    assert alpaca.prompt == "<user> q <assistant> " and alpaca.rendering == "chat_template"


def test_column_map_on_a_csv_file(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,response_j,response_k\nq,good,bad\n")
    (example,) = load_preferences(str(path), columns=COLUMNS).examples
    assert (example.prompt, example.chosen, example.rejected) == ("q", "good", "bad")
    assert example.location == f"{path}[row 1]"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            {"question": "q", "response_j": "good"},
            "field 'response_k' is missing (the column map reads 'rejected' from it)",
        ),
        (
            {"question": "q", "response_j": "good", "response_k": 3},
            "field 'response_k' (rejected) must be a string, got int",
        ),
        (
            {"question": "q", "response_j": " ", "response_k": "bad"},
            "field 'response_j' (chosen) is an empty completion",
        ),
        (
            {"question": None, "response_j": "a", "response_k": "b"},
            "fields 'response_j' (chosen) and 'response_k' (rejected) share no prefix",
        ),
    ],
)
def test_column_map_errors_name_line_and_the_records_column(tmp_path, row, reason):
    good = {"question": "q", "response_j": "good", "response_k": "bad"}
    path = write_lines(tmp_path / "x.jsonl", [good, row])
    with pytest.raises(DataError) as caught:
        load_preferences(str(path), columns=COLUMNS)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert reason in str(caught.value)


def test_column_map_with_an_unknown_field_names_the_file_and_field(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [GOOD])
    with pytest.raises(DataError, match=f"^{path}: column map: unknown field 'promt' "):
        load_preferences(str(path), columns={"promt": "question"})


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


MISMATCHED_FILES = [  # (name, content, what it cannot be read as)
    ("pairs.parquet", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n', "Parquet"),
    ("pairs.jsonl.gz", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
     "gzip-compressed JSON"),
    ("pairs.json.gz", b"\x1f\x8b\x08\x00cut short", "gzip-compressed JSON"),
    ("pairs.csv", b"prompt,chosen,rejected\n\xff\xfe,b,c\n", "CSV"),
    ("pairs.tsv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "TSV"),
]


@pytest.mark.parametrize(("name", "content", "kind"), MISMATCHED_FILES)
def test_a_file_whose_content_does_not_match_its_extension_is_one_line(
    tmp_path, name, content, kind
):
    """Whatever the format, the reader library's failure becomes one line naming the file."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_preferences(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot be read as {kind} (") and "\n" not in message


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


# ---------------------------------------------------------------------------------------- mixing


def test_mixture_counts_by_hand():
    sources = [
        SourceConfig("a", weight=3),
        SourceConfig("b", weight=1),
        SourceConfig("c", count=5),
        SourceConfig("d"),
    ]
    # weighted shares 3/4 and 1/4: "b" runs out first, T = 100 / (1/4) = 400 pairs
    assert mixture_counts(sources, [600, 100, 50, 7]) == [300, 100, 5, 7]
    # "a" runs out first: T = 30 / (3/4) = 40
    assert mixture_counts(sources, [30, 100, 5, 0]) == [30, 10, 5, 0]
    # exact arithmetic: shares 1/8 and 7/8 of T = 8 give 1 and 7 (in floats, 7/8 * 8 is 6.99...)
    assert mixture_counts(
        [SourceConfig("a", weight=0.1), SourceConfig("b", weight=0.7)], [1, 7]
    ) == [1, 7]


def test_a_count_larger_than_its_source_is_an_error_naming_it():
    with pytest.raises(DataError, match="^b.jsonl: count 5 is more than its 3 usable pairs$"):
        mixture_counts([SourceConfig("a.jsonl"), SourceConfig("b.jsonl", count=5)], [10, 3])


def _numbered(path: Path, n: int, tag: str) -> str:
    records = [{"prompt": f"{tag}{i}", "chosen": "c", "rejected": "r"} for i in range(n)]
    return str(write_lines(path, records))


def test_mixture_is_drawn_by_the_seed(tmp_path):
    a = _numbered(tmp_path / "a.jsonl", 20, "a")
    b = _numbered(tmp_path / "b.jsonl", 10, "b")
    sources = [SourceConfig(a, count=6), SourceConfig(b, weight=1)]

    def prompts(seed, mix=sources):
        return [[e.prompt for e in r.examples] for r in load_mixture(mix, seed=seed)]

    first = prompts(1)
    assert first == prompts(1)  # a rerun draws the same pairs
    assert first != prompts(2)
    assert (
        len(first[0]) == 6 and len(set(first[0])) == 6 and first[1] == [f"b{i}" for i in range(10)]
    )
    # in file order; a source's draw depends on the seed, its path and its count only
    assert first[0] == sorted(first[0], key=lambda p: int(p[1:]))
    assert prompts(1, sources[::-1])[::-1] == first
    reports = load_mixture(sources, seed=1)
    assert reports[0].available == 20
    assert reports[0].summary().startswith(f"{a}: 20 records, 6 of 20 pairs drawn by the mix, ")


def test_mixture_sources_read_with_their_own_column_map(tmp_path):
    a = _numbered(tmp_path / "a.jsonl", 2, "a")
    b = str(write_lines(tmp_path / "b.jsonl", [MAPPED_ROW]))
    reports = load_mixture([SourceConfig(a), SourceConfig(b, columns=COLUMNS)], seed=0)
    assert [e.prompt for r in reports for e in r.examples] == ["a0", "a1", "q"]
    with pytest.raises(DataError, match=f"^{b}:1: field 'chosen' is missing$"):
        load_mixture([SourceConfig(a), SourceConfig(b)], seed=0)


def test_load_data_follows_the_data_config(tmp_path, tokenizer):
    a = _numbered(tmp_path / "a.jsonl", 5, "a")
    b = str(write_lines(tmp_path / "b.jsonl", [MAPPED_ROW]))
    held = str(write_lines(tmp_path / "held.jsonl", [MAPPED_ROW | {"question": "h"}]))
    train, heldout = load_data(DataConfig(train=a, limit=2), tokenizer=tokenizer)
    assert [len(r.examples) for r in train] == [2] and heldout is None
    data = DataConfig(
        sources=[SourceConfig(a, count=3), SourceConfig(b)],
        columns={"instruction": "question", "chosen": "response_j", "rejected": "response_k"},
        eval=held,
        system_prompt="be brief",
    )
    data.sources[0].columns = {}  # "a" keeps its own names
    train, heldout = load_data(data, tokenizer=tokenizer, seed=3)
    assert [r.source for r in train] == [a, b] and len(train[0].examples) == 3
    assert train[1].examples[0].prompt == "<system> be brief <user> q <assistant> "
    assert heldout.examples[0].prompt == "<system> be brief <user> h <assistant> "
    assert load_data(data, tokenizer=tokenizer, seed=3)[0][0].examples == train[0].examples


def test_data_sources_and_columns_in_a_yaml_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "data:\n"
        "  columns: {prompt: question, chosen: response_j, rejected: response_k}\n"
        "  system_prompt: be brief\n"
        "  sources:\n"
        "    - {path: a.jsonl, count: 100}\n"
        "    - {path: b.jsonl, weight: 2, columns: {}}\n"
    )
    data = load_config(path).data
    assert data.sources == [
        SourceConfig("a.jsonl", count=100),
        SourceConfig("b.jsonl", weight=2.0, columns={}),
    ]
    assert data.columns == COLUMNS and data.system_prompt == "be brief"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=a.jsonl", "data.sources=[{path: b.jsonl}]"], "give one, not both"),
        (["data.limit=5", "data.sources=[{path: b.jsonl}]"], "data.limit applies to data.train"),
        (["data.sources=[{path: b.jsonl, cnt: 3}]"], "unknown key data.sources[0].cnt"),
        (["data.sources=[b.jsonl]"], "data.sources[0]: expected a mapping"),
        (["data.sources=[{count: 3}]"], "data.sources[0].path: a file or hub id is needed"),
        (["data.sources=[{path: b, count: 0}]"], "data.sources[0].count must be >= 1"),
        (["data.sources=[{path: b, weight: 0}]"], "data.sources[0].weight must be > 0"),
        (["data.sources=[{path: b, weight: 1, count: 2}]"], "give count or weight, not both"),
        (
            ["data.sources=[{path: b, columns: {promt: q}}]"],
            "data.sources[0].columns: unknown field 'promt'",
        ),
        (["data.columns.promt=question"], "data.columns: unknown field 'promt'"),
        (["data.columns.chosen=[a]"], "data.columns.chosen: expected a column name"),
        (["data.columns=question"], "data.columns: expected a mapping"),
        (["data.system_prompt=[a]"], "data.system_prompt: expected str"),
    ],
)
def test_data_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    assert message in str(caught.value)


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


# --------------------------------------------------------------------------------- end to end


@pytest.mark.skipif(not LLAMAFACTORY_DEMO.exists(), reason="shared LLaMA-Factory demo not present")
def test_training_on_the_llamafactory_demo_file(tmp_path):
    """A few steps on a slice of LLaMA-Factory's demo file, as it is, with a tiny model whose
    tokenizer has a chat template."""
    from conftest import make_model, make_tokenizer
    from helpers import read_metrics, tiny_config

    from avgalign.train import train

    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model_dir = tmp_path / "model"
    make_model(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = tiny_config(
        tmp_path,
        model_dir,
        LLAMAFACTORY_DEMO,
        **{"data.limit": 16, "train.max_steps": 2, "train.save_model": False},
    )
    train(cfg)
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    rendering = json.loads((tmp_path / "run" / "prompt_rendering.json").read_text())
    assert rendering["rendering"] == "chat_template"


def test_column_mapped_and_csv_sources_mixed_train_and_rerun_the_same(tmp_path):
    """data.sources through the trainer: a column-mapped JSONL file and a CSV file, mixed by
    count; a rerun draws the same pairs, another seed another mix, and the run trains."""
    from conftest import make_model, make_tokenizer, synthetic_records
    from helpers import read_metrics, tiny_config

    from avgalign.launching import _accelerator
    from avgalign.train import train
    from avgalign.training_data import load_pairs

    tiny_model_dir = tmp_path / "model"
    make_model(len(make_tokenizer())).save_pretrained(tiny_model_dir)
    make_tokenizer().save_pretrained(tiny_model_dir)

    records = synthetic_records(40)
    mapped = tmp_path / "se.jsonl"
    mapped.write_text("".join(json.dumps({"question": r["prompt"], "response_j": r["chosen"],
                                          "response_k": r["rejected"]}) + "\n"
                              for r in records[:20]))
    table = tmp_path / "plain.csv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerows([r["prompt"], r["chosen"], r["rejected"]] for r in records[20:])
    sources = (f"[{{path: '{mapped}', count: 12, columns: {{prompt: question, chosen: "
               f"response_j, rejected: response_k}}}}, {{path: '{table}', count: 8}}]")

    def config(seed: int, run: str):
        return tiny_config(tmp_path, tiny_model_dir, "''", **{
            "data.sources": sources, "data.eval_fraction": 0.0, "train.seed": seed,
            "train.max_steps": 2, "train.save_model": False,
            "train.output_dir": str(tmp_path / run)})

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    accelerator = _accelerator("no")
    first = load_pairs(config(0, "a"), tokenizer, accelerator).train_pairs
    again = load_pairs(config(0, "b"), tokenizer, accelerator).train_pairs
    other = load_pairs(config(1, "c"), tokenizer, accelerator).train_pairs
    assert len(first) == 20 and first == again and other != first
    mapped_prompts = {r["prompt"] for r in records[:20]}
    from_mapped = [tokenizer.decode(p.prompt_ids, skip_special_tokens=True).strip()
                   in mapped_prompts for p in first]
    assert sum(from_mapped) == 12  # 12 pairs from the column-mapped file, 8 from the CSV

    train(config(0, "run"))
    rows = read_metrics(tmp_path / "run", "train")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
