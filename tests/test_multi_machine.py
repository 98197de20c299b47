"""Two "machines" on localhost: `accelerate launch --num_machines 2 --machine_rank 0/1
--main_process_ip 127.0.0.1` (one CPU process each, gloo), as docs/distributed.md writes it for
two nodes. The pair trains as one process does (loss per step, final weights), and a pair killed
with SIGKILL after a checkpoint resumes on both machines to the same end."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import ENV, cli, free_port, metric_rows, write_config
from safetensors.torch import load_file

from avgalign.checkpoint import list_checkpoints

LAUNCHER = Path(sys.executable).parent / "accelerate"
pytestmark = [
    pytest.mark.skipif(not LAUNCHER.is_file(), reason="accelerate launcher not installed"),
    pytest.mark.slow,
]


def start_pair(cfg: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        command = [str(LAUNCHER), "launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "avgalign", "train", str(cfg), "--output-dir", str(out), *extra]
        procs.append(subprocess.Popen(command, env={**ENV, "ACCELERATE_USE_CPU": "1"},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_close_runs(a: Path, b: Path) -> None:
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x, y)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, synthetic_file):
    tmp = tmp_path_factory.mktemp("machines")
    cfg = write_config(tmp, tiny_model_dir, synthetic_file, batch_size=8, micro_batch_size=4,
                       max_steps=60, save_every=4, warmup_ratio=0.0)
    one = tmp / "one"
    subprocess.run(cli(str(cfg), "--output-dir", str(one)), env=ENV, check=True,
                   capture_output=True)
    return tmp, cfg, one


def test_two_machines_train_as_one_process(runs):
    tmp, cfg, one = runs
    pair = tmp / "pair"
    results = finish(start_pair(cfg, pair))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    summary = json.loads((pair / "summary.json").read_text())
    assert (summary["processes"], summary["machines"], summary["backend"]) == (2, 2, "gloo")
    assert_close_runs(one, pair)


def test_a_killed_pair_resumes_on_both_machines(runs):
    tmp, cfg, one = runs
    killed = tmp / "killed"
    procs = start_pair(cfg, killed)
    deadline = time.time() + 240
    while time.time() < deadline and not list_checkpoints(killed):
        assert all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.01)
    # every process of both machines (launchers, agents, workers), as a lost node would be
    doomed = [psutil.Process(p.pid) for p in procs]
    doomed += [child for parent in doomed for child in parent.children(recursive=True)]
    for process in doomed:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    finish(procs)
    assert not (killed / "summary.json").exists(), "the pair finished before it was killed"
    newest = max(int(p.name.split("-")[1]) for p in list_checkpoints(killed))
    assert newest < 60

    results = finish(start_pair(cfg, killed, "--resume"))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert f"(step {newest} of 60)" in results[0][1]
    assert_close_runs(one, killed)
