"""The run configuration: defaults, TOML file, overrides, validation, Flower's run_config."""

from __future__ import annotations

import dataclasses

import pytest

from fedsqueeze.config import DEFAULTS, Config, ConfigError, TensorRule, keys, parse_rules, resolve


def test_defaults_are_valid_and_cover_every_key():
    cfg = resolve()
    assert cfg == Config()
    assert list(DEFAULTS) == keys()
    assert set(keys()) >= {
        "name", "task", "partition", "num-clients", "cohort-size", "rounds", "local-steps", "local-epochs", "lr",
        "batch-size", "compressor", "downlink", "seed", "round-timeout", "min-replies", "target-accuracy", "out-dir",
        "dense-below", "rules",
    }  # fmt: skip


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'name = "exp"\nnum-clients = 8\ncohort-size = 0.5\ncompressor = "topk(0.1)"\nlr = 1\n'
        'rules = [{pattern = "*.bias", spec = "identity"}, "fc2.*=qsgd(levels=4)"]\n'
    )
    cfg = resolve(path, ["num-clients=10", "seed=3", 'downlink="fp16"'])
    assert cfg.name == "exp"
    assert cfg.num_clients == 10  # the override wins
    assert cfg.seed == 3
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.cohort_size == 0.5 and cfg.cohort_count() == 5
    assert cfg.downlink == "fp16"
    assert cfg.rules == (TensorRule("*.bias", "identity"), TensorRule("fc2.*", "qsgd(levels=4)"))


def test_cohort_size_count_or_fraction():
    assert resolve(overrides=["cohort-size=5"]).cohort_count() == 5
    assert resolve(overrides=["cohort-size=1.0"]).cohort_count() == 20
    assert resolve(overrides=["cohort-size=0.25", "num-clients=10"]).cohort_count() == 3
    assert resolve(overrides={"cohort-size": 1}).cohort_count() == 1


