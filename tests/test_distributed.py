"""Sharded and multi-process training on CPU (2 processes, gloo): FSDP2 against 1 process, exact
resume of a killed sharded run, a stop signal reaching one process, the shared reference pass,
and held-out evaluation with fewer pairs than processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from avgalign.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp2-cpu-2proc.yaml"
LAUNCHER = Path(sys.executable).parent / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
TIMING = {"seconds", "pairs_per_s", "tokens_per_s"}

pytestmark = pytest.mark.skipif(not LAUNCHER.is_file(), reason="accelerate launcher not installed")


def write_config(tmp: Path, model_dir: Path, data_file: Path, cache: Path, **train) -> Path:
    keys = {
        "batch_size": 8,
        "micro_batch_size": 2,
        "eval_batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        "save_every": 3,
        "learning_rate": 1.0e-3,
        "warmup_ratio": 0.0,
        "progress": False,
        "reference_cache_dir": str(cache),
        **train,
    }
    # 64 records, 2% held out: 1 held-out pair for 2 processes
    data = {"train": str(data_file), "max_length": 64, "eval_fraction": 0.02}
    path = tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml"
    path.write_text(json.dumps({"model": {"name": str(model_dir)}, "data": data, "train": keys}))
    return path


def one_process(cfg: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "avgalign", "train", str(cfg), "--output-dir", str(out), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def fsdp_command(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [str(LAUNCHER), "launch", "--config_file", str(FSDP_CONFIG), "-m", "avgalign",
            "train", str(cfg), "--output-dir", str(out), *extra]


def fsdp(cfg: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(fsdp_command(cfg, out, *extra), env=ENV, capture_output=True, text=True,
                          timeout=300)


def rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def wait_for_rows(proc: subprocess.Popen, run: Path, n: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{metrics} did not reach {n} rows")


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes `accelerate launch` started."""
    found = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if parent == launcher_pid and ranks:
            found[int(ranks[0])] = pid
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, synthetic_file):
    """A 1-process run and a 2-process FSDP run of one config, each with its own fresh reference
    cache."""
    tmp = tmp_path_factory.mktemp("distributed")
    cfg_one = write_config(tmp, tiny_model_dir, synthetic_file, tmp / "cache-one")
    cfg_two = write_config(tmp, tiny_model_dir, synthetic_file, tmp / "cache-two")
    one, two = tmp / "one", tmp / "two"
    done = one_process(cfg_one, one)
    assert done.returncode == 0, done.stderr[-3000:]
    done = fsdp(cfg_two, two)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg_two, "one": one, "two": two, "stdout": done.stdout}


def test_fsdp_two_processes_match_one(runs):
    one, two = runs["one"], runs["two"]
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    a, b = rows(one), rows(two)
    assert [r["split"] for r in a] == [r["split"] for r in b] == [
        "train", "train", "eval", "train", "train", "train", "train", "eval"
    ]
    for ra, rb in zip(a, b):
        # same global batch, split over processes and shards: equal up to summation order
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["reward_margin"] == pytest.approx(ra["reward_margin"], rel=1e-4, abs=1e-6)
        if ra["split"] == "train":
            assert rb["learning_rate"] == ra["learning_rate"]
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)


def test_fsdp_final_model_loads_and_matches_one_process(runs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs["two"] / "model")
    single = AutoModelForCausalLM.from_pretrained(runs["one"] / "model")
    got, want = dict(model.named_parameters()), dict(single.named_parameters())
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_reference_is_shared_and_its_cache_is_the_same_for_any_process_count(runs):
    assert "shared by 2 processes" in runs["stdout"]
    names = sorted(p.name for p in (runs["tmp"] / "cache-one").glob("ref-*"))
    assert len(names) == 2  # the training pairs and the held-out pair
    assert names == sorted(p.name for p in (runs["tmp"] / "cache-two").glob("ref-*"))
    for name in names:  # computed by 1 process, and in halves by 2: the same numbers
        x = load_file(str(runs["tmp"] / "cache-one" / name))
        y = load_file(str(runs["tmp"] / "cache-two" / name))
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)


