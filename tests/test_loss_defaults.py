"""Per-loss defaults for the keys a config leaves out, TRL's loss_type names, and the log line.

Expected values are the published settings, written out by hand:
    dpo   : sum,  beta 0.1              (DPO; TRL's sigmoid)
    ipo   : mean, beta 0.1              (IPO as its authors and TRL define it; TRL's default beta)
    slic  : sum,  beta 0.1              (TRL's hinge)
    simpo : mean, beta 2.0, gamma 1.0   (SimPO: beta 2.0, gamma / beta = 0.5 -> gamma = 1.0)
    rdpo  : sum,  beta 0.1
"""

from __future__ import annotations

import pytest

from avgalign.config import (
    LOSS_DEFAULTS,
    TRL_ALIASES,
    Config,
    ConfigError,
    LossConfig,
    load_config,
    validate,
)
from avgalign.losses import LOSSES
from avgalign.study import RunSpec
from avgalign.sweep import run_train_config
from avgalign.train import train


def loss_of(*overrides: str, path=None) -> LossConfig:
    return load_config(path, list(overrides)).loss


def settings(loss: LossConfig) -> tuple:
    return loss.name, loss.aggregation, loss.beta, loss.simpo_gamma


# ------------------------------------------------------------------------- which defaults apply


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dpo", ("dpo", "sum", 0.1, 0.5)),
        ("ipo", ("ipo", "mean", 0.1, 0.5)),
        ("slic", ("slic", "sum", 0.1, 0.5)),
        ("simpo", ("simpo", "mean", 2.0, 1.0)),
        ("rdpo", ("rdpo", "sum", 0.1, 0.5)),
    ],
)
def test_each_loss_starts_from_its_published_setting(name, expected):
    assert settings(loss_of(f"loss.name={name}")) == expected


def test_no_loss_section_is_dpo_as_before():
    assert settings(load_config(None, []).loss) == ("dpo", "sum", 0.1, 0.5)


def test_every_loss_has_a_published_setting():
    # a new loss in the registry must say which aggregation and beta it starts from
    assert set(LOSS_DEFAULTS) == set(LOSSES)
    assert {name for name, _ in TRL_ALIASES.values()} <= set(LOSSES)


# ---------------------------------------------------------------------------- explicit values win


def test_simpo_gamma_follows_the_given_beta():
    # gamma = 0.5 * beta: 0.5 * 10 = 5.0
    assert settings(loss_of("loss.name=simpo", "loss.beta=10")) == ("simpo", "mean", 10.0, 5.0)


def test_explicit_values_win_over_published_ones():
    loss = loss_of("loss.name=simpo", "loss.beta=2.5", "loss.simpo_gamma=0.3")
    assert settings(loss) == ("simpo", "mean", 2.5, 0.3)
    # an explicit value equal to the old default is still explicit
    assert settings(loss_of("loss.name=ipo", "loss.aggregation=sum")) == ("ipo", "sum", 0.1, 0.5)


def test_another_aggregation_keeps_the_general_beta():
    # SimPO's beta 2.0 and gamma belong to averaged log-likelihoods; with sum set explicitly the
    # beta and gamma not set are the general 0.1 and 0.5, not 2.0 and 1.0
    assert settings(loss_of("loss.name=simpo", "loss.aggregation=sum")) == (
        "simpo",
        "sum",
        0.1,
        0.5,
    )


def test_keys_given_in_yaml_and_in_overrides_both_count(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  name: simpo\n  aggregation: power\n  alpha: 0.5\n")
    loss = loss_of("loss.beta=3.0", path=path)
    # aggregation from the file, beta from --set; gamma: power is not SimPO's mean -> 0.5
    assert settings(loss) == ("simpo", "power", 3.0, 0.5)
    assert loss.alpha == 0.5


def test_configs_built_in_code_are_left_as_set():
    cfg = validate(Config(loss=LossConfig(name="simpo")))
    assert settings(cfg.loss) == ("simpo", "sum", 0.1, 0.5)
    assert cfg.loss.defaults_line() is None


def test_a_sweep_run_config_keeps_the_spec_values(tmp_path):
    # run_train_config sets name, aggregation and beta, then validates: nothing is replaced
    spec = RunSpec(loss="simpo", aggregation="sum", beta_sum=0.3, beta=0.3)
    cfg = run_train_config(Config(), spec, tmp_path / "run", tmp_path / "cache")
    assert settings(cfg.loss) == ("simpo", "sum", 0.3, 0.5)
    base = load_config(None, ["loss.name=ipo"])  # a loaded base, loss changed by the sweep
    spec = RunSpec(loss="dpo", aggregation="mean", beta_sum=0.1, beta=4.0)
    cfg = run_train_config(base, spec, tmp_path / "run", tmp_path / "cache")
    assert settings(cfg.loss) == ("dpo", "mean", 4.0, 0.5)
    assert cfg.loss.defaults_line() is None  # the ipo defaults no longer describe this run


def test_the_record_is_not_a_config_key():
    loss = loss_of("loss.name=simpo")
    assert "defaults_applied" not in Config(loss=loss).to_dict()["loss"]
    with pytest.raises(ConfigError, match="unknown key loss.defaults_applied"):
        load_config(None, ["loss.defaults_applied=x"])


# ------------------------------------------------------------------------ TRL's loss_type names


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("sigmoid", ("dpo", "sum", 0.1, 0.5)),
        ("sigmoid_norm", ("dpo", "mean", 0.1, 0.5)),
        ("hinge", ("slic", "sum", 0.1, 0.5)),
        ("ipo", ("ipo", "mean", 0.1, 0.5)),  # TRL's ipo averages: so does ours by default
    ],
)
def test_trl_loss_types_are_accepted_as_names(alias, expected):
    assert settings(loss_of(f"loss.name={alias}")) == expected


