"""Preference data: loading, format normalisation, validation, tokenisation, length diagnostics.

    load_preferences(source) -> LoadReport.examples: list[PreferenceExample]   (texts)
    tokenize_pairs(examples, tokenizer) -> list[TokenizedPair], TruncationReport (token ids)
    length_stats(pairs) -> dict; format_length_stats(stats) -> str              (diagnostics)

Record formats (TRL dataset conventions), detected per record:
- explicit: "prompt", "chosen" and "rejected" strings;
- conversational: "prompt", "chosen", "rejected" as lists of {"role", "content"} messages, or only
  "chosen" and "rejected" as whole conversations whose shared leading messages are the prompt.
  Rendered to text with the tokenizer's chat template;
- implicit prompt strings (Anthropic HH-RLHF): only "chosen" and "rejected", each a whole dialogue
  "\\n\\nHuman: ... \\n\\nAssistant: ..."; see `split_implicit_prompt`.

A bad record raises DataError (on_error="error") or is listed in LoadReport.skipped with its
location and reason (on_error="skip"): nothing is dropped silently.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ON_ERROR = ("error", "skip")
ASSISTANT_MARKER = "\n\nAssistant:"
_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
_SUFFIXES = (*_JSON_SUFFIXES, ".parquet")
_FIELDS = ("prompt", "chosen", "rejected")


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
    """

    prompt: str
    chosen: str
    rejected: str
    location: str


@dataclass
class TokenizedPair:
    """Token ids of one pair. The completions hold completion tokens only and end with the EOS id
    unless truncation cut them."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass
class LoadReport:
    """What `load_preferences` read: `records` counts every record read, usable or not."""

    source: str
    records: int = 0
    examples: list[PreferenceExample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    warnings: list[str] = field(default_factory=list)  # "<location>: <what>"

    def summary(self, max_notes: int = 5) -> str:
        head = (
            f"{self.source}: {self.records} records, {len(self.examples)} pairs, "
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
) -> LoadReport:
    """Read preference pairs from a local file or a Hugging Face Hub dataset.

    `source` is a local .json (a list of records, or JSON lines), .jsonl, .json.gz, .jsonl.gz or
    .parquet file, or else a Hub dataset id, optionally with a data folder as "id:data_dir"
    (e.g. "Anthropic/hh-rlhf:harmless-base"), loaded with `datasets.load_dataset` at `split`.
    A missing path that looks like a path is an error, not a Hub id to try. Blank JSON lines are
    not records. `tokenizer` (with a chat template) is needed only for conversational records.
    `on_error`: "error" raises DataError at the first bad record, "skip" records it in
    `report.skipped`. Reading stops once `limit` examples are kept.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {ON_ERROR}")
    report = LoadReport(source=source)
    for location, record in _iter_records(source, split):
        if limit is not None and len(report.examples) >= limit:
            break
        report.records += 1
        try:
            example, warnings = _normalize_record(record, location, tokenizer)
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
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            yield from ((f"{source}[{i}]", row) for i, row in enumerate(rows))
        elif name.endswith(_JSON_SUFFIXES):
            yield from _iter_json(path, source)
        else:
            raise DataError(source, f"unknown file type; expected one of {', '.join(_SUFFIXES)}")
    elif _looks_like_path(source):
        raise DataError(source, "no such file")
    else:
        import datasets

        hub_id, _, data_dir = source.partition(":")
        rows = datasets.load_dataset(hub_id, data_dir=data_dir or None, split=split)
        yield from ((f"{source}[{split}]:{i}", row) for i, row in enumerate(rows))


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


# ---------------------------------------------------------------------------------------- formats


def _normalize_record(
    record: Any, location: str, tokenizer: Any
) -> tuple[PreferenceExample, list[str]]:
    """The record as a PreferenceExample plus warnings; DataError if it is bad."""
    if isinstance(record, bytes):
        record = _decode_line(record, location)
    if not isinstance(record, Mapping):
        raise DataError(location, f"record must be a JSON object, got {_type_name(record)}")
    # A Hub or Parquet table has every column in every row, with None where a value is absent.
    values = {name: record.get(name) for name in _FIELDS}
    for name in ("chosen", "rejected"):
        if values[name] is None:
            raise DataError(location, f"field '{name}' is missing")
    warnings = []
    if any(isinstance(value, list) for value in values.values()):
        prompt, chosen, rejected = _render_conversation(values, location, tokenizer)
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
    return PreferenceExample(prompt, chosen, rejected, location), warnings


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


def _render_conversation(
    values: dict[str, Any], location: str, tokenizer: Any
) -> tuple[str, str, str]:
    """Prompt and completion texts of a conversational record, through the chat template: the
    prompt is rendered with the generation prompt, a completion is the rendering of prompt +
    completion messages with the prompt's rendering removed from its front."""
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


def tokenize_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    on_error: str = "error",
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Token ids of each pair, truncated so that len(prompt) + len(completion) <= max_length.

    prompt_ids = tokenizer(prompt, add_special_tokens=True) (a BOS stays; a doubled BOS, from a
    chat template that writes it too, is made single); completion ids =
    tokenizer(completion, add_special_tokens=False) + [eos_token_id].

    Truncation, with L the longer completion and k = max_prompt_length (default max_length // 2):
    1. if len(prompt) + L > max_length, the prompt is cut from the LEFT to
       max(max_length - L, k) tokens: only as much as the longer completion needs, but never
       below k tokens, which guarantees the completions max_length - k tokens;
    2. each completion is cut from the RIGHT to max_length - len(prompt) (a cut one loses its EOS).
    A pair whose kept prompt leaves no room for one completion token (possible only when
    k >= max_length) raises DataError under on_error="error" and is dropped and listed in the
    report under on_error="skip".
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; expected one of {ON_ERROR}")
    eos, bos = tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; completions must end with one")
    keep = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or keep < 1:
        raise ValueError(
            f"need max_length >= 2 and max_prompt_length >= 1, got {max_length}, {keep}"
        )

    def encode(texts: list[str], special: bool) -> list[list[int]]:
        # One batched call per column: the fast tokenizers parallelise over the batch.
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]

    prompts = encode([e.prompt for e in examples], True)
    chosens = encode([e.chosen for e in examples], False)
    rejecteds = encode([e.rejected for e in examples], False)
    report = TruncationReport(pairs=len(examples))
    pairs = []
    for example, prompt, chosen, rejected in zip(
        examples, prompts, chosens, rejecteds, strict=True
    ):
        if bos is not None and prompt[:2] == [bos, bos]:
            prompt = prompt[1:]
        chosen, rejected = chosen + [eos], rejected + [eos]
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