def test_killed_fsdp_run_resumes_as_if_uninterrupted(runs):
    out = runs["tmp"] / "killed"
    proc = subprocess.Popen(fsdp_command(runs["cfg"], out), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list_checkpoints(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    # during step 4 or 5 (a step takes ~0.3 s here); the workers are not in the launcher's
    # process group
    for pid in [*worker_pids(proc.pid).values(), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert [c.name for c in list_checkpoints(out)] == ["step-3"]
    assert not (out / "model").exists()
    done = fsdp(runs["cfg"], out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    # gloo's sharded reductions are not bitwise reproducible from run to run (two uninterrupted
    # FSDP runs differ by ~1e-7): equal to float32 rounding, not bit for bit
    resumed, whole = rows(out), rows(runs["two"])
    assert [r.keys() for r in resumed] == [r.keys() for r in whole]
    for ra, rb in zip(resumed, whole):
        assert ra.pop("split") == rb.pop("split")
        assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(runs["two"] / "model" / "model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_signal_to_one_process_stops_both_at_the_same_step(runs, tiny_model_dir,
                                                             synthetic_file):
    cfg = write_config(runs["tmp"], tiny_model_dir, synthetic_file, runs["tmp"] / "cache-two",
                       max_steps=500, save_every=0, eval_every=0)
    out = runs["tmp"] / "signalled"
    proc = subprocess.Popen(fsdp_command(cfg, out), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_rows(proc, out, 3)
    workers = worker_pids(proc.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)  # not the main process
    stdout, stderr = proc.communicate(timeout=120)  # both exit: no hang
    assert "stopped by SIGTERM (received by process 1)" in stderr
    (ckpt,) = list_checkpoints(out)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    assert 3 <= step < 500
    assert [r["step"] for r in rows(out)] == list(range(1, step + 1))
    shutil.rmtree(out)


def test_lora_under_fsdp_saves_the_adapter_and_the_merged_model(runs, tiny_model_dir,
                                                                synthetic_file):
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    paths = []
    for name in ("lora-one", "lora-two"):
        cfg = write_config(runs["tmp"], tiny_model_dir, synthetic_file, runs["tmp"] / name,
                           learning_rate=1e-2)
        data = json.loads(cfg.read_text())
        data["model"].update(lora)
        cfg.write_text(json.dumps(data))
        paths.append((cfg, runs["tmp"] / name / "run"))
    (cfg_one, one), (cfg_two, two) = paths
    assert one_process(cfg_one, one).returncode == 0
    done = fsdp(cfg_two, two)
    assert done.returncode == 0, done.stderr[-3000:]
    for f in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(one / f)), load_file(str(two / f))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def _backend(distributed_type, world=1, batch_size=8):
    from types import SimpleNamespace

    return SimpleNamespace(
        accelerator=SimpleNamespace(distributed_type=distributed_type),
        tc=SimpleNamespace(batch_size=batch_size),
        world=world,
    )


def test_deepspeed_and_weights_on_one_process_are_refused(monkeypatch):
    from accelerate.utils import DistributedType

    from avgalign.config import ConfigError
    from avgalign.train import Trainer

    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*use FSDP"):
        Trainer.check_backend(_backend(DistributedType.DEEPSPEED))
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        Trainer.check_backend(_backend(DistributedType.FSDP))
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    Trainer.check_backend(_backend(DistributedType.FSDP))
    with pytest.raises(ConfigError, match="divisible by the 3 processes"):
        Trainer.check_backend(_backend(DistributedType.FSDP, world=3))


def test_attention_plan():
    from avgalign.attention import SPLIT_ATTENTION
    from avgalign.attention_plan import attention_plan
    from avgalign.config import ConfigError
    from avgalign.logprobs import FLEX_ATTENTION

    no_flex = "no backward on CPU"
    # on a CPU: split attention where the model can, else the dense mask; flex never
    impl, layout, note = attention_plan("auto", "shared_prompt", "cpu", no_flex, None)
    assert (impl, layout) == (SPLIT_ATTENTION, "shared_prompt") and "split" in note
    impl, layout, note = attention_plan("auto", "shared_prompt", "cpu", no_flex, "it runs 'eager'")
    assert (impl, layout) == (None, "shared_prompt") and "it runs 'eager'" in note
    with pytest.raises(ConfigError, match="train.attention=flex: no backward on CPU"):
        attention_plan("flex", "shared_prompt", "cpu", no_flex, None)
    with pytest.raises(ConfigError, match="train.attention=split: soft-capped"):
        attention_plan("split", "shared_prompt", "cpu", no_flex, "soft-capped")
    # on a GPU: flex where the model can, else split, else concat with the model's attention
    impl, layout, note = attention_plan("auto", "shared_prompt", "cuda", None, None)
    assert (impl, layout) == (FLEX_ATTENTION, "shared_prompt") and "BlockMask" in note
    impl, layout, note = attention_plan("auto", "shared_prompt", "cuda", "dropout 0.1", None)
    assert (impl, layout) == (SPLIT_ATTENTION, "shared_prompt")
    impl, layout, note = attention_plan("split", "shared_prompt", "cuda", None, None)
    assert (impl, layout) == (SPLIT_ATTENTION, "shared_prompt")
    impl, layout, note = attention_plan("auto", "shared_prompt", "cuda", "dropout 0.1", "eager")
    assert (impl, layout) == (None, "concat") and "dropout 0.1" in note and "eager" in note
    for device in ("cpu", "cuda"):
        assert attention_plan("model", "shared_prompt", device, None, None) == (
            None, "shared_prompt", None)
        assert attention_plan("auto", "concat", device, None, None) == (None, "concat", None)


@pytest.mark.parametrize("skip", [False, True])
def test_a_nan_on_one_process_is_seen_by_both(runs, tiny_model_dir, synthetic_file, skip):
    """A NaN gradient on process 1 only, at step 3: both stop with the error naming step 3
    (checkpoints 1 and 2 intact), or, with train.skip_nonfinite, both skip step 3 and finish."""
    cfg = write_config(runs["tmp"], tiny_model_dir, synthetic_file, runs["tmp"] / "cache-two",
                       save_every=1, eval_every=0, skip_nonfinite=skip, keep_checkpoints=10)
    out = runs["tmp"] / f"nan-{skip}"
    script = REPO / "tests" / "helpers" / "poisoned_train.py"
    cmd = [str(LAUNCHER), "launch", "--config_file", str(FSDP_CONFIG), str(script), str(cfg),
           "--output-dir", str(out)]
    # two micro-batches per process per step: the 5th loss on process 1 is step 3's first
    env = {**ENV, "POISON_RANK": "1", "POISON_CALL": "5"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if not skip:
        assert done.returncode != 0
        assert "non-finite loss or gradient at step 3" in done.stderr
        assert [c.name for c in list_checkpoints(out)] == ["step-1", "step-2"]
        return
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert [r["split"] for r in rows(out)][:4] == ["train", "train", "skipped", "train"]
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_token_budget_under_fsdp_matches_one_process(runs, tiny_model_dir, synthetic_file):
    """Micro-batches cut by a token budget differ between the processes; each makes as many
    forward passes as the other (a sharded forward is collective), and the losses are those of
    1 process."""
    budget = {"micro_batch_size": 4, "max_tokens_per_micro_batch": 20, "eval_every": 0}
    cfg = write_config(runs["tmp"], tiny_model_dir, synthetic_file, runs["tmp"] / "cache-two",
                       **budget)
    one, two = runs["tmp"] / "budget-one", runs["tmp"] / "budget-two"
    assert one_process(cfg, one).returncode == 0
    done = fsdp(cfg, two)
    assert done.returncode == 0, done.stderr[-3000:]
    for ra, rb in zip(rows(one), rows(two), strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        if ra["split"] == "train":
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4)
