"""A loss added from outside the package: one function and its LossSpec, registered; the config,
the command line's loss defaults and the trainer take it from there."""

from __future__ import annotations

import json

import pytest
from helpers import write_config

from avgalign.config import ConfigError, load_config
from avgalign.loss_specs import LOSS_SPECS, LossSpec
from avgalign.losses import LOSSES, register_loss
from avgalign.train import train


def squared_margin(logps, params):
    """(beta h - 1)^2 (1 + length_penalty): reads an existing key of loss.* by its name."""
    return (params.beta * logps.logratio_margin() - 1.0) ** 2 * (1.0 + params.length_penalty)


@pytest.fixture
def toy_loss():
    register_loss("toy_squared", squared_margin,
                  LossSpec(True, "mean", 0.5, "a test's loss", ("length_penalty",)))
    yield "toy_squared"
    LOSSES.pop("toy_squared"), LOSS_SPECS.pop("toy_squared")


def test_a_registered_loss_trains_with_its_published_defaults(tmp_path, tiny_model_dir,
                                                              synthetic_file, toy_loss):
    path = write_config(tmp_path, tiny_model_dir, synthetic_file, max_steps=1, save_every=0)
    cfg = load_config(path, [f"loss.name={toy_loss}", "loss.length_penalty=1.0",
                             f"train.output_dir={tmp_path / 'run'}"])
    assert (cfg.loss.aggregation, cfg.loss.beta) == ("mean", 0.5)  # from its LossSpec
    train(cfg)
    (row,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # step 1: the policy is the reference, h = 0, loss = (0 - 1)^2 (1 + 1)
    assert row["loss"] == pytest.approx(2.0, abs=1e-5)


def test_a_name_taken_is_refused_and_an_unknown_one_names_the_registered(toy_loss):
    with pytest.raises(ValueError, match="already registered"):
        register_loss("dpo", squared_margin)
    with pytest.raises(ConfigError, match="toy_squared"):
        load_config(None, ["loss.name=nope"])
