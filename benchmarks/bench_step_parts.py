"""Parts of this project's trainer, old way against new: split attention against the dense
shared-prompt mask, fused AdamW against the default, reference batches capped in padding
against fixed batches of 8.

Each part is measured in one process, the two variants alternating, so that a machine that
slows down slows both:

- `attention`: forward + backward of `CompletionLogProbs` (the completion log-prob sum) on
  SmolLM2-135M-Instruct (the benchmark's model), for shared-prompt rows of a given shape (random
  tokens: attention's cost depends on shapes only), with the model's SDPA attention given the
  dense [L, L] mask, and with split attention (`avgalign.attention`: one causal SDPA call per
  completion, no mask). Also the maximum difference of the log-prob sums between the two.
- `optimizer`: gradient clipping + one AdamW step over the model's parameters, torch's default
  (foreach) and fused implementations, with random gradients.
- `reference`: the reference pass (`compute_reference_logps`, inference, split attention) over
  the 16 pairs of each `bench_dpo.py` workload, length-sorted batches of 8 as before against
  batches of at most 8 pairs, 4,096 tokens and `REFERENCE_MAX_PADDING` padding (the trainer's).

Prints each repeat's seconds and the ratio of the fastest repeats (noise only adds time).

    python benchmarks/bench_step_parts.py                       # every part, default shapes
    python benchmarks/bench_step_parts.py --parts attention --shapes 2:300,700,700 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "OMP_WAIT_POLICY" not in os.environ:  # read once, when torch loads OpenMP: set it first
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

# (rows, prompt, chosen, rejected) tokens: HH's median-length batch (rows of ~250), the long
# workload's (~1,050) and rows as long as max length 2048 allows
DEFAULT_SHAPES = ["4:100,45,50", "2:180,435,435", "2:300,700,700"]


def attention(model, rows: int, shape: tuple[int, int, int], repeats: int) -> None:
    from avgalign.attention import SPLIT_ATTENTION
    from avgalign.logprobs import CompletionLogProbs, pack_pairs

    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[list[int]]:
        return [torch.randint(1, 1000, (n,), generator=g).tolist() for _ in range(rows)]

    batch = pack_pairs(*(tokens(n) for n in shape), pad_id=0)
    seconds: dict[str, list[float]] = {"dense": [], "split": []}
    sums = {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, implementation in (("dense", "sdpa"), ("split", SPLIT_ATTENTION)):
            model.set_attn_implementation(implementation)
            scorer = CompletionLogProbs(model)
            t0 = time.perf_counter()
            value, _ = scorer(batch)
            value.sum().backward()
            seconds[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            sums[name] = value.detach()
    dense, split = (min(seconds[k][1:]) for k in ("dense", "split"))
    print(
        f"rows {rows} x (prompt, chosen, rejected) {shape} = {tuple(batch.input_ids.shape)}: "
        f"dense {', '.join(f'{s:.2f}' for s in seconds['dense'][1:])} s; "
        f"split {', '.join(f'{s:.2f}' for s in seconds['split'][1:])} s; "
        f"fastest split / dense = {split / dense:.3f}; "
        f"max |sum diff| {float((sums['dense'] - sums['split']).abs().max()):.1e} "
        f"(sums ~{float(sums['dense'].abs().mean()):.0f})",
        flush=True,
    )


def optimizer(model, repeats: int) -> None:
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    seconds: dict[str, list[float]] = {"foreach": [], "fused": []}
    optimizers = {
        "foreach": torch.optim.AdamW(params, lr=1e-6),
        "fused": torch.optim.AdamW(params, lr=1e-6, fused=True),
    }
    for _ in range(repeats + 1):
        for name, opt in optimizers.items():
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            seconds[name].append(time.perf_counter() - t0)
    foreach, fused = (min(seconds[k][1:]) for k in ("foreach", "fused"))
    print(
        f"clip + AdamW step over {sum(p.numel() for p in params) / 1e6:.1f}M parameters: "
        f"foreach {', '.join(f'{s:.3f}' for s in seconds['foreach'][1:])} s; "
        f"fused {', '.join(f'{s:.3f}' for s in seconds['fused'][1:])} s; "
        f"fastest fused / foreach = {fused / foreach:.3f}",
        flush=True,
    )


def reference(model, args, name: str) -> None:
    import avgalign.reference as ref
    from avgalign.logprobs import CompletionLogProbs, use_split_attention

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_dpo import WORKLOADS, Workload, load_tokenizer, select_pairs

    data, max_length = WORKLOADS[name]
    workload = Workload(model=args.model, data=str(data), pairs=16, batch_size=4,
                        max_length=max_length, threads=args.threads)
    tokenizer = load_tokenizer(workload)
    _, pairs, _ = select_pairs(workload, tokenizer)
    use_split_attention(model)
    scorer = CompletionLogProbs(model)
    capped = ref.REFERENCE_MAX_PADDING
    seconds: dict[str, list[float]] = {"batches of 8": [], "capped": []}
    for _ in range(args.repeats):
        for label, (max_tokens, max_padding) in (("batches of 8", (0, 1.0)),
                                                 ("capped", (4096, capped))):
            ref.REFERENCE_MAX_PADDING = max_padding
            t0 = time.perf_counter()
            ref.compute_reference_logps(scorer, pairs, pad_id=tokenizer.pad_token_id,
                                        layout="shared_prompt", batch_size=8,
                                        device=torch.device("cpu"), progress=False,
                                        max_tokens=max_tokens)
            seconds[label].append(time.perf_counter() - t0)
    ref.REFERENCE_MAX_PADDING = capped
    before, after = (min(v) for v in seconds.values())
    print(
        f"reference pass, {name} workload ({len(pairs)} pairs, max length {max_length}): "
        + "; ".join(f"{k} {', '.join(f'{s:.1f}' for s in v)} s" for k, v in seconds.items())
        + f"; fastest capped / batches of 8 = {after / before:.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES,
                        help="rows:prompt,chosen,rejected tokens (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--parts", nargs="+", default=["attention", "optimizer", "reference"],
                        choices=["attention", "optimizer", "reference"])
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from avgalign.models import resolve_model_path

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(args.model), dtype=torch.float32, attn_implementation="sdpa"
    )
    if "attention" in args.parts:
        for spec in args.shapes:
            rows, lengths = spec.split(":")
            attention(model, int(rows), tuple(int(n) for n in lengths.split(",")), args.repeats)
    if "optimizer" in args.parts:
        optimizer(model, args.repeats)
    if "reference" in args.parts:
        for workload in ("hh", "long"):
            reference(model, args, workload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
