"""The model card written into the saved model folder, and train.push_to_hub (up to the upload
call: the Hub is not reachable here)."""

from __future__ import annotations

import json
import math

import huggingface_hub
import pytest
import yaml
from helpers import tiny_config as train_config
from huggingface_hub import ModelCard

from avgalign import __version__
from avgalign.config import Config, ConfigError, load_config
from avgalign.data import TokenizedPair
from avgalign.modelcard import SMOLLM2_HUB_ID, base_model_id, model_card
from avgalign.train import train

# completions of 3 and 5 tokens, then 5 and 7: mean completion length L = 20 / 4 = 5
PAIRS = [TokenizedPair([1], [2] * 3, [3] * 5), TokenizedPair([1, 1], [2] * 5, [3] * 7)]


def card_for(cfg: Config, sources=("org/prefs:helpful",), pairs=PAIRS) -> str:
    return model_card(
        cfg,
        sources=list(sources),
        train_pairs=pairs,
        eval_pairs=1,
        steps=7,
        last_train={"loss": 0.25, "reward_margin": 1.5},
        eval_metrics={"loss": 0.375},
    )


@pytest.mark.parametrize(
    "aggregation,alpha,beta,beta_sum,exponent",
    [
        ("sum", 1.0, 0.1, "0.1", "0"),
        ("mean", 1.0, 2.0, "0.4", "1"),  # 2 / 5
        ("power", 0.5, 1.0, f"{1 / math.sqrt(5):.4g}", "0.5"),  # 1 / 5 ** 0.5
    ],
)
def test_card_gives_beta_on_the_summed_scale(aggregation, alpha, beta, beta_sum, exponent):
    cfg = Config()
    cfg.loss.aggregation, cfg.loss.alpha, cfg.loss.beta = aggregation, alpha, beta
    text = card_for(cfg)
    assert f"| beta on the summed scale | {beta_sum} = beta / L^{exponent}, L = 5.0 tokens" in text
    assert f"| aggregation | {aggregation} (" in text
    assert f"aggregation-{aggregation}" in ModelCard(text).data.tags
    # a '|' inside a cell would break the table: every row of the two-column table has 2 cells
    training = text.split("## Training\n\n")[1].split("\n\n")[0].splitlines()
    assert len(training) == 14 and all(row.count("|") == 3 for row in training)


def test_card_metadata_and_body():
    cfg = Config()
    cfg.model.name = "smollm2-135m"
    cfg.train.output_dir = "runs/simpo-mean"
    text = card_for(cfg)
    card = ModelCard(text)  # the Hub's own parser reads the YAML header
    assert card.data.library_name == "transformers"
    assert card.data.base_model == SMOLLM2_HUB_ID
    assert card.data.datasets == ["org/prefs"]
    assert {"avgalign", "dpo"} <= set(card.data.tags)
    assert text.splitlines()[text.splitlines().index("---", 1) + 2] == "# simpo-mean"
    for row in (
        "| data | `org/prefs:helpful` |",
        "| training pairs | 2 |",
        "| held-out pairs | 1 (data.eval_fraction=0.05 of the data, drawn by seed) |",
        "| steps | 7 of 8 pairs |",
        f"| library | avgalign {__version__} |",
        "| loss | 0.25 | 0.375 |",
        "| reward_margin | 1.5 |  |",
    ):
        assert row in text
    config_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == cfg.to_dict()
    # pairs given in code: no source to name, no dataset in the metadata
    bare = card_for(cfg, sources=())
    assert "| data | pairs given in code |" in bare
    assert ModelCard(bare).data.datasets is None


def test_base_model_id(tmp_path):
    assert base_model_id("smollm2-135m") == SMOLLM2_HUB_ID
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base_model_id(str(tmp_path)) is None  # a local folder is no Hub id
    (tmp_path / "org").mkdir()
    assert base_model_id(str(tmp_path / "org")) is None


def tiny_config(tmp_path, model_dir, data_file, **overrides):
    """Two steps of the tiny model with averaged log-likelihoods (beta 1)."""
    return train_config(tmp_path, model_dir, data_file, **{
        "loss.aggregation": "mean", "loss.beta": 1.0, "train.micro_batch_size": 8,
        "train.max_steps": 2, "train.self_check": False, **overrides})


def test_trained_model_folder_has_its_card(tmp_path, tiny_model_dir, synthetic_file):
    result = train(tiny_config(tmp_path, tiny_model_dir, synthetic_file))
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    last = [r for r in rows if r["split"] == "train"][-1]
    held_out = [r for r in rows if r["split"] == "eval"][-1]
    text = (result.model_dir / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.library_name == "transformers"
    assert card.data.base_model is None  # a local folder
    assert {"avgalign", "dpo", "aggregation-mean"} <= set(card.data.tags)
    assert f"| training pairs | {summary['train_pairs']} |" in text
    assert f"| held-out pairs | {summary['eval_pairs']} (" in text
    assert f"| data | `{synthetic_file}` |" in text
    assert f"| loss | {last['loss']:.4g} | {held_out['loss']:.4g} |" in text
    assert "| steps | 2 of 8 pairs |" in text
    config_block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config_block) == yaml.safe_load((run / "config.yaml").read_text())


def test_push_to_hub_uploads_the_saved_folder(
    tmp_path, tiny_model_dir, synthetic_file, monkeypatch
):
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(*, repo_id, folder_path, **kwargs):
        # what is in the folder when it is uploaded: the weights and the card
        files = sorted(p.name for p in (tmp_path / "run" / "model").iterdir())
        calls.append(("upload_folder", repo_id, folder_path, files, kwargs))
        return "https://huggingface.co/me/tiny-dpo/commit/0"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    pushed = {"train.push_to_hub": "me/tiny-dpo"}
    result = train(tiny_config(tmp_path, tiny_model_dir, synthetic_file, **pushed))
    (create, upload) = calls
    assert create[:2] == ("create_repo", "me/tiny-dpo") and create[2]["exist_ok"]
    assert upload[1] == "me/tiny-dpo"
    assert upload[2] == str(result.model_dir)
    assert {"README.md", "model.safetensors", "config.json"} <= set(upload[3])
    assert 'name = "me/tiny-dpo"' in (result.model_dir / "README.md").read_text()


def test_push_to_hub_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.push_to_hub: 'not a repo' is not a Hub repo id"):
        load_config(None, ["train.push_to_hub=not a repo"])
    with pytest.raises(ConfigError, match="train.push_to_hub needs train.save_model=true"):
        load_config(None, ["train.push_to_hub=me/x", "train.save_model=false"])
    assert load_config(None, ["train.push_to_hub=me/x"]).train.push_to_hub == "me/x"
