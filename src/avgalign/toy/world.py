"""The toy world's language, task, oracle, demonstrations and annotator: pure, seeded Python.

The task. A prompt asks for n distinct items of a topic, all but one named item:

    prompt      "list 4 fruit except fr07 :"
    ideal       "fr12 fr03 fr30 fr41"  then EOS            (|y| = n + 1 tokens)

n runs from 2 to 40, so the ideal length spans more than an order of magnitude: length is a real
axis of this world, as it is of real completions. Every word is one token of a word-level
tokenizer (`build_tokenizer`), so lengths in words and in tokens differ only by the closing EOS.
Each topic has ITEMS_PER_TOPIC made-up items (fr01..fr48 for fruit, an01.. for animal, ...).

The oracle (the ground truth that real experiments never have) reads the completion left to right:
a word is a *hit* if it is an item of the topic, not the excluded one, not said before, and fewer
than n hits came before it; every other word is an *error* (an item of another topic, a filler, a
repeat, the excluded item, or any item after the n-th). Then

    r(x, y) = (hits - error_penalty * errors) / n          (1 for the ideal answer)

Too short misses hits (-1/n per missing item), too long adds errors (-error_penalty/n per extra
word): for a completion of correct items the score peaks at exactly n words, an interior optimum
in length that depends on the prompt.

The demonstrations (and so the SFT policy) miss the ideal length by a multiplicative factor,
exp(N(0, length_sigma)), so two samples for the same prompt differ in length by a share of n.

The annotator prefers completion a over b with the Bradley-Terry probability

    P(a > b) = sigmoid((r(x, a) - r(x, b)) / temperature + length_bias * (|a| - |b|))

`temperature` is the annotator's noise (0 would be a perfect judge of the oracle) and
`length_bias` (logits per token) its taste for longer answers, as real annotators have: the knob
the study turns off and on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_N = 40  # n is one token ("1" .. "40")
ITEMS_PER_TOPIC = 48  # more than MAX_N + 1: the ideal answer always exists
TOPICS: dict[str, tuple[str, ...]] = {
    topic: tuple(f"{topic[:2]}{i:02d}" for i in range(1, ITEMS_PER_TOPIC + 1))
    for topic in ("fruit", "animal", "color", "tool")
}
FILLERS = ("um", "well", "also", "etc", "so")
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
KEYWORDS = ("list", "except", ":")


def sub_seed(seed: int, stream: str) -> int:
    """An independent seed for each named random stream (pair sampling, evaluation sampling, ...):
    seeds like seed + 1 would overlap between streams that seed each batch with seed + batch
    index."""
    return int(hashlib.sha256(f"{seed}:{stream}".encode()).hexdigest()[:8], 16)


def vocabulary() -> list[str]:
    """All tokens, specials first (pad 0, bos 1, eos 2, unk 3); a fixed order, so fixed ids."""
    numbers = [str(n) for n in range(1, MAX_N + 1)]
    items = [item for topic in TOPICS for item in TOPICS[topic]]
    return [PAD, BOS, EOS, UNK, *KEYWORDS, *numbers, *TOPICS, *items, *FILLERS]


def build_tokenizer():
    """A word-level Hugging Face tokenizer of `vocabulary()`: whitespace split, BOS prepended.

    Saved with save_pretrained, it reloads with AutoTokenizer like any real model's tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


# ------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    """List n distinct items of `topic`, other than `excluded`."""

    topic: str
    n: int
    excluded: str

    @property
    def prompt(self) -> str:
        return f"list {self.n} {self.topic} except {self.excluded} :"

    @property
    def allowed(self) -> tuple[str, ...]:
        return tuple(item for item in TOPICS[self.topic] if item != self.excluded)


def parse_prompt(text: str) -> Task:
    """Inverse of Task.prompt (tolerates surrounding whitespace and a leading BOS)."""
    words = text.split()
    if words and words[0] == BOS:
        words = words[1:]
    if len(words) != 6 or words[0] != "list" or words[3] != "except" or words[5] != ":":
        raise ValueError(f"not a toy-world prompt: {text!r}")
    task = Task(topic=words[2], n=int(words[1]), excluded=words[4])
    if task.topic not in TOPICS or task.excluded not in TOPICS[task.topic]:
        raise ValueError(f"not a toy-world prompt: {text!r}")
    return task


def all_tasks(n_min: int, n_max: int) -> list[Task]:
    """Every (topic, n, excluded) with n_min <= n <= n_max, in a fixed order."""
    if not 1 <= n_min <= n_max <= MAX_N:
        raise ValueError(f"need 1 <= n_min <= n_max <= {MAX_N}, got {n_min}, {n_max}")
    return [
        Task(topic, n, excluded)
        for topic in TOPICS
        for n in range(n_min, n_max + 1)
        for excluded in TOPICS[topic]
    ]


def split_tasks(tasks: Sequence[Task], test_fraction: float, seed: int) -> tuple[list, list]:
    """(train, test): a seeded shuffle, the first `test_fraction` held out. Held-out prompts are
    new combinations of topic, n and excluded item, never seen in SFT or preference data."""
    order = list(tasks)
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(order)))
    return order[n_test:], order[:n_test]


# ----------------------------------------------------------------------------------------- oracle


