"""Config machinery: defaults <- TOML <- --set overrides, type-checked, unknown keys rejected."""

import pytest

from harness.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    dumps_toml,
    flatten,
    load_config,
    load_toml,
    overrides_to_dict,
    to_dict,
)


def test_defaults_are_typed():
    cfg = RunConfig()
    assert cfg.model.name == "em_capsnet_small" and isinstance(cfg.optim.lr, float)


def test_overrides_parse_and_typecheck():
    cfg = apply_overrides(
        RunConfig(),
        ["optim.lr=0.001", "train.epochs=3", "data.augment=false", "data.name=fashion_mnist"],
    )
    assert cfg.optim.lr == 0.001 and cfg.train.epochs == 3 and cfg.data.augment is False
    assert cfg.data.name == "fashion_mnist"  # bare text is a string


def test_int_accepted_for_float_but_not_the_reverse():
    assert apply_overrides(RunConfig(), ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        apply_overrides(RunConfig(), ["train.epochs=2.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", "unknown key 'lrr' in \\[optim\\]"),
        ("nope.x=1", "unknown key 'nope' in top level"),
        ("train.compile=yes", "expected true or false"),
        ("optim.lr", "must look like key=value"),
    ],
)
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), [override])


def test_model_args_is_a_free_table_merged_key_by_key():
    cfg = apply_overrides(RunConfig(), ["model.args.final_lambda=0.02"])
    cfg = apply_overrides(cfg, ["model.args.routing_iters=2"])
    assert cfg.model.args == {"final_lambda": 0.02, "routing_iters": 2}


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nname = "cnn_small"\n[model.args]\ndropout = 0.3\n[optim]\nlr = 0.01\n')
    cfg = load_config(RunConfig, path, ["optim.lr=0.02"])
    assert cfg.model.name == "cnn_small" and cfg.model.args == {"dropout": 0.3}
    assert cfg.optim.lr == 0.02 and cfg.train.epochs == RunConfig().train.epochs


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[model\nname = 1\n")
    with pytest.raises(ConfigError, match="broken.toml is not valid TOML"):
        load_toml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_dump_round_trips():
    cfg = apply_overrides(RunConfig(), ["model.args.final_lambda=0.02", "run_name=x"])
    import tomllib

    assert tomllib.loads(dumps_toml(to_dict(cfg))) == to_dict(cfg)


def test_flatten_gives_dotted_params():
    flat = flatten(apply_overrides(RunConfig(), ["model.args.final_lambda=0.02"]))
    assert flat["optim.lr"] == RunConfig().optim.lr and flat["model.args.final_lambda"] == 0.02


def test_conflicting_overrides():
    with pytest.raises(ConfigError, match="conflicts"):
        overrides_to_dict(["a=1", "a.b=2"])
