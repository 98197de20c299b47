"""Peak memory of the shared-prompt layout's attention mask: dense additive mask vs flex BlockMask.

One step of `CompletionLogProbs` (the completion log-prob sum, forward + backward by default) on
a tiny random Llama, at a row length L, with the mask as

- `dense`: attn_implementation="sdpa", the additive float mask [rows, 1, L, L] of
  `shared_prompt_mask`;
- `flex`: attn_implementation="flex_attention", the BlockMask of `shared_prompt_block_mask`;
- `concat`: for scale, the fallback layout: two rows per pair ([prompt | chosen], [prompt |
  rejected]), sdpa with its own causal mask (no L x L tensor).

Each variant runs in a fresh subprocess: one warm-up step (which compiles flex attention), then
the measured step. What is measured:

- CUDA: the peak of PyTorch's CUDA allocator (`torch.cuda.max_memory_allocated`) during the
  measured step, minus what was allocated just before it (the weights; gradients are set to None
  before the step, so they count in the step).
- CPU: the peak resident set size of the process (VmHWM, reset through /proc/self/clear_refs)
  during the measured step, minus the resident set size just before it, with glibc's
  MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB so that freed tensors go back to the system instead of
  staying in malloc's free lists. PyTorch's flex attention has no backward pass on CPU, so there
  the step is the forward pass alone (no grad), for every variant.

Also reported: the bytes of the mask itself (the dense tensor, or the BlockMask's block tables)
and seconds per step (the mean of `--repeat` steps after the measured one; on a shared machine
only indicative).

    python benchmarks/bench_shared_mask_memory.py                      # CPU, L = 4096
    python benchmarks/bench_shared_mask_memory.py --device cuda --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("dense", "flex", "concat")
# options the parent passes on to each worker subprocess
WORKER_OPTIONS = ("device", "pairs", "mode", "dtype", "hidden", "layers", "heads", "vocab")
WORKER_OPTIONS += ("threads", "repeat")
IMPLEMENTATION = {"dense": "sdpa", "flex": "flex_attention", "concat": "sdpa"}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from avgalign.logprobs import (
        CompletionLogProbs,
        pack_pairs,
        shared_prompt_block_mask,
        shared_prompt_mask,
    )

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    variant, length = args.variant, args.length
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=length,
    )
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=IMPLEMENTATION[variant])
    lm = lm.to(device=device, dtype=dtype).train()
    scorer = CompletionLogProbs(lm)
    layout = "concat" if variant == "concat" else "shared_prompt"
    prompt_len, completion_len = length // 4, (length - length // 4) // 2
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, args.vocab, (n,), generator=g).tolist()

    prompts = [tokens(prompt_len) for _ in range(args.pairs)]
    chosen = [tokens(completion_len) for _ in range(args.pairs)]
    rejected = [tokens(length - prompt_len - completion_len) for _ in range(args.pairs)]
    batch = pack_pairs(prompts, chosen, rejected, 0, layout).to(device)
    train = args.mode == "train"
    if train and device.type == "cpu" and variant == "flex":
        raise SystemExit("flex attention has no backward pass on CPU: use --mode forward")

    mask_bytes = 0
    if variant != "concat":
        rule = scorer.attention.rule("full_attention", batch.longest_sequence)
        if variant == "dense":
            mask = shared_prompt_mask(batch, rule, dtype)
            mask_bytes = mask.numel() * mask.element_size()
        else:
            mask = shared_prompt_block_mask(batch, rule)
            mask_bytes = sum(
                t.numel() * t.element_size() for t in mask.as_tuple() if torch.is_tensor(t)
            )
        del mask

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        lm.zero_grad(set_to_none=True)
        if train:
            sums, _ = scorer(batch)
            sums.sum().backward()
        else:
            with torch.no_grad():
                scorer(batch)
        sync()

    t0 = time.perf_counter()
    step()  # warm-up: compiles flex attention, fills the allocator's pools
    warmup_s = time.perf_counter() - t0
    lm.zero_grad(set_to_none=True)
    gc.collect()
    sync()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = _rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step()
        peak = _rss_kib("VmHWM") * 1024 - before
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "variant": variant,
        "implementation": IMPLEMENTATION[variant],
        "layout": layout,
        "length": length,
        "rows": int(batch.input_ids.shape[0]),
        "row_length": int(batch.input_ids.shape[1]),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "dtype": args.dtype,
        "mode": args.mode,
        "threads": args.threads,
        "peak_step_bytes": int(peak),
        "mask_bytes": int(mask_bytes),
        "warmup_s": warmup_s,
        "step_s": sum(times) / len(times) if times else None,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--pairs", type=int, default=1, help="pairs per batch (rows)")
    parser.add_argument(
        "--mode",
        choices=("train", "forward"),
        default=None,
        help="train: forward + backward (default on CUDA); forward: no grad "
        "(default on CPU, where flex attention has no backward pass)",
    )
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.mode = args.mode or ("train" if cuda else "forward")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.variant:
        print(json.dumps(worker(args)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_WAIT_POLICY": "PASSIVE"}
    results = []
    for length in args.lengths:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--variant", variant, "--length", str(length)]
            for name in WORKER_OPTIONS:
                cmd += [f"--{name}", str(getattr(args, name))]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{variant} L={length} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    mib = 2**20
    print(
        f"\n{args.device}, {args.dtype}, {args.mode}, Llama {args.layers} layers, hidden "
        f"{args.hidden}, {args.heads} heads, vocab {args.vocab}, {args.pairs} pair(s)\n"
    )
    print("| L | variant | rows x length | mask (MiB) | peak of the step (MiB) | s/step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        step_s = f"{r['step_s']:.3f}" if r["step_s"] is not None else "-"
        print(
            f"| {r['length']} | {r['variant']} ({r['implementation']}) | {r['rows']} x "
            f"{r['row_length']} | {r['mask_bytes'] / mib:.2f} | "
            f"{r['peak_step_bytes'] / mib:.1f} | {step_s} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
