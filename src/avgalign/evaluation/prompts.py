"""Prompts to evaluate on, rendered as the policy's training rendered them: read_prompts and
choose_chat_template, from the record avgalign.data.prompt_rendering leaves in the model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..data import (
    PROMPT_RENDERING_FILE,
    DataError,
    chat_template_probe,
    json_records,
    load_preferences,
    read_prompt_rendering,
)


@dataclass(frozen=True)
class PromptSet:
    """Prompts to evaluate on, as the scorer reads them (`texts`).

    rendering: None for plain prompts (a .txt file, a .jsonl of "prompt" rows), which still wait
    for the chat-template decision (`choose_chat_template`); for the prompts of a preference
    dataset, how avgalign.data rendered them ("raw", "chat_template" or "mixed"): those are final,
    tokenized as training tokenizes prompts and never templated again.
    """

    texts: list[str]
    rendering: str | None = None


def read_prompts(
    source: str, *, tokenizer=None, limit: int | None = None, split: str = "test"
) -> PromptSet:
    """Prompts from a .txt file (one per line, blank lines skipped), a .jsonl file whose rows have
    a "prompt" and no "chosen" field, or any preference dataset avgalign.data.load_preferences
    reads (its prompts, duplicates dropped, in order), loaded with `tokenizer` as training loads
    it, so conversational records are rendered by the chat template exactly as in training (a
    tokenizer with a chat template is needed only for those). At most `limit` prompts.
    A bad source raises DataError, one line: "<location>: <reason>"."""
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        lines = _read_lines(path, source)
        prompts, rendering = [line for line in lines if line.strip()], None
    elif path.suffix == ".jsonl" and path.is_file() and _is_prompt_jsonl(path, source):
        prompts, rendering = [], None
        for location, row in json_records(path, source):
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str):
                raise DataError(location, "no string 'prompt' field")
            prompts.append(prompt)
    else:
        # only prompts are needed: a pair with a broken completion still gives its prompt
        examples = load_preferences(source, split=split, tokenizer=tokenizer, on_error="skip")
        renderings: dict[str, str] = {}  # prompt -> its rendering, in order of first appearance
        for e in examples.examples:
            renderings.setdefault(e.prompt, e.rendering)
        prompts = list(renderings)
        kinds = {renderings[p] for p in prompts[:limit]}
        rendering = kinds.pop() if len(kinds) == 1 else "mixed"
    prompts = prompts[:limit]
    if not prompts:
        raise DataError(source, "no prompts")
    return PromptSet(prompts, rendering)


def _read_lines(path: Path, source: str) -> list[str]:
    if not path.is_file():
        raise DataError(source, "no such file")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(source, f"invalid UTF-8 at byte {e.start}") from None


def _is_prompt_jsonl(path: Path, source: str) -> bool:
    """Whether the first record has a "prompt" and no "chosen" field (read up to it only); an
    empty file is read as prompts, then reported as empty."""
    for _, row in json_records(path, source):
        return isinstance(row, dict) and "prompt" in row and "chosen" not in row
    return True


CHAT_TEMPLATE_CHOICES = ("trained", "auto", "yes", "no")
_RENDERING_WORDS = {
    "raw": "raw text",
    "chat_template": "rendered with the chat template",
    "mixed": "partly raw text, partly rendered with the chat template",
}


class PromptChoice(NamedTuple):
    """How plain prompts are rendered (generate_completions' use_chat_template and system_prompt)
    and one line saying which rendering and why."""

    use_chat_template: bool
    system_prompt: str | None
    line: str


def choose_chat_template(
    prompts: PromptSet,
    choice: str,
    policy: str | Path,
    tokenizer,
    system_prompt: str | None = None,
) -> PromptChoice:
    """How to render `prompts` for generate_completions, and the line saying so.

    A preference dataset's prompts are never templated again: they already are what training
    conditioned on. Plain prompts follow `choice`: "yes" wrap them in the tokenizer's chat
    template, "no" don't, "auto" wrap them when the tokenizer has a template, "trained" (the CLI
    default) render them as the policy's training prompts were, read from
    <policy>/prompt_rendering.json ("chat_template": wrap, "raw": don't); a missing record, or one
    that says "mixed", falls back to "auto", and the line says so.

    Wrapped plain prompts get a system message first, as training put `data.system_prompt` first:
    `system_prompt` (--system-prompt; "" for none) when given, else under "trained" the record's
    "system_prompt" (none in a record written before that key existed), else none. A non-empty
    `system_prompt` for plain prompts that stay raw text is a ValueError.
    """
    if choice not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat template choice must be one of {CHAT_TEMPLATE_CHOICES}: {choice!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    record_path = Path(policy).expanduser() / PROMPT_RENDERING_FILE
    record = read_prompt_rendering(policy)
    recorded = record["rendering"] if record else None
    recorded_system = record.get("system_prompt") if record else None

    if prompts.rendering is not None:
        line = (
            f"prompts: the dataset's own, {_RENDERING_WORDS[prompts.rendering]}, tokenized as "
            "training tokenizes them (no chat template added)"
        )
        if choice != "trained":
            line += f"; --chat-template {choice} applies only to plain prompts"
        if system_prompt is not None:
            line += "; --system-prompt applies only to plain prompts"
        if recorded is not None and recorded != prompts.rendering:
            line += f"; note: {record_path} records {_RENDERING_WORDS[recorded]} in training"
        return PromptChoice(False, None, line)

    def words(wrap: bool) -> str:
        return "wrapped in the chat template" if wrap else "raw text"

    having = "the tokenizer " + ("has a chat template" if has_template else "has no chat template")
    if choice == "yes" and not has_template:
        raise ValueError("--chat-template yes, but the tokenizer has no chat template")
    if choice in ("yes", "no"):
        wrap = choice == "yes"
        line = f"prompts: {words(wrap)} (--chat-template {choice})"
    elif choice == "auto":
        wrap = has_template
        line = f"prompts: {words(wrap)} (--chat-template auto: {having})"
    elif recorded in ("raw", "chat_template"):
        wrap = recorded == "chat_template"
        if wrap and not has_template:
            raise ValueError(
                f"{record_path} records chat-template prompts, but the tokenizer has no chat "
                "template; give --chat-template no to evaluate on raw text"
            )
        line = f"prompts: {words(wrap)}, as recorded in {record_path}"
        probe = record.get("chat_template_probe")
        if wrap and probe is not None and probe != chat_template_probe(tokenizer, recorded_system):
            line += (
                "; warning: the tokenizer's chat template renders a prompt differently from the "
                "recorded one"
            )
    else:
        if record:
            why = f"{record_path} records mixed renderings"
        else:
            why = f"no {PROMPT_RENDERING_FILE} in {policy}"
        wrap = has_template
        line = f"prompts: {words(wrap)}; {why}, so falling back to --chat-template auto ({having})"
    if choice != "trained":
        recorded_system = None  # the record speaks only for "trained"
    if not wrap:
        if system_prompt:
            raise ValueError(
                "--system-prompt needs the chat template, but the prompts stay "
                + line.removeprefix("prompts: ")
            )
        return PromptChoice(False, None, line)
    chosen = (recorded_system if system_prompt is None else system_prompt) or None
    named = f"system prompt {_quote(chosen)} first" if chosen else "no system prompt"
    if system_prompt is not None:
        line += f"; {named} (--system-prompt"
        if recorded_system and recorded_system != chosen:
            line += f"; {record_path} records {_quote(recorded_system)}"
        line += ")"
    elif chosen:
        line += f"; {named}, as recorded in {record_path}"
    return PromptChoice(True, chosen, line)


def _quote(text: str, limit: int = 60) -> str:
    """`text` quoted for a log line; a long one cut to `limit` characters, its length given."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
