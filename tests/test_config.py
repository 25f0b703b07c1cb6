"""Settings declared once: validation and the command line derived from the declarations,
setting tokens spelled for each audience, and the seeds derived from a run's two seeds."""

import argparse
import dataclasses
import inspect
import itertools

import pytest

from pyro_vae import ConfigError, RunConfig, commands, config, seeds
from pyro_vae.cli import build_parser, flag_name
from pyro_vae.errors import naming, render


def subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def actions_by_dest(parser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


CLI_FIELDS = [(section, f, hint) for section in config.SECTIONS
              for f, hint in config.fields(section) if f.metadata["cli"]]


@pytest.mark.parametrize("section, field, hint", CLI_FIELDS,
                         ids=[f"{s}.{f.name}" for s, f, _ in CLI_FIELDS])
def test_every_setting_has_one_flag_with_the_declared_choices_and_default(section, field, hint):
    action = actions_by_dest(subcommand("train"))[f"{section}.{field.name}"]
    assert action.option_strings == [flag_name(f"{section}.{field.name}")]
    assert action.default is argparse.SUPPRESS  # a flag given is told apart from a default
    allowed = config.choices(hint)
    if allowed:
        assert tuple(action.choices) == allowed
    if config.base_type(hint) is not bool and field.default not in (None, dataclasses.MISSING):
        shown = ",".join(map(str, field.default)) if isinstance(field.default, tuple) \
            else str(field.default)
        assert action.help.endswith(f"(default: {shown})")


def test_settings_that_pyro_vae_fills_in_have_no_flag():
    dests = actions_by_dest(subcommand("train"))
    for name in ("model.x_dim", "model.likelihood_module", "model.network_module"):
        assert name not in dests


@pytest.mark.parametrize("command, func", [("evaluate", commands.evaluate),
                                           ("sample", commands.sample),
                                           ("diagnose", commands.diagnose_run),
                                           ("plot", commands.write_figures)])
def test_the_other_commands_take_their_defaults_from_the_functions(command, func):
    params = inspect.signature(func).parameters
    options = [a for a in subcommand(command)._actions if a.dest in params]
    assert options
    for action in options:
        assert action.default == params[action.dest].default, action.dest


def test_flags_given_override_a_config_file_and_the_rest_keeps_its_values(tmp_path):
    from pyro_vae.cli import config_from_args
    base = RunConfig()
    base.train.lr, base.model.z_dim = 0.01, 7
    path = tmp_path / "c.json"
    path.write_text(__import__("json").dumps(base.to_dict()))
    args = subcommand("train").parse_args(["--config", str(path), "--z-dim", "3",
                                           "--no-fast-step", "--hidden-dims", "16,8"])
    got = config_from_args(args)
    assert (got.train.lr, got.model.z_dim, got.train.fast_step) == (0.01, 3, False)
    assert got.model.hidden_dims == (16, 8)


@pytest.mark.parametrize("setting, value, python, cli", [
    ("train.lr", None, "TrainConfig.lr", "--lr"),
    ("train.objective", "iwae", "TrainConfig.objective = 'iwae'", "--objective iwae"),
    ("train.fast_step", "False", "TrainConfig.fast_step = False", "--no-fast-step"),
    ("data.download", "True", "DataConfig.download = True", "without --no-download"),
    ("model.likelihood_options", None, "ModelConfig.likelihood_options",
     "--likelihood-option"),
    ("force", None, "force=True", "--force"),
    ("resume", "runs/a", "resume=runs/a", "--resume runs/a"),
    ("import", "mylik", "import mylik before loading the run", "--import mylik"),
    ("iwae_samples", None, "iwae_samples", "--iwae-samples"),
    ("draws", None, "draws", "--draws"),
])
def test_a_setting_token_is_spelled_for_python_and_for_the_command_line(setting, value,
                                                                         python, cli):
    token = "{" + setting + ("" if value is None else f"={value}") + "}"
    assert render(f"set {token}") == f"set {python}"
    with naming(flag_name):
        assert render(f"set {token}") == f"set {cli}"
    assert render(f"set {token}") == f"set {python}"  # the naming is restored


def test_an_error_carries_its_setting_and_the_cli_names_the_flag():
    config_ = RunConfig()
    config_.train.batch_size = 0
    with pytest.raises(ConfigError) as info:
        config_.validate()
    assert info.value.setting == "train.batch_size"
    assert str(info.value) == "TrainConfig.batch_size must be a positive integer, got 0"
    with naming(flag_name):
        assert str(info.value) == "--batch-size must be a positive integer, got 0"


def test_text_that_is_no_token_is_left_alone():
    text = 'eval.json holds {"test": 5} and {0, 1}'
    with naming(flag_name):
        assert render(text) == text


@pytest.mark.parametrize("section, name, value, words", [
    ("model", "z_dim", 0, "positive integer"),
    ("model", "z_dim", True, "positive integer"),
    ("model", "hidden_dims", (), "list of sizes"),
    ("model", "hidden_dims", (400, -1), "positive integer"),
    ("model", "activation", "swish", "one of relu, softplus, tanh, elu"),
    ("model", "stochastic_layers", 3, "one of 1, 2"),
    ("model", "stochastic_layers", True, "one of 1, 2"),
    ("model", "likelihood_options", {"scale": "x"}, "map names to numbers"),
    ("data", "binarize", "sometimes", "one of none, dynamic, static"),
    ("data", "train_limit", 0, "positive integer"),
    ("data", "download", "yes", "true or false"),
    ("train", "lr", float("nan"), "positive finite number"),
    ("train", "adam_eps", 1.0, "in (0, 1)"),
    ("train", "kl_warmup", -1, ">= 0"),
    ("train", "seed", 2**32, "in [0, 4294967295]"),
])
def test_validation_follows_each_declaration(section, name, value, words):
    config_ = RunConfig()
    setattr(getattr(config_, section), name, value)
    with pytest.raises(ConfigError, match=r"\." + name + r"\b.*" + words.replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        config_.validate()


def test_the_defaults_validate_and_optional_settings_accept_none():
    config_ = RunConfig()
    config_.data.binarize, config_.data.train_limit = None, None
    assert config_.validate() is config_


def test_seed_streams_are_distinct_across_purposes_epochs_and_ranks():
    derived = [seeds.process(s, r) for s in range(3) for r in range(4)]
    derived += [seeds.epoch_order(s, e) for s in range(3) for e in range(1, 200)]
    derived += [seeds.rank_epoch(s, e, r) for s, e, r in itertools.product(range(3),
                                                                            range(1, 50),
                                                                            range(4))]
    derived += [f(s) for s in range(3) for f in (seeds.static_binarization,
                                                 seeds.test_binarization,
                                                 seeds.train_eval_binarization,
                                                 seeds.elbo_noise, seeds.importance_noise)]
    assert len(set(derived)) == len(derived)  # the old offsets collided at epoch 1009 e + r
    assert all(0 <= s < 2**32 for s in derived)  # numpy's and pyro.set_rng_seed's range
    assert seeds.rank_epoch(0, 5, 1) == seeds.rank_epoch(0, 5, 1)  # deterministic
