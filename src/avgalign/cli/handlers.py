"""The handlers of the subcommands whose work needs torch: evaluate, reward-model, study, demo.
Each turns parsed arguments into a call of the library (which raises typed errors; cli.main turns
them into one line and an exit code). Imported only when one of these subcommands runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import torch

from .. import sweep as engine
from ..errors import UsageError
from ..evaluation import (
    EvalResult,
    GenerationSettings,
    choose_chat_template,
    evaluate_policy,
    headline,
    load_scorer,
    read_prompts,
    write_eval_outputs,
)
from ..recipes.hh import RecipeOutputs, load_recipe_config, run_recipe
from ..reward_model import RewardModelResult, as_pair_texts, split_by_prompt, train_reward_model
from ..toy.demo import DemoConfig, DemoOutputs, full_config, quick_config, run_demo


def _load_causal_lm(name: str, dtype: str, device: str):
    from ..config import ModelConfig
    from ..models import load_model

    try:
        return load_model(ModelConfig(name=name, dtype=dtype)).to(device)
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"cannot load model {name!r}: {e}") from e


def run_evaluate(args: argparse.Namespace) -> EvalResult:
    from ..config import ModelConfig
    from ..models import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(ModelConfig(name=args.policy))
    except (FileNotFoundError, OSError) as e:
        raise UsageError(f"cannot load the tokenizer of {args.policy!r}: {e}") from e
    try:
        prompts = read_prompts(
            args.prompts, tokenizer=tokenizer, limit=args.limit, split=args.split
        )
        rendering = choose_chat_template(
            prompts, args.chat_template, args.policy, tokenizer, args.system_prompt
        )
        scorer = load_scorer(args.scorer, device=device, batch_size=args.batch_size)
    except ValueError as e:
        raise UsageError(f"{e}") from e
    print(rendering.line)
    policy = _load_causal_lm(args.policy, args.dtype, device)
    reference = _load_causal_lm(args.reference, args.dtype, device) if args.reference else None
    settings = GenerationSettings(
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        do_sample=not args.greedy,
        batch_size=args.batch_size,
        seed=args.seed,
        use_chat_template=rendering.use_chat_template,
        system_prompt=rendering.system_prompt,
    )
    result = evaluate_policy(policy, reference, tokenizer, prompts.texts, scorer, settings=settings)
    paths = write_eval_outputs(result, result.completions, args.out)
    print(f"evaluate: {headline(result)}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} (every figure: summary.json)")
    return result


def run_reward_model(args: argparse.Namespace) -> RewardModelResult:
    from ..data import load_preferences
    from ..models import resolve_model_path

    try:
        resolve_model_path(args.model)
    except FileNotFoundError as e:
        raise UsageError(f"{e}") from e
    loaded = load_preferences(args.data, split=args.split, limit=args.limit, on_error=args.on_error)
    if loaded.skipped:
        print(f"{args.data}: {len(loaded.skipped)} malformed records skipped (--on-error skip)")
    examples = loaded.examples
    try:
        train, held_out = split_by_prompt(as_pair_texts(examples), args.eval_fraction, args.seed)
    except ValueError as e:
        raise UsageError(f"{args.data}: {e}") from e
    result = train_reward_model(
        args.model,
        None,
        train,
        held_out,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        out_dir=args.out,
        device=args.device,
    )
    print(json.dumps(result.to_dict(), indent=2))
    return result


def run_study_command(args: argparse.Namespace) -> RecipeOutputs:
    cfg = load_recipe_config(args.config)
    if args.quiet:
        cfg.policy.train.progress = False
    command = shlex.join(sys.orig_argv)  # the interpreter and its flags (-m ...) included
    return engine.run_command("study", lambda: run_recipe(cfg, args.out, command=command))


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    if args.quick and args.full:
        raise UsageError("avgalign demo: --quick and --full exclude each other")
    cfg = quick_config() if args.quick else full_config() if args.full else DemoConfig()
    cfg.out = args.out or cfg.out
    cfg.cache_dir = args.cache_dir
    cfg.rebuild = args.no_cache
    cfg.progress = not args.quiet
    for name in ("losses", "aggregations", "betas", "alphas", "seeds", "length_biases"):
        if getattr(args, name):
            setattr(cfg, name, tuple(getattr(args, name)))
    if args.seed is not None:
        cfg.world = dataclasses.replace(cfg.world, seed=args.seed)
    if args.num_prompts is not None:
        cfg.eval = dataclasses.replace(cfg.eval, num_prompts=args.num_prompts)
    if args.samples_per_prompt is not None:
        cfg.eval = dataclasses.replace(cfg.eval, samples_per_prompt=args.samples_per_prompt)
    return cfg


def run_demo_command(args: argparse.Namespace) -> DemoOutputs:
    return engine.run_command("demo", lambda: run_demo(config_from_args(args)))
