"""Where the time of one training step of this project's DPO trainer goes: torch.profiler tables.

    python benchmarks/profile_step.py [--threads 2] [--steps 3] [--chunk-size 1024]

Builds what `avgalign.train.train` builds for a step (the policy wrapped in CompletionLogProbs,
shared-prompt rows with split attention where the model allows it, fused AdamW, gradient
clipping, reference log-probs precomputed; `--attention model` gives the dense mask), takes the
length-grouped batch of median length among the benchmark's pairs (benchmarks/bench_dpo.py, same
defaults), runs warm-up steps and profiles the last one. Prints the time of each phase (forward,
loss, backward, clipping + optimizer) and the operators with the most self CPU time.
Run it with the same OMP_WAIT_POLICY as the benchmark (it sets PASSIVE unless told otherwise).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:  # read once, when torch loads OpenMP: set it first
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import DEFAULT_DATA, Workload, load_tokenizer, model_path, select_pairs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="steps run; the last is profiled")
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--attention", choices=("split", "model"), default="split",
                        help="split: causal SDPA passes (the trainer's choice on a CPU); "
                        "model: the dense shared-prompt mask")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from avgalign.batching import batch_order
    from avgalign.logprobs import CompletionLogProbs, pack_pairs, use_split_attention
    from avgalign.losses import LossParams, preference_loss
    from avgalign.reference import compute_reference_logps, pair_length
    from avgalign.train import adamw

    workload = Workload(
        model=args.model,
        data=args.data,
        pairs=args.pairs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
    )
    torch.set_num_threads(workload.threads)
    tokenizer = load_tokenizer(workload)
    _, pairs, _ = select_pairs(workload, tokenizer)
    batches = batch_order([pair_length(p) for p in pairs], workload.batch_size, 0, 0, True)
    batches.sort(key=lambda idx: sum(pair_length(pairs[i]) for i in idx))
    chosen = [pairs[i] for i in batches[len(batches) // 2]]
    batch = pack_pairs(
        [p.prompt_ids for p in chosen],
        [p.chosen_ids for p in chosen],
        [p.rejected_ids for p in chosen],
        tokenizer.pad_token_id,
        "shared_prompt",
    )
    model = AutoModelForCausalLM.from_pretrained(model_path(workload), dtype=torch.float32)
    refused = use_split_attention(model) if args.attention == "split" else "not asked for"
    print(f"attention: {'split' if refused is None else f'dense mask ({refused})'}")
    policy = CompletionLogProbs(model, chunk_size=args.chunk_size)
    ref = compute_reference_logps(
        policy,
        chosen,
        pad_id=tokenizer.pad_token_id,
        layout="shared_prompt",
        batch_size=len(chosen),
        device=torch.device("cpu"),
        progress=False,
    )
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = adamw(params, workload.learning_rate, 0.0, torch.device("cpu"))
    m = len(chosen)
    print(
        f"batch: {m} pairs, rows {tuple(batch.input_ids.shape)}, "
        f"{batch.num_real_tokens} real tokens "
        f"({1 - batch.num_real_tokens / batch.input_ids.numel():.1%} padding), "
        f"{batch.target_ids.numel()} completion tokens; {workload.threads} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )

    def step() -> None:
        with record_function("forward"):
            sums, counts = policy(batch)
        with record_function("loss"):
            loss, _ = preference_loss(
                "dpo",
                sums[:m],
                sums[m:],
                ref.chosen,
                ref.rejected,
                counts[:m],
                counts[m:],
                LossParams(beta=workload.beta),
            )
        with record_function("backward"):
            loss.backward()
        with record_function("clip+optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    policy.train()
    seconds = []
    for _ in range(args.steps - 1):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    print("unprofiled steps (s): " + ", ".join(f"{s:.2f}" for s in seconds))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    total = sum(phases.values())
    print(f"\nprofiled step: {total:.2f}s (median unprofiled {statistics.median(seconds):.2f}s)")
    for name in PHASES:
        print(f"  {name:15s} {phases.get(name, 0.0):6.2f}s  {phases.get(name, 0.0) / total:6.1%}")
    print()
    top = events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60)
    print(top)
    return 0


PHASES = ("forward", "loss", "backward", "clip+optimizer")

if __name__ == "__main__":
    sys.exit(main())
