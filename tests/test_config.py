"""Settings: defaults, TOML, environment and flags, and their errors."""

from __future__ import annotations

import pytest

from trio_cable.config import SETTINGS, Config, ConfigError, load_config


def test_defaults_are_sane():
    config = load_config({}, environ={})
    assert (config.host, config.port, config.path) == ("127.0.0.1", 8080, ["/cable"])
    assert config.ping_interval == 3.0 and config.jwt_param == "jid"
    assert not config.public_streams and not config.enforce_jwt and not config.benchmark_channel
    assert config.broker == "memory"


def test_precedence_flags_over_env_over_toml(tmp_path):
    toml = tmp_path / "cable.toml"
    toml.write_text(
        'port = 1\nhost = "0.0.0.0"\nallowed-origins = ["a.com", "*.b.com"]\nping_interval = 5\n'
    )
    config = load_config(
        {"port": "3"},
        environ={"TRIO_CABLE_PORT": "2", "TRIO_CABLE_PING_INTERVAL": "7.5"},
        toml_path=str(toml),
    )
    assert config.port == 3
    assert config.ping_interval == 7.5
    assert config.host == "0.0.0.0"
    assert config.allowed_origins == ["a.com", "*.b.com"]


def test_toml_may_use_a_trio_cable_table(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[trio_cable]\npublic_streams = true\n")
    assert load_config({}, environ={}, toml_path=str(toml)).public_streams is True


@pytest.mark.parametrize("raw", ["1", "true", "YES", "on"])
def test_booleans_from_env(raw):
    assert load_config({}, environ={"TRIO_CABLE_PUBLIC_STREAMS": raw}).public_streams is True


def test_lists_from_env_are_comma_separated():
    config = load_config(
        {}, environ={"TRIO_CABLE_PATH": "/a, /b ,", "TRIO_CABLE_ALLOWED_ORIGINS": ""}
    )
    assert config.path == ["/a", "/b"]
    assert config.allowed_origins == []


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        ({"port": "x"}, {}, "port"),
        ({"port": "70000"}, {}, "not a TCP port"),
        ({}, {"TRIO_CABLE_PUBLIC_STREAMS": "perhaps"}, "TRIO_CABLE_PUBLIC_STREAMS"),
        ({"ping_interval": "0"}, {}, "ping_interval"),
        ({"max_message_size": "10"}, {}, "max_message_size"),
        ({"log_level": "loud"}, {}, "log_level"),
    ],
)
def test_bad_values_name_the_setting(flags, environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags, environ=environ)


def test_unknown_toml_key_and_missing_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_config({}, environ={}, toml_path=str(toml))
    with pytest.raises(ConfigError, match="config file"):
        load_config({}, environ={}, toml_path=str(tmp_path / "missing.toml"))


def test_secret_fallbacks():
    config = Config(secret="shared")
    assert config.effective_streams_secret == config.effective_jwt_secret == "shared"
    assert config.effective_broadcast_key == "shared"
    config = Config(secret="shared", streams_secret="s", jwt_secret="j", broadcast_key="b")
    assert (
        config.effective_streams_secret,
        config.effective_jwt_secret,
        config.effective_broadcast_key,
    ) == (
        "s",
        "j",
        "b",
    )


def test_every_setting_has_an_env_name_and_flag():
    names = {s.name for s in SETTINGS}
    assert {"host", "port", "path", "secret", "jwt_param", "public_streams", "broker"} <= names
    assert all(s.env == "TRIO_CABLE_" + s.name.upper() for s in SETTINGS)
    assert all(s.flag == "--" + s.name.replace("_", "-") for s in SETTINGS)


def test_readme_documents_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for setting in SETTINGS:
        assert f"| `{setting.flag}` | `{setting.env}` |" in readme, setting.name


def test_a_drain_longer_than_the_shutdown_timeout_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"drain_period .* must not exceed shutdown_timeout"):
        Config(drain_period=60, shutdown_timeout=30).validate()
    Config(drain_period=60, shutdown_timeout=90).validate()
    Config(drain_period=60, drain_rate=100, shutdown_timeout=30).validate()  # rate mode