def test_an_alias_with_its_own_aggregation_is_fine():
    assert settings(loss_of("loss.name=sigmoid", "loss.aggregation=sum", "loss.beta=0.2")) == (
        "dpo",
        "sum",
        0.2,
        0.5,
    )


@pytest.mark.parametrize(
    ("alias", "aggregation"),
    [("sigmoid", "mean"), ("sigmoid_norm", "sum"), ("hinge", "mean"), ("sigmoid", "power")],
)
def test_an_alias_that_conflicts_with_the_aggregation_names_both_keys(alias, aggregation):
    with pytest.raises(ConfigError) as error:
        loss_of(f"loss.name={alias}", f"loss.aggregation={aggregation}")
    message = str(error.value)
    assert f"loss.name {alias!r}" in message and f"loss.aggregation {aggregation!r}" in message


def test_trl_loss_types_not_implemented_list_what_is_accepted():
    with pytest.raises(ConfigError) as error:
        loss_of("loss.name=robust")
    message = str(error.value)
    assert "unknown loss 'robust'" in message
    for name in [*LOSSES, *TRL_ALIASES]:
        assert name in message


def test_loss_type_key_points_to_loss_name():
    with pytest.raises(
        ConfigError, match="unknown key loss.loss_type: TRL's loss_type is loss.name"
    ):
        loss_of("loss.loss_type=sigmoid")


def test_an_alias_set_in_code_is_refused_with_our_names():
    with pytest.raises(ConfigError, match="loss.name='dpo', loss.aggregation='mean'"):
        validate(Config(loss=LossConfig(name="sigmoid_norm")))


# ------------------------------------------------------------------------------------ the log line


def test_log_line_lists_the_defaults_applied():
    assert loss_of("loss.name=simpo", "loss.beta=10").defaults_line() == (
        "loss simpo: defaults for the keys not set in the config: aggregation=mean, "
        "simpo_gamma=5.0 (SimPO as published: gamma = 0.5 beta)"
    )
    assert loss_of("loss.name=sigmoid_norm").defaults_line() == (
        "loss dpo (TRL loss_type sigmoid_norm): defaults for the keys not set in the config: "
        "aggregation=mean, beta=0.1 (beta: the general defaults, as dpo's published values are "
        "for aggregation sum)"
    )


def test_log_line_when_everything_is_set():
    every = ["loss.aggregation=mean", "loss.beta=3.0", "loss.simpo_gamma=0.2"]
    assert loss_of("loss.name=simpo", *every).defaults_line() is None
    assert loss_of(
        "loss.name=sigmoid", "loss.aggregation=sum", "loss.beta=0.2"
    ).defaults_line() == ("loss dpo (TRL loss_type sigmoid): every key set in the config")


def test_log_line_drops_values_changed_in_code():
    loss = loss_of("loss.name=ipo")
    loss.beta = 0.5  # e.g. a test or a script changing a loaded config
    assert loss.defaults_line() == (
        "loss ipo: defaults for the keys not set in the config: aggregation=mean "
        "(IPO as its authors and TRL define it)"
    )


def test_training_prints_the_defaults_applied(tmp_path, capsys, tiny_model_dir, synthetic_file):
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"data.train={synthetic_file}",
            "data.max_length=64",
            "loss.name=simpo",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "train.max_steps=1",
            "train.progress=false",
            "train.save_model=false",
            f"train.reference_cache_dir={tmp_path / 'cache'}",
        ],
    )
    train(cfg)
    out = capsys.readouterr().out
    assert (
        "loss simpo: defaults for the keys not set in the config: aggregation=mean, beta=2.0, "
        "simpo_gamma=1.0 (SimPO as published: gamma = 0.5 beta)"
    ) in out.splitlines()
    # the saved config holds the resolved values: reloaded, the same loss, every key explicit
    saved = load_config(tmp_path / "run" / "config.yaml").loss
    assert settings(saved) == ("simpo", "mean", 2.0, 1.0)
    assert saved.defaults_line() is None
