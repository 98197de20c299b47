"""Preference data: loading, format normalisation, validation, tokenisation, length diagnostics.

    load_preferences(source) -> LoadReport.examples: list[PreferenceExample]   (texts)
    tokenize_pairs(examples, tokenizer) -> list[TokenizedPair], TruncationReport (token ids)
    length_stats(pairs) -> dict; format_length_stats(stats) -> str              (diagnostics)
    prompt_rendering(examples, tokenizer) -> dict; write_/read_prompt_rendering  (provenance)

Record formats (TRL's dataset conventions and LLaMA-Factory's ranking formats), detected per
record:
- explicit: "prompt", "chosen" and "rejected" strings;
- conversational: "prompt", "chosen", "rejected" as lists of {"role", "content"} messages, or only
  "chosen" and "rejected" as whole conversations whose shared leading messages are the prompt.
  Rendered to text with the tokenizer's chat template;
- implicit prompt strings (Anthropic HH-RLHF): only "chosen" and "rejected", each a whole dialogue
  "\\n\\nHuman: ... \\n\\nAssistant: ..."; see `split_implicit_prompt`;
- LLaMA-Factory's sharegpt ranking format: "conversations" (or "messages"), a list of
  {"from", "value"} or {"role", "content"} messages ending with a user turn, and "chosen" and
  "rejected" as single assistant messages; an optional "system" string. Roles human/user,
  gpt/assistant and system. Rendered with the chat template; see `_sharegpt_values`;
- LLaMA-Factory's alpaca ranking format: "instruction", optional "input", "system" and "history"
  ([user, assistant] pairs before it), "chosen" and "rejected" strings. The user message is
  instruction + "\\n" + input (just the instruction when input is empty), rendered with the chat
  template as LLaMA-Factory does; see `_alpaca_values`.
A column map (`columns`, e.g. {"prompt": "question", "chosen": "response_j"}) renames a record's
fields before its format is detected. A system prompt (`system_prompt`) is prepended, as a system
message, to every conversation rendered with the chat template that has none.
Each example records how its prompt text was made (`PreferenceExample.rendering`): "chat_template"
for conversational records, "raw" for text taken as it is. A trained model's folder keeps that
record (`prompt_rendering`, PROMPT_RENDERING_FILE), so that evaluation renders its prompts as
training did.

Completions end as the model generates them, with one stop token (`stop_token_ids`: EOS, or the
chat template's end-of-turn token). A completion that already ends with one gets nothing more; one
rendered by a chat template ("...<|im_end|>\\n") loses the whitespace after its end-of-turn token,
which generation, stopping there, can never produce; any other (raw text) gets EOS appended. See
`tokenize_pairs`.

A bad record raises DataError (on_error="error") or is listed in LoadReport.skipped with its
location and reason (on_error="skip"): nothing is dropped silently.

Several sources are mixed by `load_mixture`: each gives all its pairs, a count, or a share
(weight) of the mix, drawn by a seed; see `mixture_counts`.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import statistics
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import COLUMN_TARGETS

if TYPE_CHECKING:
    from .config import DataConfig, SourceConfig

ON_ERROR = ("error", "skip")
ASSISTANT_MARKER = "\n\nAssistant:"
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_TABLE_SUFFIXES = (".csv", ".tsv")
_SUFFIXES = (*_JSON_SUFFIXES, ".parquet", *_TABLE_SUFFIXES)
_FIELDS = ("prompt", "chosen", "rejected")
# sharegpt roles ("from") and OpenAI-style roles ("role") as chat template roles
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
RENDERINGS = ("raw", "chat_template")  # how a PreferenceExample's prompt text was made
PROMPT_RENDERING_FILE = "prompt_rendering.json"
PROMPT_PLACEHOLDER = "{prompt}"  # the user message of the chat template probe
# Content no chat template rewrites (no surrounding whitespace to trim, no markup), used to find
# what a template writes after an assistant message.
_SENTINEL = "AVGALIGNSENTINEL"


class DataError(ValueError):
    """A bad record or source. The message is one line, '<location>: <reason>', for example
    "data/x.jsonl:17: field 'chosen' is missing"."""

    def __init__(self, location: str, reason: str):
        super().__init__(f"{location}: {reason}")
        self.location = location
        self.reason = reason


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as text; the full texts are prompt + chosen and prompt + rejected.

    `location` names the record: "path/file.jsonl:17" (1-based line), "path/file.parquet[3]" or
    "path/file.json[3]" (0-based index in a list), "hub-id[split]:3" (0-based row).
    `rendering` says how the prompt text was made: "chat_template" (rendered from messages by the
    tokenizer's chat template) or "raw" (the record's text as it is).
    """

    prompt: str
    chosen: str
    rejected: str
    location: str
    rendering: str = "raw"


