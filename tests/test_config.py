"""Settings: defaults, TOML, environment and flags, and their errors."""

from __future__ import annotations

import math

import pytest

from trio_cable.config import (
    MIN_SECRET_BYTES,
    SETTINGS,
    Config,
    ConfigError,
    load_config,
    load_config_and_sources,
)

FLOATS = [s for s in SETTINGS if s.kind == "float"]
INTS = [s for s in SETTINGS if s.kind == "int"]


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
        ({"port": "12.5"}, {}, "'12.5' is not an integer"),
        ({}, {"TRIO_CABLE_PUBLIC_STREAMS": "perhaps"}, "TRIO_CABLE_PUBLIC_STREAMS"),
        ({"ping_interval": "0"}, {}, "--ping-interval"),
        ({"max_message_size": "10"}, {}, "--max-message-size"),
        ({"log_level": "loud"}, {}, "--log-level"),
    ],
)
def test_bad_values_name_the_setting(flags, environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(flags, environ=environ)


def test_unknown_toml_key_and_missing_file(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot' \\(did you mean 'port'\\?\\)"):
        load_config({}, environ={}, toml_path=str(toml))
    with pytest.raises(ConfigError, match=r"missing\.toml: no such config file"):
        load_config({}, environ={}, toml_path=str(tmp_path / "missing.toml"))
    toml.write_text("port = [\n")
    with pytest.raises(ConfigError, match=r"c\.toml: not valid TOML"):
        load_config({}, environ={}, toml_path=str(toml))


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
    with pytest.raises(ConfigError, match=r"drain_period: .* must not exceed shutdown_timeout"):
        Config(drain_period=60, shutdown_timeout=30).validate()
    Config(drain_period=60, shutdown_timeout=90).validate()
    Config(drain_period=60, drain_rate=100, shutdown_timeout=30).validate()  # rate mode


# -- non-finite floats, ranges, and messages that name the source (issue 13) -----------------


@pytest.mark.parametrize("setting", FLOATS, ids=lambda s: s.name)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_non_finite_floats_are_refused_from_flags_and_env(setting, raw):
    with pytest.raises(ConfigError) as info:
        load_config({setting.name: raw}, environ={})
    assert str(info.value) == f"{setting.flag}: {raw!r} is not a finite number"
    with pytest.raises(ConfigError) as info:
        load_config({}, environ={setting.env: raw})
    assert str(info.value) == f"{setting.env}: {raw!r} is not a finite number"


@pytest.mark.parametrize("setting", FLOATS, ids=lambda s: s.name)
@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_from_toml(tmp_path, setting, literal):
    toml = tmp_path / "cable.toml"
    toml.write_text(f"{setting.name} = {literal}\n")  # TOML has nan and inf literals
    with pytest.raises(ConfigError, match=rf"cable.toml: {setting.name}: .* is not a finite"):
        load_config({}, environ={}, toml_path=str(toml))


@pytest.mark.parametrize("setting", FLOATS, ids=lambda s: s.name)
def test_non_finite_floats_are_refused_from_python(setting):
    with pytest.raises(ConfigError, match=rf"^{setting.name}: must be a finite number, not nan"):
        Config(**{setting.name: math.nan}).validate()


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("handshake_timeout", "0", "must be > 0, not 0"),
        ("handshake_timeout", "-1", "must be > 0, not -1"),
        ("close_timeout", "-0.5", "must be >= 0, not -0.5"),
        ("ping_interval", "-3", "must be > 0"),
        ("lag_target", "0", "must be > 0"),
        ("callback_concurrency", "0", "must be >= 1, not 0"),
        ("max_send_queue", "0", "must be >= 1"),
        ("max_pending_handshakes", "0", "must be >= 1"),
        ("handshake_rate", "-1", "must be >= 0"),
        ("sessions_ttl", "-1", "must be >= 0"),
        ("history_limit", "-1", "must be >= 0"),
        ("max_connections_per_address", "-2", "must be >= 0"),
        ("port", "-1", "-1 is not a TCP port"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_flag(name, raw, message):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as info:
        load_config({name: raw}, environ={})
    assert str(info.value).startswith(f"{flag}: ")
    assert message in str(info.value)


def test_zero_is_allowed_where_it_means_off_or_unlimited():
    zeros = ["close_timeout", "drain_period", "drain_rate", "reconnect_advice", "max_connections"]
    zeros += ["handshake_rate", "max_subscriptions", "command_rate", "pong_timeout"]
    zeros += ["sessions_ttl", "history_limit", "history_ttl", "max_connections_per_address"]
    config = load_config(dict.fromkeys(zeros, "0"), environ={})
    assert all(getattr(config, name) == 0 for name in zeros)


def test_the_error_names_the_source_that_was_wrong(tmp_path):
    # Each source alone, then all three: the message names the one that won (and was bad).
    toml = tmp_path / "cable.toml"
    toml.write_text('port = "abc"\n')
    cases = [
        (({"port": "abc"}, {}, None), "--port: 'abc' is not an integer"),
        (({}, {"TRIO_CABLE_PORT": "abc"}, None), "TRIO_CABLE_PORT: 'abc' is not an integer"),
        (({}, {}, str(toml)), f"{toml}: port: 'abc' is not an integer"),
        (({"port": "99999"}, {"TRIO_CABLE_PORT": "1"}, None), "--port: 99999 is not a TCP port"),
    ]
    for (flags, environ, path), message in cases:
        with pytest.raises(ConfigError) as info:
            load_config(flags, environ=environ, toml_path=path)
        assert str(info.value) == message + (" (0-65535)" if "TCP" in message else "")
        assert info.value.setting == "port"


def test_cross_field_errors_name_the_source():
    with pytest.raises(ConfigError, match=r"^TRIO_CABLE_ENFORCE_JWT: needs a JWT secret"):
        load_config({}, environ={"TRIO_CABLE_ENFORCE_JWT": "1"})
    with pytest.raises(ConfigError, match=r"^--tls-cert: needs tls_key too"):
        load_config({"tls_cert": "cert.pem"}, environ={})
    with pytest.raises(ConfigError, match=r"^--drain-period: 60 s must not exceed"):
        load_config({"drain_period": "60"}, environ={})


def test_toml_values_of_the_wrong_type_are_refused(tmp_path):
    toml = tmp_path / "cable.toml"
    for text, message in [
        ("port = 80.5", "port: 80.5 is not an integer"),
        ("port = true", "port: True is not an integer"),
        ("ping_interval = true", "ping_interval: True is not a number"),
        ("allowed_origins = [1, 2]", "allowed_origins: [1, 2] is not a list of strings"),
        ("host = [1]", "host: [1] is not a string"),
    ]:
        toml.write_text(text + "\n")
        with pytest.raises(ConfigError) as info:
            load_config({}, environ={}, toml_path=str(toml))
        assert str(info.value) == f"{toml}: {message}"


def test_sources_say_where_each_value_came_from(tmp_path):
    toml = tmp_path / "cable.toml"
    toml.write_text("host = '0.0.0.0'\nallowed-origins = ['a.com']\n")
    config, sources = load_config_and_sources(
        {"port": "1"}, environ={"TRIO_CABLE_SECRET": "x" * 40}, toml_path=str(toml)
    )
    assert config.port == 1 and config.secret == "x" * 40
    assert sources == {
        "host": f"{toml}: host",
        "allowed_origins": f"{toml}: allowed-origins",
        "secret": "TRIO_CABLE_SECRET",
        "port": "--port",
    }


def test_short_secrets_are_reported_by_name_only():
    long = "k" * MIN_SECRET_BYTES
    assert Config().short_secrets() == []
    assert Config(secret=long, jwt_secret="short").short_secrets() == ["jwt_secret"]
    assert Config(streams_secret="é" * 16).short_secrets() == []  # bytes, not characters
