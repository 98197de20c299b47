"""This project's DPO trainer against TRL's DPOTrainer: same workload, alternating runs, one table.

One command, from the repository root (TRL comes from the `bench` extra: pip install -e ".[bench]"):

    python benchmarks/bench_dpo.py

The driver (this file without --worker) does, in order:

1. measures the machine's float32 matmul peak (square matmuls, the benchmark's thread count);
2. runs the parity check in a subprocess: with a policy perturbed away from its reference, the
   summed log-probabilities of chosen and rejected completions computed by this project (every
   speed technique on) equal a naive full-sequence forward and TRL's to within 1e-4 relative,
   and the DPO (sum) and IPO (mean) losses agree with TRL's. A failed check fails the benchmark;
3. for each round, runs one subprocess per variant, alternating ours and TRL:
   ours (cold reference cache), TRL default, ours (warm cache), TRL with precompute_ref_log_probs;
4. prints a table: pairs/s and tokens/s of the whole run, median seconds per step, peak RSS of the
   subprocess, model FLOP utilisation, and ours/TRL ratios; optionally writes it all as JSON.

Every variant trains the same model, on the same pairs (all of them once: one epoch), with the
same batch size, max length, dtype (float32), learning rate and thread count. "Whole run" is
timed from loading the model to the last optimizer step: tokenisation, the reference model or the
reference log-probabilities, and every training step. Seconds per step are medians over all
steps but the first of each run (warm-up). Peak RSS is the subprocess's ru_maxrss.

Definitions (identical for every variant, so ratios of tokens/s equal ratios of pairs/s):
- tokens: the pairs' real tokens as a trainer with one row per completion sees them,
  sum over pairs of 2 * |prompt| + |chosen| + |rejected| (no padding);
- model FLOPs of one pair: k * (N_body * (2 |prompt| + |chosen| + |rejected|)
  + N_head * (|chosen| + |rejected|)), N_body = parameters of the decoder without the token
  embedding, N_head = hidden size * vocabulary (the LM head is only needed where a completion
  token is predicted), k = 6 for the policy's forward and backward plus 2 for the reference's
  forward (k = 6 when the reference log-probs come from a warm cache). Attention-score FLOPs are
  left out. MFU = model FLOPs / (whole-run seconds * measured matmul peak).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
VARIANTS = ("ours", "trl", "ours-warm", "trl-precompute")
OPTIONAL_VARIANTS = ("trl-nogc",)  # TRL default but without gradient checkpointing
PARITY_RTOL = 1e-4
RESULT_TAG = "BENCH_RESULT "


# ------------------------------------------------------------------------------------ workload


@dataclass
class Workload:
    """Everything that defines the measured work; passed to every worker on its command line."""

    model: str  # "smollm2-135m" or a local model folder
    data: str
    pairs: int
    batch_size: int
    max_length: int
    threads: int
    learning_rate: float = 1e-6  # TRL's default
    beta: float = 0.1
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.pairs // self.batch_size


def setup_threads(threads: int) -> None:
    """Pin torch's intra-op threads (the environment of the subprocess pins OpenMP's too)."""
    import torch

    torch.set_num_threads(threads)


def load_tokenizer(workload: Workload):
    from avgalign.config import ModelConfig
    from avgalign.models import load_tokenizer as _load

    return _load(ModelConfig(name=workload.model))


def model_path(workload: Workload) -> str:
    from avgalign.models import resolve_model_path

    return resolve_model_path(workload.model)


def select_pairs(workload: Workload, tokenizer):
    """The first `pairs` usable pairs of the data that fit in max_length without truncation.

    Both trainers then see exactly the same tokens (they truncate differently: this project cuts
    the prompt from the left, TRL cuts prompt + completion from the right). Returns
    (examples, tokenized pairs, number of pairs passed over because they were too long).
    """
    from avgalign.data import load_preferences, tokenize_pairs

    report = load_preferences(workload.data, tokenizer=tokenizer, on_error="skip")
    examples, pairs, too_long = [], [], 0
    candidates = report.examples[: 4 * workload.pairs + 64]
    full, _ = tokenize_pairs(candidates, tokenizer, max_length=10**9)
    for example, pair in zip(candidates, full):
        if len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) > (
            workload.max_length
        ):
            too_long += 1
            continue
        examples.append(example)
        pairs.append(pair)
        if len(pairs) == workload.pairs:
            return examples, pairs, too_long
    raise SystemExit(f"only {len(pairs)} pairs of {workload.data} fit in {workload.max_length}")


def data_tokens(pairs) -> int:
    """Real tokens of the pairs, one row per completion: sum of 2|x| + |y_w| + |y_l|."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def model_flops(pairs, n_body: int, n_head: int, with_reference: bool) -> float:
    """Model FLOPs of training on `pairs` once (see the module docstring for the formula)."""
    k = 8 if with_reference else 6
    total = 0
    for p in pairs:
        completions = len(p.chosen_ids) + len(p.rejected_ids)
        total += n_body * (2 * len(p.prompt_ids) + completions) + n_head * completions
    return float(k * total)


