"""Settings: defaults mirror config/*.yaml, overrides apply, errors name the key and allowed values."""

from pathlib import Path

import pytest
import yaml

from stemd.config import (
    Settings,
    TrainSettings,
    is_local_endpoint,
    load_settings,
    load_train_settings,
)
from stemd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("yaml_name", "cls"), [("stemd.yaml", Settings), ("train.yaml", TrainSettings)]
)
def test_shipped_yaml_mirrors_the_defaults(yaml_name, cls):
    data = yaml.safe_load((ROOT / "config" / yaml_name).read_text())
    from_file = cls.model_validate(data)
    assert from_file == cls(), f"config/{yaml_name} differs from the defaults in stemd/config.py"
    # and it documents every key: no default is left implicit
    assert set(data) == set(cls.model_fields)


def test_defaults_bind_to_localhost():
    s = load_settings()
    assert is_local_endpoint(s.input.endpoint)
    assert is_local_endpoint(s.output.endpoint)
    assert not is_local_endpoint("tcp://0.0.0.0:5556")
    assert is_local_endpoint("ipc:///tmp/stemd.sock")


def test_overrides_use_dotted_keys_and_skip_none(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("queue:\n  mode: lossless\nmodel:\n  step: 3\n")
    s = load_settings(cfg, {"model.step": 2, "model.device": None, "output.hwm": 4})
    assert s.queue.mode == "lossless"
    assert s.model.step == 2
    assert s.model.device == "auto"
    assert s.output.hwm == 4


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("queue:\n  mode: fast\n", ["queue.mode", "'live'", "'lossless'"]),
        ("model:\n  step: 0\n", ["model.step", "greater than or equal to 1"]),
        ("model:\n  device: gpu\n", ["model.device", "'auto'", "'cpu'", "'cuda'"]),
        ("queue:\n  maxsise: 3\n", ["queue.maxsise", "unknown key"]),
        ("input:\n  endpoint: localhost:5555\n", ["input.endpoint", "tcp://"]),
        ("stats:\n  interval_s: -1\n", ["stats.interval_s"]),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, needles):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    for needle in needles:
        assert needle in str(info.value)


def test_unreadable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(bad)


def test_empty_file_means_defaults(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    assert load_settings(cfg) == Settings()


def test_train_settings_validation():
    with pytest.raises(ConfigError, match="noise.kind"):
        load_train_settings(None, {"noise.kind": "salt"})
    with pytest.raises(ConfigError, match="hidden"):
        load_train_settings(None, {"hidden": []})
    assert load_train_settings(None, {"samples": 10}).samples == 10


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_training_recipe_is_valid(path):
    """The recipes of the shipped models load, and name their stage's predecessor by its output path."""
    settings = load_train_settings(path)
    assert settings.model == "conv_unet"
    if settings.init is not None:
        outs = {load_train_settings(p).out for p in (ROOT / "config").glob("train_*.yaml")}
        assert settings.init.parent in outs and settings.init.name == "best.pt"


def test_shipped_stemd_yaml_is_rendered_from_the_field_descriptions():
    """config/stemd.yaml is `python -m stemd.config`'s output: every key's comment is its Field description."""
    from stemd.config import render_yaml

    assert (ROOT / "config" / "stemd.yaml").read_text() == render_yaml()
    for section in Settings.model_fields.values():
        for info in getattr(section.annotation, "model_fields", {}).values():
            assert info.description, "every setting has a description"


def test_environment_overrides_the_file_and_the_command_line_overrides_both(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  precision: tf32\n  dejitter: 1\nqueue:\n  maxsize: 2\n")
    env = {"STEMD_MODEL__PRECISION": "bf16", "STEMD_QUEUE__MAXSIZE": "8", "STEMD_LOG_LEVEL": "DEBUG", "HOME": "/x"}
    s = load_settings(cfg, {"queue.maxsize": 3}, env)
    assert (s.model.precision, s.model.dejitter, s.queue.maxsize, s.log_level) == ("bf16", 1, 3, "DEBUG")
    with pytest.raises(ConfigError, match="STEMD_MODEL__PRECISON.*no setting model.precison"):
        load_settings(None, None, {"STEMD_MODEL__PRECISON": "bf16"})
    with pytest.raises(ConfigError, match="model.dejitter.*less than or equal to 10"):
        load_settings(None, None, {"STEMD_MODEL__DEJITTER": "11"})


def test_options_are_derived_from_the_settings_types():
    import argparse

    from stemd.config import MODEL_KEYS, add_setting_options, setting_overrides

    parser = argparse.ArgumentParser()
    add_setting_options(parser, MODEL_KEYS)
    args = parser.parse_args(["--precision", "bf16", "--no-planar", "--lattice-period", "4.08e-10", "--dejitter", "0"])
    assert setting_overrides(args) == {"model.precision": "bf16", "model.planar": False,
                                       "model.lattice_period_m": 4.08e-10, "model.dejitter": 0}
    assert setting_overrides(parser.parse_args([])) == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--sampling", "sometimes"])


def test_non_utf8_config_is_one_clear_error(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("model:\n  path: /daten/m\xfcller.pt\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(cfg)
