"""``[gateway]`` in mlbridge.toml, MLBRIDGE_* over it, and the serve command's precedence."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mlbridge.cli._serve import settings_from
from mlbridge.config import MLBridgeConfig
from mlbridge.errors import ConfigError
from mlbridge.gateway.server import check_bind

pytestmark = pytest.mark.gateway


def _ns(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = dict.fromkeys(
        (
            "host",
            "port",
            "token",
            "max_body_bytes",
            "cors_origins",
            "shutdown_timeout",
            "openai_bridge",
        )
    )
    base.update(kw)
    return argparse.Namespace(**base)


def test_toml_section_env_and_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "mlbridge.toml"
    f.write_text(
        '[bridges.echo]\n[gateway]\nhost = "127.0.0.1"\nport = 9100\ntoken = "tok-in-file"\n'
        'max_body_bytes = "1MiB"\nshutdown_timeout = "2s"\ncors_origins = ["http://a.test"]\n'
    )
    cfg = MLBridgeConfig.from_toml(f)
    g = cfg.gateway
    assert (g.port, g.max_body_bytes, g.shutdown_timeout) == (9100, 1024 * 1024, 2.0)
    assert g.cors_origins == ("http://a.test",)
    assert "tok-in-file" not in repr(cfg)  # the token never shows
    assert MLBridgeConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.with_bridge(cfg.bridges["echo"]).gateway == g  # derived configs keep it
    env = MLBridgeConfig.from_env({"MLBRIDGE_GATEWAY__PORT": "9200"}, base=cfg)
    assert env.gateway.port == 9200


@pytest.mark.parametrize(
    ("section", "parts"),
    [
        ({"prot": 1}, ["gateway.prot", "Did you mean 'port'"]),
        ({"port": 70000}, ["gateway.port", "65535"]),
        ({"port": "x"}, ["gateway.port", "integer"]),
        ({"cors_origins": "*"}, ["gateway.cors_origins", "list"]),
        ({"cors_origins": ["not an origin"]}, ["gateway.cors_origins", "scheme://host"]),
        ({"shutdown_timeout": "soon"}, ["gateway.shutdown_timeout"]),
        ({"max_body_bytes": 10}, ["gateway.max_body_bytes"]),
        ({"token": ""}, ["gateway.token", "non-empty"]),
    ],
)
def test_bad_values_name_key_and_fix(section: dict[str, object], parts: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        MLBridgeConfig.from_mapping({"gateway": section}, source="cfg.toml")
    message = str(info.value)
    assert message.startswith("cfg.toml: ")
    assert "Fix:" in message
    for part in parts:
        assert part in message


def test_token_precedence_and_loopback_refusal() -> None:
    cfg = MLBridgeConfig.from_mapping({"gateway": {"token": "from-file", "port": 1}})
    assert settings_from(cfg, _ns(), {}).token == "from-file"
    assert settings_from(cfg, _ns(), {"MLBRIDGE_TOKEN": "from-env"}).token == "from-env"
    s = settings_from(cfg, _ns(token="from-cli", port=0), {"MLBRIDGE_TOKEN": "from-env"})
    assert (s.token, s.port) == ("from-cli", 0)
    # MLBRIDGE_TOKEN is not a config key: it does not trip the config's unknown-variable check
    MLBridgeConfig.from_env({"MLBRIDGE_TOKEN": "x"}, base=cfg)

    open_cfg = MLBridgeConfig.from_mapping({})
    check_bind(settings_from(open_cfg, _ns(host="127.0.0.1"), {}))
    check_bind(settings_from(open_cfg, _ns(host="::1"), {}))
    with pytest.raises(ConfigError, match=r"without a token.*MLBRIDGE_TOKEN"):
        check_bind(settings_from(open_cfg, _ns(host="0.0.0.0"), {}))
    check_bind(settings_from(open_cfg, _ns(host="0.0.0.0"), {"MLBRIDGE_TOKEN": "t0ken"}))