def test_local_epochs_replace_local_steps():
    cfg = resolve(overrides=["local-epochs=2"])
    assert cfg.local_epochs == 2.0 and cfg.local_steps == 0
    # Flower's run_config carries both keys: epochs still win
    cfg = Config.from_run_config({**DEFAULTS, "local-epochs": 1.5})
    assert cfg.local_steps == 0 and cfg.local_epochs == 1.5


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("colour=red", "colour", "unknown key"),
        ("num-clients=0", "num-clients", "at least 1"),
        ("num-clients=ten", "num-clients", "integer"),
        ("cohort-size=1.5", "cohort-size", "(0, 1]"),
        ("cohort-size=50", "cohort-size", "num-clients"),
        ("lr=-1", "lr", "> 0"),
        ("lr=nan", "lr", "finite"),
        ("round-timeout=0", "round-timeout", "> 0"),
        ("min-replies=21", "min-replies", "sampled"),
        ("target-accuracy=2", "target-accuracy", "at most 1"),
        ("compressor=topk(2.0)", "compressor", "ratio"),
        ("compressor=zip", "compressor", "unknown compressor"),
        ("downlink=gzip", "downlink", "none"),
        ("rules=*.bias", "rules", "pattern=spec"),
        ("rules=*.bias=nothing", "rules", "unknown compressor"),
        ("algorithm=sgd", "algorithm", "fedavg"),
        ("name=a/b", "name", "directory"),
        ("name=EF-BV comp-(2,32)", "name", "letters, digits"),
        ("local-steps=0", "local-steps", "no local training"),
        ("batch-size=-2", "batch-size", "negative"),
    ],
)
def test_bad_values_name_key_value_and_choices(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=[override])
    err = info.value
    assert err.key == key
    assert key in str(err)
    assert fragment in str(err)
    value = override.partition("=")[2]
    assert value in str(err)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        resolve(overrides=["rounds=3", "round=4"])
    assert "num-clients" in str(info.value) and "cohort-size" in str(info.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        resolve(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(bad)
    typed = tmp_path / "typed.toml"
    typed.write_text('rounds = "three"\n')
    with pytest.raises(ConfigError, match="rounds"):
        resolve(typed)
    table = tmp_path / "table.toml"
    table.write_text("[client]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="top level"):
        resolve(table)


def test_override_without_equals():
    with pytest.raises(ConfigError, match="key=value"):
        resolve(overrides=["rounds"])


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="integer"):
        resolve(overrides={"rounds": True})


def test_run_config_round_trip():
    cfg = resolve(
        overrides=[
            "compressor=topk(0.05) | qsgd(levels=16)",
            "rules=*.bias=identity; fc1.weight=powersgd(rank=2)",
            "cohort-size=4",
            "dense-below=100",
            "downlink=bf16",
        ]
    )
    rc = cfg.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in rc.values())
    assert rc["rules"] == "*.bias=identity; fc1.weight=powersgd(rank=2)"
    assert Config.from_run_config(rc) == cfg
    assert Config.from_run_config({}) == Config()  # run_simulation() from Python sends an empty run_config


def test_toml_round_trip(tmp_path):
    cfg = resolve(overrides=["name=x", "cohort-size=0.3", "rules=*.bias=identity", "target-accuracy=0"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    assert resolve(path) == cfg


def test_spec_for_rules_then_size_then_default():
    cfg = resolve(overrides=["compressor=topk(0.1)", "dense-below=10", "rules=fc1.*=qsgd(levels=4); *.bias=fp16"])
    assert cfg.spec_for("fc1.weight", 1000) == ("qsgd(levels=4)", cfg.rules[0])
    assert cfg.spec_for("fc1.bias", 5) == ("qsgd(levels=4)", cfg.rules[0])  # first match wins
    assert cfg.spec_for("fc2.bias", 5) == ("fp16", cfg.rules[1])
    assert cfg.spec_for("fc2.weight", 5) == ("identity", None)
    assert cfg.spec_for("fc2.weight", 500) == ("topk(0.1)", None)


def test_powersgd_spec_is_checked_without_a_model():
    assert resolve(overrides=["compressor=powersgd(rank=2)"]).compressor == "powersgd(rank=2)"
    with pytest.raises(ConfigError, match="compressor"):
        resolve(overrides=["compressor=powersgd(rank=0)"])


def test_parse_rules_forms():
    assert parse_rules("rules", "") == ()
    assert parse_rules("rules", "a=identity;;b = fp16") == (TensorRule("a", "identity"), TensorRule("b", "fp16"))
    with pytest.raises(ConfigError):
        parse_rules("rules", [{"pattern": "a"}])
    with pytest.raises(ConfigError):
        parse_rules("rules", 3)


def test_config_is_frozen_and_replace_validates():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]
    assert cfg.replace(rounds=3).rounds == 3
    with pytest.raises(ConfigError):
        cfg.replace(rounds=0)


def test_task_spec_with_options():
    from fedsqueeze.config import parse_task

    assert parse_task("digits-mlp") == ("digits-mlp", {})
    assert parse_task('libsvm-logreg(path="a9a.txt", reg=0.1, bias=false)') == (
        "libsvm-logreg",
        {"path": "a9a.txt", "reg": 0.1, "bias": False},
    )
    assert parse_task("digits-mlp(hidden=[32, 16])") == ("digits-mlp", {"hidden": (32, 16)})
    assert parse_task("mypkg.tasks:make(scale=2)") == ("mypkg.tasks:make", {"scale": 2})
    assert resolve(overrides=["task=digits-logreg(reg=0.01)"]).task == "digits-logreg(reg=0.01)"


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("task=digits", "task", "digits-mlp"),  # lists the built-in tasks
        ("task=digits-mlp(depth=3)", "task", "hidden"),  # lists the task's options
        ("task=libsvm-logreg", "task", "path"),  # a required option
        ("task=digits-mlp(3)", "task", "named"),
        ("task=digits-mlp(hidden=", "task", "parentheses"),
        ("partition=dirichlet", "partition", "alpha"),
        ("partition=stripes", "partition", "shards"),
    ],
)
def test_bad_task_and_partition(override, key, fragment):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=[override])
    assert info.value.key == key and fragment in str(info.value)


def test_missing_data_file_is_a_config_error(tmp_path):
    from fedsqueeze.config import build_task

    cfg = resolve(overrides=[f"task=libsvm-logreg(path={str(tmp_path / 'none.svm')!r})", "partition=default"])
    with pytest.raises(ConfigError, match="none.svm"):
        build_task(cfg)