def oracle_counts(task: Task, words: Sequence[str]) -> tuple[int, int]:
    """(hits, errors) of a completion's words, as defined in the module docstring."""
    allowed = set(task.allowed)
    seen: set[str] = set()
    hits = errors = 0
    for word in words:
        if word in allowed and word not in seen and hits < task.n:
            hits += 1
        else:
            errors += 1
        seen.add(word)
    return hits, errors


def oracle_score(task: Task, words: Sequence[str], error_penalty: float = 1.0) -> float:
    """r(x, y) = (hits - error_penalty * errors) / n; 1 for the ideal answer."""
    hits, errors = oracle_counts(task, words)
    return (hits - error_penalty * errors) / task.n


def oracle_scorer(error_penalty: float = 1.0):
    """A scorer for avgalign.evaluation: f(prompts, completions) -> scores, texts in and out."""

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [
            oracle_score(parse_prompt(p), c.split(), error_penalty)
            for p, c in zip(prompts, completions, strict=True)
        ]

    return score


# --------------------------------------------------------------------------------- demonstrations


@dataclass(frozen=True)
class DemoNoise:
    """How the SFT demonstrations deviate from the ideal answer.

    Length: round(n * exp(length_sigma * z)) words, z standard normal (at least one word): the
    spread is a share of n, so long answers miss by more words than short ones. Each word is, with
    these probabilities, an item of another topic, a repeat (of an earlier word, or the excluded
    item), a filler; otherwise a fresh allowed item (a filler when none is left).
    """

    length_sigma: float = 0.35
    wrong_topic: float = 0.06
    repeat: float = 0.02
    filler: float = 0.08


def sample_demo(task: Task, noise: DemoNoise, rng: random.Random) -> list[str]:
    """The words of one noisy demonstration for `task` (EOS not included)."""
    length = max(1, round(task.n * math.exp(noise.length_sigma * rng.gauss(0.0, 1.0))))
    others = [item for topic, items in TOPICS.items() if topic != task.topic for item in items]
    fresh = list(task.allowed)
    rng.shuffle(fresh)
    words: list[str] = []
    for _ in range(length):
        u = rng.random()
        if u < noise.wrong_topic:
            words.append(rng.choice(others))
        elif u < noise.wrong_topic + noise.repeat:
            words.append(rng.choice([*words, task.excluded]))
        elif u < noise.wrong_topic + noise.repeat + noise.filler or not fresh:
            words.append(rng.choice(FILLERS))
        else:
            words.append(fresh.pop())
    return words


# -------------------------------------------------------------------------------------- annotator


@dataclass(frozen=True)
class AnnotatorConfig:
    """Bradley-Terry judge of the oracle reward with a taste for length (see module docstring)."""

    temperature: float = 0.2  # noise: oracle-score difference worth one logit
    length_bias: float = 0.5  # logits per extra token of the first completion


def preference_probability(
    reward_a: float, reward_b: float, length_a: int, length_b: int, cfg: AnnotatorConfig
) -> float:
    """P(a > b) = sigmoid((r_a - r_b) / temperature + length_bias * (|a| - |b|))."""
    logit = (reward_a - reward_b) / cfg.temperature + cfg.length_bias * (length_a - length_b)
    return 0.5 * (1.0 + math.tanh(0.5 * logit))  # the sigmoid, without overflow


def prefers_first(
    reward_a: float,
    reward_b: float,
    length_a: int,
    length_b: int,
    cfg: AnnotatorConfig,
    rng: random.Random,
) -> bool:
    """One draw of the annotator's judgement: True when a is preferred over b."""
    return rng.random() < preference_probability(reward_a, reward_b, length_a, length_b, cfg)


@dataclass(frozen=True)
class LengthBiasReport:
    """How often the chosen completion is the longer one, over the pairs of different lengths,
    against what an annotator without length bias would do on the same pairs."""

    pairs: int
    unequal: int  # pairs whose completions differ in length
    chosen_longer_share: float  # measured on the labels
    unbiased_longer_share: float  # expected with length_bias = 0, same temperature
    oracle_agreement: float  # over pairs of different oracle scores: chosen scores higher


def length_bias_report(
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    chosen_scores: Sequence[float],
    rejected_scores: Sequence[float],
    annotator: AnnotatorConfig,
) -> LengthBiasReport:
    """Length bias and oracle agreement of labelled pairs.

    unbiased_longer_share = mean over unequal pairs of sigmoid((r_longer - r_shorter) / T): the
    expected share an annotator with the same noise but no taste for length would give.
    """
    unbiased = dataclasses.replace(annotator, length_bias=0.0)
    unequal = longer = agrees = decided = 0
    expected = 0.0
    for lc, lr, sc, sr in zip(
        chosen_lengths, rejected_lengths, chosen_scores, rejected_scores, strict=True
    ):
        if lc != lr:
            unequal += 1
            longer += lc > lr
            r_long, r_short = (sc, sr) if lc > lr else (sr, sc)
            expected += preference_probability(r_long, r_short, 1, 0, unbiased)
        if sc != sr:
            decided += 1
            agrees += sc > sr
    nan = float("nan")
    return LengthBiasReport(
        pairs=len(chosen_lengths),
        unequal=unequal,
        chosen_longer_share=longer / unequal if unequal else nan,
        unbiased_longer_share=expected / unequal if unequal else nan,
        oracle_agreement=agrees / decided if decided else nan,
    )