def parameter_counts(model) -> tuple[int, int]:
    """(N_body, N_head): decoder parameters without the token embedding, hidden * vocabulary."""
    decoder = model.get_decoder()
    embedding = decoder.get_input_embeddings()
    n_body = sum(p.numel() for p in decoder.parameters()) - embedding.weight.numel()
    head = model.get_output_embeddings().weight
    return n_body, head.numel()


def matmul_peak(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of a size x size matmul loop on `threads` threads."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        n = 8
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0) / 1e9)
    torch.set_num_threads(previous)
    return best


# ------------------------------------------------------------------------------------- workers


_T0 = time.perf_counter()


def _say(message: str) -> None:
    """A progress line in the worker's log, with the seconds since the worker started."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def _result(payload: dict) -> None:
    print(RESULT_TAG + json.dumps(payload), flush=True)


def worker_ours(workload: Workload, cache_dir: str, beta: float) -> None:
    """Train with avgalign.train.train, every speed technique at its default (on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from avgalign.config import Config
    from avgalign.data import tokenize_pairs
    from avgalign.train import train

    setup_threads(workload.threads)
    tokenizer = load_tokenizer(workload)
    examples, _, _ = select_pairs(workload, tokenizer)
    out = tempfile.mkdtemp(prefix="avgalign-bench-run-")
    try:
        t0 = time.perf_counter()
        pairs, _ = tokenize_pairs(examples, tokenizer, max_length=workload.max_length)
        model = AutoModelForCausalLM.from_pretrained(model_path(workload), dtype=torch.float32)
        cfg = Config()
        tc = cfg.train
        tc.output_dir, tc.reference_cache_dir = out, cache_dir
        tc.batch_size = tc.micro_batch_size = workload.batch_size
        tc.max_steps, tc.seed = workload.steps, workload.seed
        tc.learning_rate, tc.scheduler, tc.warmup_ratio = workload.learning_rate, "linear", 0.0
        tc.mixed_precision, tc.progress, tc.save_model = "no", False, False
        cfg.loss.beta = beta
        cfg.data.max_length = workload.max_length
        result = train(cfg, model=model, tokenizer=tokenizer, train_pairs=pairs, eval_pairs=[])
        whole = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]
        steps = [r for r in records if r["split"] == "train"]
        _result(
            {
                "whole_seconds": whole,
                "reference_seconds": result.reference_seconds,
                "reference_from_cache": result.reference_from_cache,
                "step_seconds": [r["seconds"] for r in steps],
                "processed_tokens": sum(r["tokens_per_s"] * r["seconds"] for r in steps),
                "padding_fraction": statistics.mean(r["padding_fraction"] for r in steps),
                "data_tokens": data_tokens(pairs),
                "final_loss": steps[-1]["loss"],
                "threads": torch.get_num_threads(),
            }
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_trl(workload: Workload, precompute: bool, gradient_checkpointing: bool) -> None:
    """Train with TRL's DPOTrainer at its defaults, except what the workload fixes."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.start)

    setup_threads(workload.threads)
    tokenizer = load_tokenizer(workload)
    examples, ours, _ = select_pairs(workload, tokenizer)
    texts = [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
    out = tempfile.mkdtemp(prefix="avgalign-bench-trl-")
    try:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_path(workload), dtype=torch.float32)
        # TRL's own default is activation (gradient) checkpointing on; the deprecated alias
        # `gradient_checkpointing` is left alone so that no deprecation warning clutters the log
        checkpointing = {} if gradient_checkpointing else {"activation_checkpointing": False}
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=workload.batch_size,
            max_length=workload.max_length,
            max_steps=workload.steps,
            learning_rate=workload.learning_rate,
            beta=workload.beta,
            seed=workload.seed,
            bf16=False,
            use_cpu=True,
            precompute_ref_log_probs=precompute,
            **checkpointing,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        timer = StepTimer()
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(texts),
            processing_class=tokenizer,
            callbacks=[timer],
        )
        setup = time.perf_counter() - t0
        trainer.train()
        whole = time.perf_counter() - t0
        theirs = trainer.train_dataset
        same = sum(
            theirs[i]["prompt_ids"] == p.prompt_ids
            and theirs[i]["chosen_ids"] == p.chosen_ids
            and theirs[i]["rejected_ids"] == p.rejected_ids
            for i, p in enumerate(ours)
        )
        trl_tokens = sum(
            2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in theirs
        )
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        _result(
            {
                "whole_seconds": whole,
                "reference_seconds": setup if precompute else 0.0,
                "step_seconds": timer.seconds,
                "processed_tokens": trl_tokens,
                "data_tokens": data_tokens(ours),
                "trl_data_tokens": trl_tokens,
                "identical_pairs": same,
                "final_loss": losses[-1] if losses else None,
                "threads": torch.get_num_threads(),
                "activation_checkpointing": bool(trainer.args.activation_checkpointing),
            }
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _naive_logp(lm, prompt: list[int], completion: list[int]) -> float:
    """log pi(completion | prompt) from one unpadded full-sequence forward, summed in float64."""
    import torch

    with torch.no_grad():
        logits = lm(torch.tensor([prompt + completion])).logits[0].double()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return float(logp.gather(-1, torch.tensor(completion)[:, None]).sum())


def worker_parity(workload: Workload, n_pairs: int, noise: float) -> None:
    """Policy != reference: our log-probs and losses against a naive forward and TRL's."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from avgalign.logprobs import CompletionLogProbs, pack_pairs
    from avgalign.losses import LossParams, preference_loss
    from avgalign.train import compute_reference_logps, pair_length

    setup_threads(workload.threads)
    tokenizer = load_tokenizer(workload)
    pad_id = tokenizer.pad_token_id
    examples, pairs, _ = select_pairs(workload, tokenizer)
    examples, pairs = examples[:n_pairs], pairs[:n_pairs]
    reference = AutoModelForCausalLM.from_pretrained(model_path(workload), dtype=torch.float32)
    reference.eval().requires_grad_(False)
    policy = copy.deepcopy(reference)
    g = torch.Generator().manual_seed(workload.seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std())

    # ours, every speed technique on: shared-prompt rows with the 4D mask, length-grouped and
    # padded batches, the LM head in small checkpointed chunks under autograd (as in training),
    # the reference through the precompute path (inference mode, length-sorted batches)
    policy.train().requires_grad_(True)
    scorer = CompletionLogProbs(policy, chunk_size=64)
    n = len(pairs)
    ours_policy = torch.zeros(2 * n, dtype=torch.float64)
    counts = torch.zeros(2 * n, dtype=torch.long)
    order = sorted(range(n), key=lambda i: pair_length(pairs[i]))  # length-grouped, still padded
    for idx in (order[s : s + 3] for s in range(0, n, 3)):
        batch = pack_pairs(
            [pairs[i].prompt_ids for i in idx],
            [pairs[i].chosen_ids for i in idx],
            [pairs[i].rejected_ids for i in idx],
            pad_id,
            "shared_prompt",
        )
        sums, c = scorer(batch)
        assert sums.requires_grad
        where = torch.tensor(idx + [n + i for i in idx])
        ours_policy[where] = sums.detach().double()
        counts[where] = c
    ref = compute_reference_logps(
        CompletionLogProbs(reference, chunk_size=64),
        pairs,
        pad_id=pad_id,
        layout="shared_prompt",
        batch_size=3,
        device=torch.device("cpu"),
        progress=False,
    )
    ours_reference = torch.cat([ref.chosen, ref.rejected]).double()
    _say("ours: policy and reference log-probs done")
    policy.eval().requires_grad_(False)

    def naive(lm) -> torch.Tensor:
        values = [_naive_logp(lm, p.prompt_ids, p.chosen_ids) for p in pairs]
        values += [_naive_logp(lm, p.prompt_ids, p.rejected_ids) for p in pairs]
        return torch.tensor(values, dtype=torch.float64)

    naive_policy, naive_reference = naive(policy), naive(reference)
    _say("naive full-sequence forwards done")

    # TRL: its own tokenisation, collator, fused LM head and loss, one pair per batch
    out = tempfile.mkdtemp(prefix="avgalign-bench-parity-")
    try:
        trainer = DPOTrainer(
            model=policy,
            ref_model=reference,
            args=DPOConfig(
                output_dir=out,
                beta=workload.beta,
                max_length=workload.max_length,
                bf16=False,
                use_cpu=True,
                activation_checkpointing=False,
                report_to="none",
            ),
            train_dataset=Dataset.from_list(
                [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in examples]
            ),
            processing_class=tokenizer,
        )
        _say("TRL trainer built")
        rows = [trainer.train_dataset[i] for i in range(n)]
        identical = all(
            r["prompt_ids"] == p.prompt_ids
            and r["chosen_ids"] == p.chosen_ids
            and r["rejected_ids"] == p.rejected_ids
            for r, p in zip(rows, pairs)
        )
        trl_policy = torch.zeros(2 * n, dtype=torch.float64)
        trl_dpo = torch.zeros(n, dtype=torch.float64)
        metrics = trainer._metrics["train" if trainer.model.training else "eval"]
        with torch.no_grad():
            # reference: TRL's precompute path, on one right-padded batch of all pairs
            everything = trainer.data_collator(rows)
            rc, rr = trainer.compute_ref_log_probs(trainer.ref_model, everything)
            trl_reference = torch.cat([rc, rr]).double()
            # policy log-probs and DPO loss: TRL's loss, one pair per batch (its metrics are
            # batch means)
            trainer.loss_types = ["sigmoid"]
            for i, row in enumerate(rows):
                trl_dpo[i] = float(
                    trainer.compute_loss(trainer.model, trainer.data_collator([row]))
                )
                pair = [metrics["logps/chosen"][-1], metrics["logps/rejected"][-1]]
                trl_policy[[i, n + i]] = torch.tensor(pair, dtype=torch.float64)
            # IPO (TRL's is length-normalised: our IPO with the mean aggregation), batch mean
            trainer.loss_types = ["ipo"]
            trl_ipo_mean = float(trainer.compute_loss(trainer.model, everything))
        _say("TRL log-probs and losses done")
    finally:
        shutil.rmtree(out, ignore_errors=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())

    params = LossParams(beta=workload.beta)
    lengths = counts[:n], counts[n:]

    def losses(pol: torch.Tensor, ref_: torch.Tensor) -> dict[str, torch.Tensor]:
        out_ = {}
        for name, loss, aggregation in (("dpo_sum", "dpo", "sum"), ("ipo_mean", "ipo", "mean")):
            _, metrics = preference_loss(
                loss, pol[:n], pol[n:], ref_[:n], ref_[n:], *lengths, params, aggregation
            )
            out_[name] = metrics["loss"]
        return out_

    ours_losses = losses(ours_policy, ours_reference)
    naive_losses = losses(naive_policy, naive_reference)
    trl_losses = {"dpo_sum": trl_dpo, "ipo_mean": torch.tensor([trl_ipo_mean], dtype=torch.float64)}
    ours_vs_trl = {
        "dpo_sum": rel(ours_losses["dpo_sum"], trl_losses["dpo_sum"]),  # per pair
        "ipo_mean": rel(ours_losses["ipo_mean"].mean(), trl_losses["ipo_mean"]),  # batch mean
    }
    report = {
        "pairs": n,
        "tokens_identical_to_trl": identical,
        "policy_minus_reference_mean_abs": float((naive_policy - naive_reference).abs().mean()),
        "logps_rel_ours_vs_naive": max(
            rel(ours_policy, naive_policy), rel(ours_reference, naive_reference)
        ),
        "logps_rel_trl_vs_naive": max(
            rel(trl_policy, naive_policy), rel(trl_reference, naive_reference)
        ),
        "logps_rel_ours_vs_trl": max(
            rel(ours_policy, trl_policy), rel(ours_reference, trl_reference)
        ),
        "loss_rel_ours_vs_naive": {k: rel(ours_losses[k], naive_losses[k]) for k in ours_losses},
        "loss_rel_ours_vs_trl": ours_vs_trl,
        "counts_match_trl": bool(
            (counts[:n] == torch.tensor([len(r["chosen_ids"]) for r in rows])).all()
            and (counts[n:] == torch.tensor([len(r["rejected_ids"]) for r in rows])).all()
        ),
        "example": {
            "ours_policy_chosen": float(ours_policy[0]),
            "naive_policy_chosen": float(naive_policy[0]),
            "trl_policy_chosen": float(trl_policy[0]),
            "ours_reference_chosen": float(ours_reference[0]),
            "dpo_loss_ours": float(ours_losses["dpo_sum"][0]),
            "dpo_loss_trl": float(trl_losses["dpo_sum"][0]),
            "ipo_loss_batch_mean_ours": float(ours_losses["ipo_mean"].mean()),
            "ipo_loss_batch_mean_trl": trl_ipo_mean,
        },
    }
    worst = [
        report["logps_rel_ours_vs_naive"],
        report["logps_rel_trl_vs_naive"],
        report["logps_rel_ours_vs_trl"],
        *report["loss_rel_ours_vs_naive"].values(),
        *report["loss_rel_ours_vs_trl"].values(),
    ]
    report["passed"] = bool(identical and report["counts_match_trl"] and max(worst) <= PARITY_RTOL)
    _result(report)


# -------------------------------------------------------------------------------------- driver


def run_worker(
    name: str, extra: list[str], workload: Workload, log_dir: Path, wait_policy: str
) -> dict:
    """Run one worker subprocess; its JSON result plus its peak RSS (bytes), CPU seconds (user +
    system) and log path. Every worker gets the same thread settings in its environment."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(workload.threads)
    if wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = wait_policy
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    command += ["--workload", json.dumps(asdict(workload)), *extra]
    log_path = log_dir / f"{len(list(log_dir.iterdir())):02d}-{name}.log"
    with log_path.open("w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    text = log_path.read_text()
    results = [line[len(RESULT_TAG) :] for line in text.splitlines() if line.startswith(RESULT_TAG)]
    if child.returncode != 0 or not results:
        tail = "\n".join(text.splitlines()[-30:])
        raise SystemExit(f"worker {name} failed (exit {child.returncode}); log {log_path}:\n{tail}")
    result = json.loads(results[-1])
    result["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    result["log"] = str(log_path)
    found = re.search(r"^reference log-probs: .*$", text, re.MULTILINE)
    result["reference_log_line"] = found.group(0) if found else None
    return result


def summarise(name: str, runs: list[dict], workload: Workload, flops: dict, peak: float) -> dict:
    """Medians over rounds of whole-run time and CPU time; the median step time over all steps
    but the first of each run; the largest peak RSS."""
    whole = statistics.median(r["whole_seconds"] for r in runs)
    steps = [s for r in runs for s in r["step_seconds"][1:]]
    with_reference = name != "ours-warm"
    return {
        "variant": name,
        "runs": len(runs),
        "whole_seconds": whole,
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "pairs_per_s": workload.pairs / whole,
        "tokens_per_s": runs[0]["data_tokens"] / whole,
        "step_seconds_median": statistics.median(steps) if steps else None,
        "reference_seconds": statistics.median(r.get("reference_seconds", 0.0) for r in runs),
        "peak_rss_gb": max(r["peak_rss_bytes"] for r in runs) / 1e9,
        "mfu": flops[with_reference] / whole / (peak * 1e9),
        "padding_fraction": runs[0].get("padding_fraction"),
        "final_loss": runs[-1]["final_loss"],
    }


def table(rows: list[dict]) -> str:
    """A Markdown table of the summaries: speed-ups in pairs/s over each TRL variant, and the
    ratios of CPU seconds and peak RSS to TRL's default."""
    by_name = {r["variant"]: r for r in rows}
    baselines = [b for b in ("trl", "trl-precompute", "trl-nogc") if b in by_name]
    head = ["variant", "pairs/s", "tokens/s", "s/step (median)", "CPU s", "peak RSS GB", "MFU"]
    head += [f"speed-up vs {b}" for b in baselines]
    if "trl" in by_name:
        head += ["CPU s / trl", "RSS / trl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            f"{r['pairs_per_s']:.3f}",
            f"{r['tokens_per_s']:.1f}",
            "-" if r["step_seconds_median"] is None else f"{r['step_seconds_median']:.2f}",
            f"{r['cpu_seconds']:.0f}",
            f"{r['peak_rss_gb']:.2f}",
            f"{100 * r['mfu']:.1f}%",
        ]
        cells += [f"{r['pairs_per_s'] / by_name[b]['pairs_per_s']:.2f}x" for b in baselines]
        if "trl" in by_name:
            cells.append(f"{r['cpu_seconds'] / by_name['trl']['cpu_seconds']:.2f}")
            cells.append(f"{r['peak_rss_gb'] / by_name['trl']['peak_rss_gb']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drive(args: argparse.Namespace) -> int:
    import torch

    workload = Workload(
        model=args.model,
        data=args.data,
        pairs=args.pairs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
    )
    if workload.pairs % workload.batch_size:
        raise SystemExit("--pairs must be a multiple of --batch-size (every pair trained once)")
    try:
        import trl
    except ImportError:
        raise SystemExit('TRL is missing: pip install -e ".[bench]"') from None
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS) - set(OPTIONAL_VARIANTS)
    if unknown:
        known = ", ".join(VARIANTS + OPTIONAL_VARIANTS)
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {known}")
    if "ours-warm" in variants and "ours" not in variants:
        raise SystemExit("ours-warm reads the cache written by the 'ours' run of the same round")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="avgalign-bench-"))
    log_dir = work / "logs"
    log_dir.mkdir()
    print(
        f"avgalign DPO benchmark: torch {torch.__version__}, trl {trl.__version__}, "
        f"{workload.threads} threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY "
        f"{args.omp_wait}, load average {os.getloadavg()[0]:.2f}; logs in {log_dir}",
        flush=True,
    )

    from transformers import AutoConfig

    tokenizer = load_tokenizer(workload)
    _, pairs, too_long = select_pairs(workload, tokenizer)
    config = AutoConfig.from_pretrained(model_path(workload))
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(config)
    n_body, n_head = parameter_counts(meta)
    flops = {ref: model_flops(pairs, n_body, n_head, ref) for ref in (True, False)}
    prompt_tokens = sum(len(p.prompt_ids) for p in pairs)
    print(
        f"workload: {workload.model}, {workload.pairs} pairs of {Path(workload.data).name} "
        f"({too_long} longer than max_length {workload.max_length} passed over), "
        f"batch {workload.batch_size}, {workload.steps} steps, float32; "
        f"{data_tokens(pairs)} tokens (prompts {prompt_tokens}); "
        f"N_body {n_body / 1e6:.1f}M, N_head {n_head / 1e6:.1f}M",
        flush=True,
    )
    peaks = [run_worker("peak", [], workload, log_dir, args.omp_wait)["gflops"]]
    print(f"matmul peak (float32, 2048^2, {workload.threads} threads): {peaks[0]:.1f} GFLOP/s")

    parity = None
    if not args.skip_parity:
        parity = run_worker(
            "parity", ["--parity-pairs", str(args.parity_pairs)], workload, log_dir, args.omp_wait
        )
        print(
            "parity ({pairs} pairs, policy != reference by {d:.2f} nats on average): "
            "log-probs max rel. diff ours/naive {a:.1e}, TRL/naive {b:.1e}, ours/TRL {c:.1e}; "
            "losses ours/TRL dpo-sum {e:.1e}, ipo-mean {f:.1e}; token ids identical: {g}; "
            "{verdict}".format(
                pairs=parity["pairs"],
                d=parity["policy_minus_reference_mean_abs"],
                a=parity["logps_rel_ours_vs_naive"],
                b=parity["logps_rel_trl_vs_naive"],
                c=parity["logps_rel_ours_vs_trl"],
                e=parity["loss_rel_ours_vs_trl"]["dpo_sum"],
                f=parity["loss_rel_ours_vs_trl"]["ipo_mean"],
                g=parity["tokens_identical_to_trl"],
                verdict="PASSED" if parity["passed"] else "FAILED",
            ),
            flush=True,
        )

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    order = [v for v in VARIANTS + OPTIONAL_VARIANTS if v in variants]
    for round_ in range(1, args.rounds + 1):
        cache_dir = work / f"reference-cache-{round_}"  # fresh: ours pays for its reference
        for name in order:
            if name == "ours":
                extra = ["--cache-dir", str(cache_dir), "--beta", str(workload.beta)]
            elif name == "ours-warm":  # the next run of a beta sweep: same reference, new beta
                extra = ["--cache-dir", str(cache_dir), "--beta", str(2 * workload.beta)]
            else:
                extra = []
            worker = "ours" if name.startswith("ours") else name
            result = run_worker(worker, extra, workload, log_dir, args.omp_wait)
            runs[name].append(result)
            steps = result["step_seconds"][1:] or result["step_seconds"]
            note = f"; {result['reference_log_line']}" if result["reference_log_line"] else ""
            print(
                f"round {round_} {name:15s} whole {result['whole_seconds']:7.1f}s, "
                f"step median {statistics.median(steps):6.2f}s, "
                f"CPU {result['cpu_seconds']:7.1f}s, "
                f"peak RSS {result['peak_rss_bytes'] / 1e9:5.2f} GB{note}",
                flush=True,
            )
            if name.startswith("trl") and result["identical_pairs"] != workload.pairs:
                print(
                    f"  warning: TRL tokenised {workload.pairs - result['identical_pairs']} pairs "
                    f"differently ({result['trl_data_tokens']} vs {result['data_tokens']} tokens)"
                )
    peaks.append(run_worker("peak", [], workload, log_dir, args.omp_wait)["gflops"])
    peak = max(peaks)
    rows = [summarise(name, runs[name], workload, flops, peak) for name in order]
    print(
        f"\nmatmul peak {peak:.1f} GFLOP/s (start {peaks[0]:.1f}, end {peaks[1]:.1f}); "
        f"{args.rounds} round(s); total {time.perf_counter() - started:.0f}s; "
        f"load average {os.getloadavg()[0]:.2f}\n"
    )
    print(table(rows))
    if "trl" in runs and args.rounds > 1:
        fastest = {name: min(r["whole_seconds"] for r in runs[name]) for name in order}
        print(
            "\nspeed-up vs trl from each variant's fastest round (noise only adds time): "
            + ", ".join(f"{n} {fastest['trl'] / fastest[n]:.2f}x" for n in order if n != "trl")
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "workload": asdict(workload),
                    "matmul_peak_gflops": peaks,
                    "parity": parity,
                    "summary": rows,
                    "runs": runs,
                },
                indent=2,
            )
        )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if parity is None or parity["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--parity-pairs", type=int, default=8)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--omp-wait",
        default="PASSIVE",
        help="OMP_WAIT_POLICY of every worker (PASSIVE, ACTIVE, or inherit: leave it as it is); "
        "see benchmarks/README.md",
    )
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--keep", action="store_true", help="keep the logs and caches")
    # worker mode (started by the driver)
    parser.add_argument(
        "--worker", choices=["ours", "trl", "trl-precompute", "trl-nogc", "parity", "peak"]
    )
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--beta", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        return drive(args)
    workload = Workload(**json.loads(args.workload))
    with contextlib.redirect_stderr(sys.stdout):
        if args.worker == "ours":
            worker_ours(workload, args.cache_dir, args.beta)
        elif args.worker == "peak":
            _result({"gflops": matmul_peak(workload.threads)})
        elif args.worker == "parity":
            worker_parity(workload, args.parity_pairs, noise=0.02)
        else:
            worker_trl(
                workload,
                precompute=args.worker == "trl-precompute",
                gradient_checkpointing=args.worker != "trl-nogc",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