@dataclass
class TokenizedPair:
    """Token ids of one pair. The completions hold completion tokens only and end with one stop
    token (`stop_token_ids`) unless truncation cut them."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def mean_completion_length(pairs: Sequence[TokenizedPair]) -> float:
    """Mean |y| over the chosen and the rejected completions of the pairs."""
    if not pairs:
        raise ValueError("no pairs")
    total = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return total / (2 * len(pairs))


@dataclass
class LoadReport:
    """What `load_preferences` read: `records` counts every record read, usable or not.
    `available` is set when a mix drew `examples` from a source's usable pairs: how many there
    were (`load_mixture`)."""

    source: str
    records: int = 0
    examples: list[PreferenceExample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    warnings: list[str] = field(default_factory=list)  # "<location>: <what>"
    available: int | None = None

    def summary(self, max_notes: int = 5) -> str:
        pairs = f"{len(self.examples)} pairs"
        if self.available is not None:
            pairs = f"{len(self.examples)} of {self.available} pairs drawn by the mix"
        head = (
            f"{self.source}: {self.records} records, {pairs}, "
            f"{len(self.skipped)} skipped, {len(self.warnings)} warnings"
        )
        notes = [f"  skipped {loc}: {reason}" for loc, reason in self.skipped]
        notes += [f"  warning {text}" for text in self.warnings]
        if len(notes) > max_notes:
            notes = [*notes[:max_notes], f"  ... and {len(notes) - max_notes} more"]
        return "\n".join([head, *notes])


@dataclass
class TruncationReport:
    """What `tokenize_pairs` cut. The truncation counts are over the kept pairs; `dropped` lists
    the locations of pairs that could not fit at all (on_error="skip")."""

    pairs: int = 0
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs: prompt truncated in {self.prompt_truncated}, chosen in "
            f"{self.chosen_truncated}, rejected in {self.rejected_truncated}; "
            f"{len(self.dropped)} dropped"
        )


# ---------------------------------------------------------------------------------------- sources


def load_preferences(
    source: str,
    *,
    split: str = "train",
    tokenizer: Any = None,
    on_error: str = "error",
    limit: int | None = None,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> LoadReport:
    """Read preference pairs from a local file or a Hugging Face Hub dataset.

    `source` is a local .json (a list of records, or JSON lines), .jsonl, .json.gz, .jsonl.gz,
    .parquet, .csv or .tsv file (a header row naming the fields; read by `datasets`, every cell
    as text), or else a Hub dataset id, optionally with a data folder as "id:data_dir"
    (e.g. "Anthropic/hh-rlhf:harmless-base"), loaded with `datasets.load_dataset` at `split`.
    A missing path that looks like a path is an error, not a Hub id to try. Blank JSON lines are
    not records. `tokenizer` (with a chat template) is needed only for conversational records.
    `on_error`: "error" raises DataError at the first bad record, "skip" records it in
    `report.skipped`. Reading stops once `limit` examples are kept.
    `columns` maps record fields (COLUMN_TARGETS) to the columns that hold them, e.g.
    {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}: each record's
    mapped columns are renamed before its format is detected, other columns stay as they are; a
    record without a mapped column is a bad record, and errors name the record's own column.
    `system_prompt`: a system message put first in every conversation rendered with the chat
    template that starts without one; raw text records are kept as they are.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {ON_ERROR}")
    for target, column in (columns or {}).items():
        if target not in COLUMN_TARGETS:
            raise DataError(
                source,
                f"column map: unknown field '{target}' (for column {column!r}); one of "
                + ", ".join(COLUMN_TARGETS),
            )
    report = LoadReport(source=source)
    for location, record in _iter_records(source, split):
        if limit is not None and len(report.examples) >= limit:
            break
        report.records += 1
        try:
            example, warnings = _normalize_record(
                record, location, tokenizer, columns, system_prompt
            )
        except DataError as err:
            if on_error == "error":
                raise
            report.skipped.append((err.location, err.reason))
            continue
        report.examples.append(example)
        report.warnings.extend(warnings)
    return report


