"""Launching and resuming as a user does: the README's multi-process command runs the processes
it says, a launch that would quietly run one process is refused, default settings checkpoint a
run so that a SIGKILL loses little, `--resume` says what it does and leaves a finished run as it
is, a hub name fails fast offline, and a run records the versions it ran with."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ENV, cli, free_port, metric_rows, run_until, write_config

from avgalign.checkpoint import list_checkpoints
from avgalign.versions import WATCHED, outside_window, window_warning

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).parent / "accelerate"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "configs").rglob("*.md"))]


def launch_lines() -> list[tuple[Path, str]]:
    """Every `accelerate launch` command written in the README and the docs."""
    found = []
    for path in DOCS:
        for line in path.read_text().splitlines():
            if "accelerate launch" in line:
                found.append((path, line))
    return found


def test_every_documented_multi_process_launch_starts_several_processes():
    """`accelerate launch --num_processes N` without --multi_gpu (or a config file) starts one
    process: every command written down that asks for several must say how to start them."""
    lines = launch_lines()
    assert lines
    for path, line in lines:
        for command in re.findall(r"accelerate launch[^`|]*", line):
            n = re.search(r"--num_processes[ =](\d+)", command)
            if n and int(n.group(1)) > 1:
                assert "--multi_gpu" in command or "--config_file" in command, (path, command)
            assert "--cpu" not in command.split(), (path, command)  # --cpu starts one process


def readme_cpu_launch() -> str:
    """The README's DDP line for CPU processes, without its comment."""
    lines = (REPO / "README.md").read_text().splitlines()
    (line,) = [x for x in lines if x.startswith("ACCELERATE_USE_CPU=1 ") and " 2 " in x]
    return line.split("#")[0].strip()


@pytest.mark.slow
def test_the_readme_cpu_launch_runs_two_processes(tmp_path, tiny_model_dir, synthetic_file):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, batch_size=8, max_steps=2,
                       micro_batch_size=4, save_every=0)
    out = tmp_path / "run"
    command = readme_cpu_launch().replace("CONFIG", f"{cfg} --output-dir {out}")
    words = shlex.split(command)
    env = dict(ENV)
    while "=" in words[0]:  # the VAR=value prefixes
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    words[0] = str(Path(sys.executable).parent / words[0].removeprefix(".venv/bin/"))
    words[2:2] = ["--main_process_port", str(free_port())]  # not 29500: tests run side by side
    done = subprocess.run(words, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["backend"] == "gloo", summary
    assert summary["machines"] == 1
    assert "processes: 2 on 1 machine(s) (MULTI_CPU, backend gloo)" in done.stdout


@pytest.mark.skipif(not LAUNCHER.is_file(), reason="accelerate launcher not installed")
def test_a_launch_that_asked_for_two_processes_and_started_one_is_an_error(
    tmp_path, tiny_model_dir, synthetic_file
):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=1)
    out = tmp_path / "run"
    command = [str(LAUNCHER), "launch", "--cpu", "--num_processes", "2", "-m", "avgalign",
               "train", str(cfg), "--output-dir", str(out)]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "error: accelerate launch was asked for several processes but started one" in (
        done.stderr
    )
    assert "avgalign/" not in done.stderr  # our one line; the launcher adds its own traceback
    assert not (out / "metrics.jsonl").exists()


def test_default_settings_checkpoint_a_tenth_of_the_run_and_a_kill_loses_at_most_that(
    tmp_path, tiny_model_dir, synthetic_file
):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=20)
    text = json.loads(cfg.read_text())
    del text["train"]["save_every"]  # the defaults: save_every auto, save_minutes 10
    cfg.write_text(json.dumps(text))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli(str(cfg), "--output-dir", str(whole)), env=ENV, check=True,
                   capture_output=True)
    assert [p.name for p in list_checkpoints(whole)] == ["step-18", "step-20"]  # keep 2

    proc = run_until(cli(str(cfg), "--output-dir", str(killed)), killed / "metrics.jsonl",
                     step=5, sig=signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(metric_rows(killed))
    newest = max(int(p.name.split("-")[1]) for p in list_checkpoints(killed))
    assert killed_at - newest <= 2  # at most one interval (20 / 10 steps) is repeated

    done = subprocess.run(cli(str(cfg), "--output-dir", str(killed), "--resume"), env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"(step {newest} of 20)" in done.stdout
    assert metric_rows(killed) == metric_rows(whole)


def test_resume_says_what_it_does_and_leaves_a_finished_run_as_it_is(
    tmp_path, tiny_model_dir, synthetic_file
):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=4, save_every=2)
    out = tmp_path / "run"
    first = subprocess.run(cli(str(cfg), "--output-dir", str(out), "--resume"), env=ENV,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "no checkpoint in" in first.stdout and "starting at step 0" in first.stdout

    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(cli(str(cfg), "--output-dir", str(out), "--resume"), env=ENV,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "holds a finished run (4 steps): nothing to resume, nothing changed" in again.stdout
    now = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert now == written

    more = subprocess.run(cli(str(cfg), "--output-dir", str(out), "--resume",
                              "--set", "train.max_steps=6"),
                          env=ENV, capture_output=True, text=True)
    assert more.returncode == 0, more.stderr
    assert "(step 4 of 6)" in more.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert len(metric_rows(out)) == 6

    fresh = subprocess.run(cli(str(cfg), "--output-dir", str(out)), env=ENV,
                           capture_output=True, text=True)
    assert fresh.returncode == 2 and "already holds a run" in fresh.stderr


def test_a_hub_name_fails_fast_and_in_one_line_when_the_hub_cannot_be_reached(tmp_path):
    env = {**ENV, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf")}  # a closed port, an empty cache
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "avgalign", "evaluate", "--policy", "someone/no-such-policy",
         "--prompts", str(prompts), "--scorer", "someone/no-such-scorer",
         "--out", str(tmp_path / "eval")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert "cannot be reached" in errors[0] and "someone/no-such-" in errors[0]
    assert seconds < 30, seconds  # imports included; huggingface_hub's retries took 29 s alone


def test_versions_outside_the_window_are_named_in_one_line():
    window = {"torch": "<2.15,>=2.13", "transformers": "<5.26,>=5.0"}
    inside = {"torch": "2.13.0+cpu", "transformers": "5.25.0"}
    assert outside_window(inside, window) == []
    newer = {"torch": "2.13.0+cpu", "transformers": "5.26.0"}
    assert outside_window(newer, window) == ["transformers 5.26.0 (tested: <5.26,>=5.0)"]
    assert outside_window({"torch": "2.13.0"}, window) == [
        "transformers not installed (tested: <5.26,>=5.0)"
    ]
    assert window_warning({name: "0.0.1" for name in WATCHED}).count("\n") == 0


def test_a_run_records_its_versions_and_launch(tmp_path, tiny_model_dir, synthetic_file):
    cfg = write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=1, save_every=0)
    out = tmp_path / "run"
    subprocess.run(cli(str(cfg), "--output-dir", str(out)), env=ENV, check=True,
                   capture_output=True)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["versions"]) == set(WATCHED)
    assert summary["processes"] == 1 and summary["backend"] is None
    card = (out / "model" / "README.md").read_text()
    assert f"transformers {summary['versions']['transformers']}" in card
