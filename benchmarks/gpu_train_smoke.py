"""A short training run on CUDA through `avgalign.train.train`, once per train.attention setting,
to check the GPU path end to end (flex attention with the shared-prompt BlockMask, the
self-check, varying sequence lengths): prints the layout and attention used, the losses per step
and the max difference between the settings. Run from the repository root on a CUDA machine:

    PYTHONPATH=src python benchmarks/gpu_train_smoke.py
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import make_tokenizer, synthetic_records  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from avgalign.config import Config  # noqa: E402
from avgalign.train import train  # noqa: E402


def model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def main() -> None:
    print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}", flush=True)
    tok = make_tokenizer()
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(64)))
    losses = {}
    for attention in ("auto", "model"):
        cfg = Config()
        cfg.data.train = str(data)
        cfg.data.eval_fraction = 0.0
        for k, v in dict(batch_size=8, micro_batch_size=4, max_steps=6, learning_rate=1e-3,
                         warmup_ratio=0.0, progress=False, save_model=False, save_every=0,
                         mixed_precision="no", attention=attention,
                         reference_cache_dir=str(tmp / "cache"),
                         output_dir=str(tmp / attention)).items():
            setattr(cfg.train, k, v)
        t0 = time.perf_counter()
        result = train(cfg, model=model(len(tok)), tokenizer=tok)
        rows = [json.loads(x) for x in (tmp / attention / "metrics.jsonl").read_text().splitlines()]
        losses[attention] = [r["loss"] for r in rows if r["split"] == "train"]
        print(f"attention={attention}: layout {result.layout}, self-check "
              f"{result.self_check.relative_error:.1e}, {time.perf_counter() - t0:.1f}s, "
              f"losses {[round(x, 6) for x in losses[attention]]}", flush=True)
    diff = max(abs(a - b) for a, b in zip(losses["auto"], losses["model"]))
    print(f"max |loss auto - loss model| over 6 steps: {diff:.2e}")


if __name__ == "__main__":
    main()