def _iter_records(source: str, split: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs. A JSON-lines record is still the bytes of its line, so that a
    line that does not decode is one bad record (see `_decode_line`), not a failed file."""
    path = Path(source).expanduser()
    name = path.name.lower()
    if path.is_file():
        if name.endswith(".parquet"):
            rows = _read_parquet(path, source)
            yield from ((f"{source}[{i}]", row) for i, row in enumerate(rows))
        elif name.endswith(_JSON_SUFFIXES):
            yield from _iter_json(path, source)
        elif name.endswith(_TABLE_SUFFIXES):
            rows = _read_table(path, source, "\t" if name.endswith(".tsv") else ",")
            yield from ((f"{source}[row {i + 1}]", row) for i, row in enumerate(rows))
        else:
            raise DataError(source, f"unknown file type; expected one of {', '.join(_SUFFIXES)}")
    elif _looks_like_path(source):
        raise DataError(source, "no such file")
    else:
        import datasets

        hub_id, _, data_dir = source.partition(":")
        rows = datasets.load_dataset(hub_id, data_dir=data_dir or None, split=split)
        yield from ((f"{source}[{split}]:{i}", row) for i, row in enumerate(rows))


def _unreadable(source: str, kind: str, error: Exception) -> DataError:
    """The one-line error for a file the reader library cannot read as `kind` (its content does
    not match its extension, or it is damaged): the library's own first line, no traceback."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return DataError(source, f"cannot be read as {kind} ({type(error).__name__}: {detail})")


def _read_parquet(path: Path, source: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
        raise _unreadable(source, "Parquet", e) from None


def _read_table(path: Path, source: str, delimiter: str):
    import csv

    import datasets

    try:
        with path.open(newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle, delimiter=delimiter), [])
        # every cell as text, as written: no number parsing, an empty cell stays ""
        return datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            delimiter=delimiter,
            features=datasets.Features({c: datasets.Value("string") for c in header}),
            keep_default_na=False,
        )
    except Exception as e:  # UnicodeDecodeError, csv.Error, datasets' generation errors
        raise _unreadable(source, "CSV" if delimiter == "," else "TSV", e) from None


def _looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name" (plus ":data_dir"); anything else shaped like a path."""
    hub_id = source.partition(":")[0]
    return (
        source.lower().endswith(_SUFFIXES)
        or source.startswith(("/", ".", "~"))
        or hub_id.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _iter_json(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    try:
        yield from _iter_json_file(path, source)
    except (OSError, EOFError, zlib.error) as e:  # a .gz that is not gzip, or is cut short
        raise _unreadable(source, "gzip-compressed JSON", e) from None


def _iter_json_file(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    with gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb") as handle:
        if ".jsonl" in path.name.lower():
            yield from _json_lines(handle, source)
            return
        data = handle.read()
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        records = None  # JSON lines, or broken: read line by line to name the bad line
    if isinstance(records, list):
        yield from ((f"{source}[{i}]", record) for i, record in enumerate(records))
    else:
        yield from _json_lines(data.splitlines(), source)


def json_records(path: Path, source: str) -> Iterator[tuple[str, Any]]:
    """(location, record) of each record of a JSON or JSON-lines file, every line decoded; a line
    that is not valid UTF-8 or JSON raises DataError naming it."""
    for location, record in _iter_json(path, source):
        yield location, _decode_line(record, location) if isinstance(record, bytes) else record


def _json_lines(lines: Iterable[bytes], source: str) -> Iterator[tuple[str, bytes]]:
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield f"{source}:{number}", line


def _decode_line(line: bytes, location: str) -> Any:
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(location, f"invalid UTF-8 at byte {err.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(location, f"not valid JSON ({err.msg} at column {err.colno})") from None


def load_data(
    data: DataConfig, *, tokenizer: Any = None, seed: int = 0
) -> tuple[list[LoadReport], LoadReport | None]:
    """(training reports, held-out report or None) as a data config names them: `data.train`
    (read up to `data.limit` pairs) or the mix of `data.sources` drawn with `seed`, one report per
    source; `data.eval` when set. `data.columns` and `data.system_prompt` apply to every source
    (a source's own `columns` replace `data.columns`)."""
    common = {
        "split": data.split,
        "tokenizer": tokenizer,
        "on_error": data.on_error,
        "system_prompt": data.system_prompt,
    }
    if data.sources:
        train = load_mixture(data.sources, seed=seed, columns=data.columns, **common)
    else:
        train = [load_preferences(data.train, limit=data.limit, columns=data.columns, **common)]
    held = load_preferences(data.eval, columns=data.columns, **common) if data.eval else None
    return train, held


def load_mixture(
    sources: Sequence[SourceConfig],
    *,
    seed: int,
    columns: Mapping[str, str] | None = None,
    **options: Any,
) -> list[LoadReport]:
    """One report per source, in order, each source read whole by `load_preferences` (`options`:
    split, tokenizer, on_error, system_prompt; `columns` unless the source has its own), its
    `examples` then cut to the pairs it gives the mix (`mixture_counts`), in file order, and
    `available` set to its usable pairs. Which pairs a source gives depends only on `seed`, its
    path and how many it gives: the same seed draws the same pairs on a rerun.
    """
    reports = [
        load_preferences(s.path, columns=columns if s.columns is None else s.columns, **options)
        for s in sources
    ]
    takes = mixture_counts(sources, [len(r.examples) for r in reports])
    for source, report, take in zip(sources, reports, takes, strict=True):
        report.available = len(report.examples)
        # a string seed is hashed with SHA-512: the same draw in every process and Python run
        rng = random.Random(f"{seed}:{source.path}")
        kept = sorted(rng.sample(range(report.available), take))
        report.examples = [report.examples[i] for i in kept]
    return reports


def mixture_counts(sources: Sequence[SourceConfig], sizes: Sequence[int]) -> list[int]:
    """How many pairs each source gives the mix, from its usable pairs `sizes`:
    - `count` N: N pairs; DataError naming the source when it has fewer;
    - `weight` w: the sources with a weight together give the largest mix, without repeating a
      pair, in which each gives the share w / (sum of their weights): with shares p_i and sizes
      n_i, the mix has T = min_i n_i / p_i pairs and source i gives floor(p_i * T) (the source
      that runs out first gives all its pairs). Weights 3 and 1 over 600 and 100 pairs: T = 400,
      300 and 100 pairs;
    - neither: all its pairs.
    """
    # Exact fractions of the weights as written (0.7 is 7/10, not the float nearest to it): the
    # limiting source gives exactly all its pairs, and shares in proportion exactly, not 1 fewer.
    weights = [None if s.weight is None else Fraction(str(s.weight)) for s in sources]
    total_weight = sum(w for w in weights if w is not None)
    mix_size = min(
        (n * total_weight / w for w, n in zip(weights, sizes, strict=True) if w is not None),
        default=0,
    )
    takes = []
    for source, weight, size in zip(sources, weights, sizes, strict=True):
        if source.count is not None:
            if source.count > size:
                raise DataError(
                    source.path, f"count {source.count} is more than its {size} usable pairs"
                )
            takes.append(source.count)
        elif weight is not None:
            takes.append(math.floor(weight / total_weight * mix_size))
        else:
            takes.append(size)
    return takes


# ---------------------------------------------------------------------------------------- formats


def _normalize_record(
    record: Any,
    location: str,
    tokenizer: Any,
    columns: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
) -> tuple[PreferenceExample, list[str]]:
    """The record as a PreferenceExample plus warnings; DataError if it is bad."""
    if isinstance(record, bytes):
        record = _decode_line(record, location)
    if not isinstance(record, Mapping):
        raise DataError(location, f"record must be a JSON object, got {_type_name(record)}")
    if not columns:
        return _normalize_fields(record, location, tokenizer, system_prompt)
    renamed = dict(record)
    for target, column in columns.items():
        if column not in record:
            raise DataError(
                location, f"field '{column}' is missing (the column map reads '{target}' from it)"
            )
        renamed[target] = record[column]
    try:
        return _normalize_fields(renamed, location, tokenizer, system_prompt)
    except DataError as err:
        raise DataError(location, _name_columns(err.reason, columns)) from None


def _name_columns(reason: str, columns: Mapping[str, str]) -> str:
    """`reason` with each field the column map renamed called by its column as well:
    "field 'chosen' must be ..." -> "field 'response_j' (chosen) must be ..."."""

    def name(match: re.Match) -> str:
        target = match.group(1)
        return f"'{columns[target]}' ({target})" if target in columns else match.group(0)

    return re.sub(r"(?:(?<=field )|(?<=fields )|(?<=' and ))'(\w+)'", name, reason)


def _normalize_fields(
    record: Mapping, location: str, tokenizer: Any, system_prompt: str | None
) -> tuple[PreferenceExample, list[str]]:
    # A Hub or Parquet table has every column in every row, with None where a value is absent.
    values = {name: record.get(name) for name in _FIELDS}
    for name in ("chosen", "rejected"):
        if values[name] is None:
            raise DataError(location, f"field '{name}' is missing")
    if any(record.get(name) is not None for name in ("conversations", "messages")) or any(
        isinstance(values[name], Mapping) for name in ("chosen", "rejected")
    ):
        values = _sharegpt_values(record, location)
    elif record.get("instruction") is not None:
        values = _alpaca_values(record, location)
    warnings = []
    rendering = "raw"
    if any(isinstance(value, list) for value in values.values()):
        prompt, chosen, rejected = _render_conversation(values, location, tokenizer, system_prompt)
        rendering = "chat_template"
    else:
        for name, value in values.items():
            if value is not None and not isinstance(value, str):
                raise DataError(
                    location, f"field '{name}' must be a string, got {_type_name(value)}"
                )
        prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected, location)
            if ASSISTANT_MARKER in chosen or ASSISTANT_MARKER in rejected:
                warnings.append(
                    f"{location}: chosen and rejected diverge before their last Assistant turn; "
                    "the completions span several turns"
                )
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(location, f"field '{name}' is an empty completion")
    if chosen == rejected:
        warnings.append(f"{location}: chosen and rejected are identical")
    return PreferenceExample(prompt, chosen, rejected, location, rendering), warnings


def split_implicit_prompt(chosen: str, rejected: str, location: str = "") -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) of two whole HH-RLHF style dialogues.

    Rule: the prompt is the longest common prefix of the two texts, cut back to end right after
    the last "\\n\\nAssistant:" that lies inside it; the completions are what follows in each text
    (they start with the space after the colon). Where the dialogues diverge before their last
    Assistant turn the completions span several turns; that is still a valid pair. DataError if
    the common prefix holds no "\\n\\nAssistant:" or a remainder is empty or whitespace. On the
    HH-RLHF harmless-base test split this keeps 2,308 of 2,312 pairs; the 4 others have an empty
    chosen reply.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise DataError(
            location, "fields 'chosen' and 'rejected' share no prefix ending in '\\n\\nAssistant:'"
        )
    cut += len(ASSISTANT_MARKER)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text[cut:].strip():
            raise DataError(location, f"field '{name}' is empty after the shared prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _sharegpt_values(record: Mapping, location: str) -> dict[str, list[dict]]:
    """A LLaMA-Factory sharegpt ranking record as conversational prompt, chosen and rejected
    messages: the conversation is the prompt (it must end with a user message), its "system"
    string, if any, a system message before it; "chosen" and "rejected" are one message each."""
    name = "conversations" if record.get("conversations") is not None else "messages"
    turns = record.get(name)
    if turns is None:
        raise DataError(
            location,
            "field 'conversations' is missing: a record whose 'chosen' or 'rejected' is one "
            "message object is in LLaMA-Factory's sharegpt format",
        )
    if not isinstance(turns, list) or not turns:
        raise DataError(location, f"field '{name}' must be a non-empty list of messages")
    prompt = [
        _sharegpt_message(turn, f"field '{name}', message {i}", location)
        for i, turn in enumerate(turns)
    ]
    if prompt[-1]["role"] != "user":
        raise DataError(
            location, f"field '{name}' must end with a user message, got {prompt[-1]['role']}"
        )
    system = _optional_string(record, "system", location)
    if system and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    if record.get("tools"):
        raise DataError(location, "field 'tools': tool descriptions are not supported")
    values: dict[str, list[dict]] = {"prompt": prompt}
    for completion in ("chosen", "rejected"):
        message = _sharegpt_message(record[completion], f"field '{completion}'", location)
        if not message["content"].strip():
            raise DataError(location, f"field '{completion}' is an empty completion")
        values[completion] = [message]
    return values


def _sharegpt_message(message: Any, where: str, location: str) -> dict[str, str]:
    """{"role", "content"} of a sharegpt {"from", "value"} or OpenAI-style {"role", "content"}
    message; `where` names it in errors ("field 'conversations', message 2")."""
    keys = (
        ("from", "value")
        if isinstance(message, Mapping) and "from" in message
        else ("role", "content")
    )
    if not isinstance(message, Mapping) or not all(k in message for k in keys):
        raise DataError(
            location,
            f"{where} must be a message object, {{'from', 'value'}} or {{'role', 'content'}}, "
            f"got {_type_name(message)}",
        )
    role, content = message[keys[0]], message[keys[1]]
    if role not in _ROLES:
        raise DataError(
            location, f"{where}: role {role!r} is not supported; one of {', '.join(_ROLES)}"
        )
    if not isinstance(content, str):
        raise DataError(
            location, f"{where}: '{keys[1]}' must be a string, got {_type_name(content)}"
        )
    return {"role": _ROLES[role], "content": content}


def _alpaca_values(record: Mapping, location: str) -> dict[str, list[dict]]:
    """A LLaMA-Factory alpaca ranking record as conversational messages: [system], the
    "history" turns, then the user message instruction + "\\n" + input (the instruction alone
    when input is empty); "chosen" and "rejected" strings as assistant messages."""
    instruction = _optional_string(record, "instruction", location)
    query = _optional_string(record, "input", location)
    system = _optional_string(record, "system", location)
    prompt = [{"role": "system", "content": system}] if system else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(location, f"field 'history' must be a list, got {_type_name(history)}")
    for i, turn in enumerate(history):
        pair = isinstance(turn, list | tuple) and len(turn) == 2
        if not (pair and all(isinstance(t, str) for t in turn)):
            raise DataError(
                location, f"field 'history', turn {i} must be a [user, assistant] pair of strings"
            )
        prompt += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt.append({"role": "user", "content": f"{instruction}\n{query}" if query else instruction})
    values: dict[str, list[dict]] = {"prompt": prompt}
    for completion in ("chosen", "rejected"):
        text = record[completion]
        if not isinstance(text, str):
            raise DataError(
                location, f"field '{completion}' must be a string, got {_type_name(text)}"
            )
        if not text.strip():
            raise DataError(location, f"field '{completion}' is an empty completion")
        values[completion] = [{"role": "assistant", "content": text}]
    return values


def _optional_string(record: Mapping, name: str, location: str) -> str:
    """The record's string field `name`, "" when absent or null."""
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(location, f"field '{name}' must be a string, got {_type_name(value)}")
    return value


def _render_conversation(
    values: dict[str, Any], location: str, tokenizer: Any, system_prompt: str | None = None
) -> tuple[str, str, str]:
    """Prompt and completion texts of a conversational record, through the chat template: the
    prompt is rendered with the generation prompt, a completion is the rendering of prompt +
    completion messages with the prompt's rendering removed from its front. `system_prompt`, when
    given, is put first in a prompt that starts without a system message."""
    from jinja2 import TemplateError  # what a chat template's raise_exception raises

    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        # Not a bad record but a missing setting: raised whatever on_error says.
        raise ValueError(
            f"{location}: conversational records need a tokenizer with a chat template"
        )
    for name, value in values.items():
        if value is not None and not (isinstance(value, list) and all(map(_is_message, value))):
            raise DataError(
                location, f"field '{name}' must be a list of {{'role', 'content'}} messages"
            )
    prompt, chosen, rejected = values["prompt"], values["chosen"], values["rejected"]
    if prompt is None:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not prompt:
            raise DataError(location, "fields 'chosen' and 'rejected' share no leading messages")
    if system_prompt and (not prompt or prompt[0]["role"] != "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    texts = {}
    try:
        prompt_text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True
        )
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if not messages:
                raise DataError(location, f"field '{name}' is an empty completion")
            if messages[0]["role"] != "assistant":
                raise DataError(location, f"field '{name}' must start with an assistant message")
            full = tokenizer.apply_chat_template(prompt + messages, tokenize=False)
            if not full.startswith(prompt_text):
                raise DataError(
                    location,
                    f"field '{name}': the chat template's rendering of prompt + "
                    "completion does not start with the rendering of the prompt",
                )
            texts[name] = full[len(prompt_text) :]
    except TemplateError as err:
        raise DataError(location, f"chat template failed: {err}") from None
    return prompt_text, texts["chosen"], texts["rejected"]


def _is_message(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------- tokenisation


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids at which generation of a completion stops: the tokenizer's EOS, then the chat
    template's end-of-turn token when the tokenizer has a chat template and it is another token.

    The end-of-turn token is read from the template itself: a user message and an assistant
    message whose content is a sentinel are rendered, and the text the template writes right
    after the sentinel, whitespace stripped, is the end-of-turn token if it is exactly one added
    (special) token of the tokenizer: "<|im_end|>" (SmolLM2, Qwen), "<|eot_id|>" (Llama 3),
    "<end_of_turn>" (Gemma). A template that fails to render, or writes nothing or ordinary text
    there, adds nothing. No duplicates; EOS first.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = [] if eos is None else [int(eos)]
    end_of_turn = _end_of_turn_id(tokenizer)
    if end_of_turn is not None and end_of_turn not in ids:
        ids.append(end_of_turn)
    return ids


def _end_of_turn_id(tokenizer: Any) -> int | None:
    if not getattr(tokenizer, "chat_template", None):
        return None
    from jinja2 import TemplateError

    messages = [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": _SENTINEL},
    ]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except (TemplateError, ValueError, TypeError):
        return None
    if not isinstance(text, str) or _SENTINEL not in text:
        return None
    after = text[text.rindex(_SENTINEL) + len(_SENTINEL) :].strip()
    added = getattr(tokenizer, "get_added_vocab", dict)()
    token_id = added.get(after) if after else None
    return None if token_id is None else int(token_id)


def encode_prompt_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompt texts as training conditions on them: tokenizer(text,
    add_special_tokens=True), so a BOS the tokenizer adds stays, with a doubled BOS (from a chat
    template that writes it too) made single. Evaluation encodes prompts with this too."""
    if not texts:
        return []
    # One batched call: the fast tokenizers parallelise over the batch.
    rows = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [row[1:] if bos is not None and row[:2] == [bos, bos] else list(row) for row in rows]


def _end_completion(
    ids: list[int], stops: set[int], eos: int, is_blank: Callable[[int], bool]
) -> list[int]:
    """Completion ids ending with one stop token (the rule in `tokenize_pairs`)."""
    end = len(ids)
    while end > 0 and ids[end - 1] not in stops and is_blank(ids[end - 1]):
        end -= 1
    if end > 0 and ids[end - 1] in stops:
        # generation stops at the stop token: whitespace after it can never be generated
        return ids[:end]
    return [*ids, eos]


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: str = "error",
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Token ids of each pair, truncated so that len(prompt) + len(completion) <= max_length.

    prompt_ids = `encode_prompt_texts` (tokenizer(prompt, add_special_tokens=True), a BOS stays,
    a doubled one is made single). A completion ends as the model generates it, with exactly one
    stop token (`stop_token_ids`: EOS, or the chat template's end-of-turn token); with
    ids = tokenizer(completion, add_special_tokens=False):
    - ids ending with a stop token: kept as they are, nothing appended;
    - ids ending with a stop token followed only by whitespace tokens (a token whose decoded text
      is blank), as a chat template renders a turn ("...<|im_end|>\\n"): the whitespace tokens
      are dropped (generation stops at the stop token, so they can never be generated), nothing
      appended;
    - otherwise (raw text, e.g. HH-RLHF): ids + [eos_token_id].
    So |y| = len(completion ids) counts the content and one stop token.

    Truncation, with L the longer completion and k = max_prompt_length (default max_length // 2):
    1. if len(prompt) + L > max_length, the prompt is cut from the LEFT to
       max(max_length - L, k) tokens: only as much as the longer completion needs, but never
       below k tokens, which guarantees the completions max_length - k tokens;
    2. each completion is cut from the RIGHT to max_length - len(prompt) (a cut one loses its stop
       token).
    A pair whose kept prompt leaves no room for one completion token (possible only when
    k >= max_length) raises DataError under on_error="error" and is dropped and listed in the
    report under on_error="skip".
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {ON_ERROR}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    keep = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or keep < 1:
        raise ValueError(
            f"need max_length >= 2 and max_prompt_length >= 1, got {max_length}, {keep}"
        )
    stops = set(stop_token_ids(tokenizer))
    blank: dict[int, bool] = {}

    def is_blank(token: int) -> bool:
        if token not in blank:
            blank[token] = not tokenizer.decode([token]).strip()
        return blank[token]

    def completions(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        rows = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        return [_end_completion(list(row), stops, eos, is_blank) for row in rows]

    prompts = encode_prompt_texts(tokenizer, [e.prompt for e in examples])
    chosens = completions([e.chosen for e in examples])
    rejecteds = completions([e.rejected for e in examples])
    report = TruncationReport(pairs=len(examples))
    pairs = []
    for example, prompt, chosen, rejected in zip(
        examples, prompts, chosens, rejecteds, strict=True
    ):
        longest = max(len(chosen), len(rejected))
        prompt_cut = False
        if len(prompt) + longest > max_length:
            kept = max(max_length - longest, keep)
            prompt_cut = len(prompt) > kept
            prompt = prompt[-kept:]
        room = max_length - len(prompt)
        if room < 1:
            if on_error == "error":
                raise DataError(
                    example.location,
                    f"the prompt keeps {len(prompt)} tokens (max_prompt_length={keep}), leaving "
                    f"no room for a completion within max_length={max_length}",
                )
            report.dropped.append(example.location)
            continue
        report.prompt_truncated += prompt_cut
        report.chosen_truncated += len(chosen) > room
        report.rejected_truncated += len(rejected) > room
        pairs.append(TokenizedPair(prompt, chosen[:room], rejected[:room]))
    return pairs, report


# ------------------------------------------------------------------------------------- provenance


def prompt_rendering(
    examples: Sequence[PreferenceExample], tokenizer: Any, system_prompt: str | None = None
) -> dict:
    """How a dataset's prompts were rendered, as a JSON-able record for the trained model's folder:

    {"rendering": "raw" | "chat_template" | "mixed" (the examples' `rendering`, or "mixed" when
    they differ), "system_prompt": the system message training put first in conversations
    rendered with the chat template that had none (`data.system_prompt`; None when unset),
    "chat_template_probe": `chat_template_probe(tokenizer, system_prompt)`, what the template
    wraps around a prompt, or None when no example used the chat template}.
    A record without "system_prompt" (written before it existed) reads as no system prompt.
    """
    kinds = {e.rendering for e in examples}
    if not kinds:
        raise ValueError("prompt_rendering needs at least one example")
    system_prompt = system_prompt or None  # "" puts no system message (_render_conversation)
    templated = "chat_template" in kinds
    return {
        "rendering": next(iter(kinds)) if len(kinds) == 1 else "mixed",
        "system_prompt": system_prompt,
        "chat_template_probe": chat_template_probe(tokenizer, system_prompt) if templated else None,
    }


def user_turn(content: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The prompt messages of a conversational record with one user message, as training renders
    it: the user message, after a system message when `system_prompt` is set (not empty)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": content}]


def chat_template_probe(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The chat template's rendering of `user_turn("{prompt}", system_prompt)`, with the
    generation prompt: what training wraps around a prompt (the system prompt given, or any one
    the template adds)."""
    return tokenizer.apply_chat_template(
        user_turn(PROMPT_PLACEHOLDER, system_prompt),
        add_generation_prompt=True,
        tokenize=False,
    )


def write_prompt_rendering(folder: str | Path, record: dict) -> Path:
    """Write `record` (from `prompt_rendering`) to folder/PROMPT_RENDERING_FILE; returns the path.
    Atomic: a reader sees the old file or the new one, never half of one."""
    path = Path(folder) / PROMPT_RENDERING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def write_heldout(path: str | Path, examples: Sequence[PreferenceExample]) -> None:
    """Held-out pairs as explicit text records, prompts as training rendered them: a file that
    `avgalign evaluate --prompts` reads to sample on prompts the policy was not trained on."""
    rows = (
        {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "source": e.location}
        for e in examples
    )
    write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file renamed over `path`: a reader sees the old file or the new
    one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_prompt_rendering(folder: str | Path) -> dict | None:
    """The record `write_prompt_rendering` wrote into `folder`, or None when there is none (no
    such file, or `folder` is not a local folder, e.g. a hub id). DataError if it is unreadable."""
    path = Path(folder).expanduser() / PROMPT_RENDERING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(str(path), f"not valid JSON ({err})") from None
    kinds = (*RENDERINGS, "mixed")
    if not isinstance(record, dict) or record.get("rendering") not in kinds:
        raise DataError(str(path), f"'rendering' must be one of {', '.join(kinds)}")
    if not isinstance(record.get("system_prompt"), str | None):
        raise DataError(str(path), "'system_prompt' must be a string or null")
    return record


# ------------------------------------------------------------------------------------ diagnostics


def length_stats(pairs: Sequence[TokenizedPair]) -> dict:
    """Token-length statistics of tokenised pairs, for spotting length bias before training.

    Returns {"pairs": n, "prompt" | "chosen" | "rejected": {"mean", "median", "p95", "max"},
    "chosen_longer": share of pairs with len(chosen) > len(rejected), "equal": share with equal
    lengths, "mean_gap": mean of len(chosen) - len(rejected)}. p95 interpolates linearly between
    order statistics (numpy's default): position 0.95 * (n - 1) in the sorted lengths.
    """
    if not pairs:
        raise ValueError("length_stats needs at least one pair")
    n = len(pairs)
    lengths = {
        "prompt": [len(p.prompt_ids) for p in pairs],
        "chosen": [len(p.chosen_ids) for p in pairs],
        "rejected": [len(p.rejected_ids) for p in pairs],
    }
    gaps = [c - r for c, r in zip(lengths["chosen"], lengths["rejected"], strict=True)]
    stats: dict[str, Any] = {"pairs": n}
    for name, values in lengths.items():
        ordered = sorted(values)
        position = 0.95 * (n - 1)
        low = math.floor(position)
        high = min(low + 1, n - 1)
        stats[name] = {
            "mean": statistics.fmean(values),
            "median": float(statistics.median(values)),
            "p95": ordered[low] + (position - low) * (ordered[high] - ordered[low]),
            "max": ordered[-1],
        }
    stats["chosen_longer"] = sum(gap > 0 for gap in gaps) / n
    stats["equal"] = sum(gap == 0 for gap in gaps) / n
    stats["mean_gap"] = statistics.fmean(gaps)
    return stats


def format_length_stats(stats: dict) -> str:
    """A small aligned text table of `length_stats` output (the CLI's data-stats command)."""
    columns = ("mean", "median", "p95", "max")
    lines = [f"{'tokens':<10}" + "".join(f"{c:>9}" for c in columns)]
    for name in ("prompt", "chosen", "rejected"):
        lines.append(f"{name:<10}" + "".join(f"{stats[name][c]:>9.1f}" for c in columns))
    lines.append(
        f"{stats['pairs']} pairs; chosen longer than rejected in {stats['chosen_longer']:.1%}, "
        f"equal in {stats['equal']:.1%}; mean gap chosen - rejected {stats['mean_gap']:+.1f} tokens"
    )
    return "\n".join(lines)
