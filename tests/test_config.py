"""Config: every loader, every error path (key path + bad value + fix), frozen objects."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from mlbridge import _config_load
from mlbridge._config_load import OPTION_VALIDATORS, find_config_file
from mlbridge._config_values import parse_duration, parse_size
from mlbridge._host import builtins as host_builtins
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig, bridge_config
from mlbridge.errors import ConfigError

GiB = 1024**3


def config_error(fn: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def assert_mentions(message: str, *parts: str) -> None:
    for part in parts:
        assert part.lower() in message.lower(), f"{part!r} not in: {message}"
    assert "Fix: " in message, message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


FULL = {
    "default_bridge": "mine",
    "bridges": {
        "echo": {"pool_size": 2, "overflow": 3},
        "mine": {
            "python_module": "mypkg.bridge:MyBridge",
            "python": "/opt/py/bin/python3",
            "pool_size": 0,
            "overflow": 1,
            "required_env": ["OPENAI_API_KEY"],
            "required_packages": ["sentence_transformers", "dspy"],
            "options": {
                "timeout": "30s",
                "startup_timeout": "5m",
                "health_check_interval": "250ms",
                "checkout_timeout": 2,
                "max_requests": 1000,
                "max_memory": "512MB",
                "max_age": "1h",
                "idle_timeout": 1.5,
                "lazy": True,
                "max_frame_bytes": "2GiB",
                "codec": "json",
                "threads": 2,
                "limits": {"address_space_bytes": "4GiB", "cpu_seconds": "90s", "open_files": 64},
            },
            "settings": {"default_model": "m", "temperature": 0.2, "nested": {"a": [1, 2]}},
            "env": {"HF_HOME": "/tmp/hf"},
        },
    },
}


# --------------------------------------------------------------------------- mapping


def test_from_mapping_parses_every_kind_of_value() -> None:
    cfg = MLBridgeConfig.from_mapping(FULL)
    assert cfg.default_bridge == "mine"
    assert list(cfg.bridges) == ["echo", "mine"]
    echo = cfg.bridges["echo"]
    assert (echo.python_module, echo.python_script, echo.target) == ("echo", None, "echo")
    assert (echo.pool_size, echo.overflow, echo.python) == (2, 3, sys.executable)
    mine = cfg.bridges["mine"]
    assert mine.python_module == "mypkg.bridge:MyBridge"
    assert mine.python == "/opt/py/bin/python3"
    assert mine.required_env == ("OPENAI_API_KEY",)
    assert mine.required_packages == ("sentence_transformers", "dspy")
    o = mine.options
    assert (o.timeout, o.startup_timeout, o.health_check_interval) == (30.0, 300.0, 0.25)
    assert (o.checkout_timeout, o.max_requests, o.max_memory) == (2.0, 1000, 512_000_000)
    assert (o.max_age, o.idle_timeout, o.max_frame_bytes, o.codec) == (3600.0, 1.5, 2 * GiB, "json")
    assert o.threads == 2
    assert dict(o.limits) == {"address_space_bytes": 4 * GiB, "cpu_seconds": 90, "open_files": 64}
    assert mine.settings == {"default_model": "m", "temperature": 0.2, "nested": {"a": [1, 2]}}
    assert dict(mine.env) == {"HF_HOME": "/tmp/hf"}
    # untouched options keep their defaults
    assert o.heartbeat_timeout == BridgeOptions().heartbeat_timeout


def test_default_bridge_unset_is_the_first_bridge() -> None:
    cfg = MLBridgeConfig.from_mapping({"bridges": {"b": {"python_module": "m"}, "echo": {}}})
    assert cfg.default_bridge == "b"
    assert MLBridgeConfig.from_mapping({}).default_bridge is None


def test_settings_are_copied_not_shared() -> None:
    settings = {"nested": {"a": 1}}
    cfg = BridgeConfig.from_mapping("echo", {"settings": settings})
    settings["nested"]["a"] = 2
    assert cfg.settings["nested"] == {"a": 1}


def test_round_trip_through_to_mapping() -> None:
    cfg = MLBridgeConfig.from_mapping(FULL)
    again = MLBridgeConfig.from_mapping(cfg.to_mapping())
    assert again == cfg
    json.dumps(cfg.to_mapping())  # plain JSON/TOML types only


def test_worker_command_carries_limits_in_argv_and_settings_in_the_environment() -> None:
    from mlbridge._backends import SETTINGS_ENV, worker_command
    from mlbridge._host.pool import Pool

    async def no_callbacks(*_: object) -> None:
        return None

    mine = MLBridgeConfig.from_mapping(FULL).bridges["mine"]
    pool = Pool(mine, on_callback=no_callbacks, emit=lambda _e: None)
    argv, env = worker_command(pool._spec("mine-1"))
    assert argv[:4] == ["/opt/py/bin/python3", "-m", "mlbridge.worker", "mypkg.bridge:MyBridge"]
    assert "--settings-json" not in argv  # argv is public (ps, /proc/<pid>/cmdline)
    settings = json.loads(env[SETTINGS_ENV])
    assert settings["nested"] == {"a": [1, 2]}
    limits = json.loads(argv[argv.index("--limits-json") + 1])
    assert limits["address_space_bytes"] == 4 * GiB


def test_config_reprs_hide_secret_values() -> None:
    cfg = MLBridgeConfig.from_mapping(
        {
            "bridges": {
                "x": {
                    "python_module": "echo",
                    "settings": {"api_key": "sk-live-abc123", "model": "m"},
                    "env": {"OPENAI_API_KEY": "sk-env-xyz789", "HOME_DIR": "/h"},
                }
            }
        }
    )
    for text in (repr(cfg), repr(cfg.bridges["x"]), str(cfg.bridges["x"])):
        assert "sk-live-abc123" not in text and "sk-env-xyz789" not in text
        assert "'model': 'm'" in text and "/h" in text


def test_configs_pickle_and_deepcopy() -> None:
    cfg = MLBridgeConfig.from_mapping(FULL)
    again = pickle.loads(pickle.dumps(cfg))
    assert again == cfg
    assert isinstance(again.bridges["mine"].settings, MappingProxyType)
    assert copy.deepcopy(cfg) == cfg
    assert copy.copy(cfg.bridges["mine"].options) == cfg.bridges["mine"].options


def test_option_validators_cover_every_field() -> None:
    assert set(OPTION_VALIDATORS) == {f.name for f in dataclasses.fields(BridgeOptions)}


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("1.5", 1.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        (" 10 S ", 10.0),
        ("500us", 0.0005),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 parsecs", "s", "1.2.3s", "5x", "ms30"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("100", 100),
        ("100B", 100),
        ("64KB", 64_000),
        ("64KiB", 64 * 1024),
        ("512MB", 512_000_000),
        ("512mb", 512_000_000),
        ("2GiB", 2 * GiB),
        ("1.5GB", 1_500_000_000),
        ("1TiB", 1024**4),
        ("2G", 2_000_000_000),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "12XB", "iB", "1.2.3GB", "GB"])
def test_parse_size_rejects(text: str) -> None:
    assert parse_size(text) is None


# --------------------------------------------------------------------------- errors


def bridge(**body: Any) -> dict[str, Any]:
    return {"bridges": {"x": {"python_module": "mypkg.mod", **body}}}


def opts(**options: Any) -> dict[str, Any]:
    return bridge(options=options)


ERRORS = [
    # (data, parts the message must contain)
    (bridge(pool_siz=2), ["bridges.x.pool_siz", "unknown key", "did you mean 'pool_size'"]),
    (opts(timout=3), ["bridges.x.options.timout", "did you mean 'timeout'"]),
    ({"bridge": {}}, ["bridge: unknown key 'bridge'", "did you mean 'bridges'"]),
    ({"bridges": {"echo": {"options": {"limits": {"cpu": 1}}}}}, ["limits.cpu", "cpu_seconds"]),
    (bridge(pool_size="2"), ["bridges.x.pool_size", "integer", "'2'", "whole number"]),
    (bridge(pool_size=True), ["bridges.x.pool_size", "integer", "True"]),
    (bridge(pool_size=-1), ["bridges.x.pool_size", ">= 0", "(got -1)", "0 or more"]),
    (bridge(overflow=-2), ["bridges.x.overflow", "(got -2)"]),
    (bridge(pool_size=0, options={"lazy": False}), ["bridges.x.pool_size", "options.lazy"]),
    (bridge(pool_size=0, overflow=0), ["bridges.x.pool_size", "no worker could ever run"]),
    (opts(lazy="yes"), ["bridges.x.options.lazy", "true or false", "'yes'"]),
    (opts(timeout="5 parsecs"), ["bridges.x.options.timeout", "'5 parsecs'", '"30s"']),
    (opts(timeout="-5s"), ["bridges.x.options.timeout", "negative", "'-5s'"]),
    (opts(timeout=0), ["bridges.x.options.timeout", "greater than 0", "(got 0.0)"]),
    (opts(idle_timeout=[1]), ["bridges.x.options.idle_timeout", "duration", "[1]"]),
    (opts(max_age=float("inf")), ["bridges.x.options.max_age", "finite"]),
    (opts(max_memory="12XB"), ["bridges.x.options.max_memory", "'12XB'", '"512MB"']),
    (opts(max_memory="lots"), ["bridges.x.options.max_memory", "is not a size"]),
    (opts(max_frame_bytes=0), ["bridges.x.options.max_frame_bytes", "at least 1"]),
    (opts(max_requests=0), ["bridges.x.options.max_requests", ">= 1", "leave it out"]),
    (opts(codec="xml"), ["bridges.x.options.codec", "'msgpack' or 'json'", "'xml'"]),
    (opts(restart_backoff=5, max_restart_backoff=1), ["options.max_restart_backoff", ">="]),
    (opts(limits={"open_files": 0}), ["bridges.x.options.limits.open_files", ">= 1"]),
    (bridge(python_script="b.py"), ["bridges.x", "both python_module and python_script"]),
    ({"bridges": {"x": {}}}, ["bridges.x", "not a built-in", "python_script = "]),
    (bridge(python_module="bridge.py"), ["bridges.x.python_module", "python_script ="]),
    (bridge(python_module="my pkg"), ["bridges.x.python_module", "'my pkg'", "package.module"]),
    (
        {"bridges": {"x": {"python_script": "bridge.txt"}}},
        ["bridges.x.python_script", ".py file", "'bridge.txt'"],
    ),
    (bridge(python=""), ["bridges.x.python", "empty"]),
    (bridge(python=3), ["bridges.x.python", "string", "(got 3)"]),
    (bridge(required_env="KEY"), ["bridges.x.required_env", "list", "'KEY'"]),
    (bridge(required_env=["BAD-NAME"]), ["bridges.x.required_env[0]", "'BAD-NAME'"]),
    (
        bridge(required_packages=["sentence-transformers"]),
        ["bridges.x.required_packages[0]", "'sentence_transformers'"],
    ),
    (bridge(settings=["a"]), ["bridges.x.settings", "table", "['a']"]),
    (
        bridge(settings={"when": datetime.date(2024, 1, 1)}),
        ["bridges.x.settings.when", "JSON value", "quote it"],
    ),
    (bridge(env={"PORT": 8080}), ["bridges.x.env.PORT", "string", "8080", 'quote it: "8080"']),
    (bridge(env={"BAD=": "1"}), ["bridges.x.env.BAD=", "environment variable name"]),
    (bridge(options=5), ["bridges.x.options", "table", "(got 5)"]),
    ({"bridges": {"x": 5}}, ["bridges.x", "table"]),
    ({"bridges": ["echo"]}, ["bridges", "table of bridges"]),
    ({"bridges": {"bad name": {}}}, ["bridges.bad name", "valid bridge name", "letters"]),
    ({"bridges": {"common": {}}}, ["bridges.common", "reserved"]),
    (
        {"default_bridge": "ehco", "bridges": {"echo": {}}},
        ["default_bridge", "'ehco'", "did you mean 'echo'", "one of: echo"],
    ),
    ({"default_bridge": "echo"}, ["default_bridge", "'echo'", "[bridges.echo]"]),
]


@pytest.mark.parametrize(("data", "parts"), ERRORS)
def test_mapping_errors_name_key_path_value_and_fix(data: dict[str, Any], parts: list[str]) -> None:
    message = config_error(MLBridgeConfig.from_mapping, data, source="cfg.toml")
    assert message.startswith("cfg.toml: "), message
    assert_mentions(message, *parts)


def test_config_error_details_carry_key_path_and_fix() -> None:
    with pytest.raises(ConfigError) as info:
        MLBridgeConfig.from_mapping(bridge(pool_size=-1))
    assert isinstance(info.value, ValueError)
    assert info.value.details["key_path"] == "bridges.x.pool_size"
    assert info.value.details["value"] == -1
    assert "0 or more" in info.value.details["fix"]


def test_top_level_must_be_a_mapping() -> None:
    assert_mentions(config_error(MLBridgeConfig.from_mapping, ["x"]), "table")


# --------------------------------------------------------------------------- direct objects


def test_objects_built_in_code_are_validated() -> None:
    assert_mentions(
        config_error(BridgeConfig, name="x", python_module="m", pool_size=-1),
        "bridges.x.pool_size",
        "(got -1)",
    )
    assert_mentions(config_error(BridgeOptions, codec="xml"), "options.codec")
    assert_mentions(config_error(BridgeConfig, name="x"), "bridges.x", "python_module")
    other = BridgeConfig(name="b", python_module="m")
    assert_mentions(config_error(MLBridgeConfig, {"a": other}), "bridges.a", "'b'")
    assert_mentions(config_error(MLBridgeConfig, {}, "nope"), "default_bridge", "'nope'")


def test_objects_built_in_code_are_normalised() -> None:
    o = BridgeOptions(timeout="30s", max_memory="1GiB")  # type: ignore[arg-type]
    assert (o.timeout, o.max_memory) == (30.0, GiB)
    b = BridgeConfig(name="echo", required_env=["A"], settings={"k": "v"})  # type: ignore[arg-type]
    assert (b.python_module, b.required_env, b.target) == ("echo", ("A",), "echo")
    given = {"echo": b}
    cfg = MLBridgeConfig(given)
    assert cfg.default_bridge == "echo"
    given["other"] = b
    assert list(cfg.bridges) == ["echo"]  # copied, not aliased
    with pytest.raises(TypeError):
        cfg.bridges["other"] = b  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.with_bridge(bridge_config("fast", python_module="echo")).bridges["x"] = b  # type: ignore[index]


def test_config_objects_are_frozen() -> None:
    cfg = MLBridgeConfig.from_mapping(FULL)
    mine = cfg.bridges["mine"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mine.pool_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mine.options.timeout = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.default_bridge = "echo"  # type: ignore[misc]
    with pytest.raises(TypeError):
        mine.settings["default_model"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        mine.env["HF_HOME"] = "/x"  # type: ignore[index]
    with pytest.raises(TypeError):
        mine.options.limits["open_files"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.bridges["new"] = mine  # type: ignore[index]
    assert isinstance(mine.required_env, tuple)


# --------------------------------------------------------------------------- derived configs


def test_with_without_replace_bridge_return_new_configs() -> None:
    base = MLBridgeConfig.from_mapping({"bridges": {"echo": {}}})
    added = base.with_bridge(bridge_config("fast", python_module="echo", pool_size=3))
    assert list(base.bridges) == ["echo"]
    assert list(added.bridges) == ["echo", "fast"]
    assert added.default_bridge == "echo"

    changed = added.replace_bridge("fast", pool_size=4, timeout="2s", settings={"a": 1})
    fast = changed.bridges["fast"]
    assert (fast.pool_size, fast.options.timeout, dict(fast.settings)) == (4, 2.0, {"a": 1})
    assert added.bridges["fast"].pool_size == 3

    moved = changed.with_default_bridge("fast").without_bridge("fast")
    assert list(moved.bridges) == ["echo"]
    assert moved.default_bridge == "echo"

    replaced = added.with_bridge(bridge_config("fast", python_module="echo", pool_size=1))
    assert replaced.bridges["fast"].pool_size == 1


def test_replace_bridge_switching_module_to_script(tmp_path: Path) -> None:
    cfg = MLBridgeConfig.from_mapping({"bridges": {"echo": {}}})
    script = str(tmp_path / "b.py")
    new = cfg.replace_bridge("echo", python_script=script).bridges["echo"]
    assert (new.python_module, new.python_script, new.target) == (None, script, script)


def test_derived_config_errors() -> None:
    cfg = MLBridgeConfig.from_mapping({"bridges": {"echo": {}}})
    assert_mentions(config_error(cfg.without_bridge, "ecko"), "bridges.ecko", "did you mean")
    assert_mentions(config_error(cfg.replace_bridge, "nope", pool_size=1), "bridges.nope")
    assert_mentions(
        config_error(cfg.replace_bridge, "echo", pool_size=-1), "bridges.echo.pool_size"
    )
    assert_mentions(
        config_error(cfg.replace_bridge, "echo", timout=1), "unknown key", "did you mean 'timeout'"
    )
    assert_mentions(config_error(cfg.with_default_bridge, "nope"), "bridges.nope")
    assert_mentions(config_error(cfg.with_bridge, {"name": "x"}), "BridgeConfig")


def test_bridge_config_routes_option_kwargs_into_options() -> None:
    cfg = bridge_config(
        "mine",
        python_script="bridge.py",
        python_module=None,
        pool_size=2,
        overflow=1,
        timeout="45s",
        max_memory="1GiB",
        lazy=False,
        settings={"model": "m"},
        env={"K": "v"},
    )
    assert (cfg.python_script, cfg.python_module, cfg.pool_size, cfg.overflow) == (
        "bridge.py",
        None,
        2,
        1,
    )
    assert (cfg.options.timeout, cfg.options.max_memory, cfg.options.lazy) == (45.0, GiB, False)
    assert (dict(cfg.settings), dict(cfg.env)) == ({"model": "m"}, {"K": "v"})
    both = bridge_config("x", python_module="m", options={"timeout": 1}, checkout_timeout=3)
    assert (both.options.timeout, both.options.checkout_timeout) == (1.0, 3.0)
    # a built-in needs no module; None (as start_bridge passes it) means unset
    assert bridge_config("echo", python_script=None, python_module=None).target == "echo"


def test_bridge_config_errors() -> None:
    assert_mentions(
        config_error(bridge_config, "x", python_module="m", timout=3),
        "bridges.x.timout",
        "did you mean 'timeout'",
    )
    assert_mentions(
        config_error(bridge_config, "mine", python_script=None, python_module=None),
        "bridges.mine",
        "python_script",
    )
    assert_mentions(
        config_error(bridge_config, "x", python_module="m", pool_size="many"), "bridges.x.pool_size"
    )


# --------------------------------------------------------------------------- TOML files

TOML = """\
default_bridge = "mine"

[bridges.echo]
pool_size = 2

[bridges.mine]
python_script = "bridges/mine.py"
python = "venv/bin/python"
required_env = ["API_KEY"]

[bridges.mine.options]
timeout = "30s"
max_memory = "2GiB"

[bridges.mine.settings]
default_model = "tiny"
"""


def test_from_toml_reads_mlbridge_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "mlbridge.toml", TOML)
    cfg = MLBridgeConfig.from_toml(path)
    assert cfg.default_bridge == "mine"
    mine = cfg.bridges["mine"]
    # relative paths resolve against the file's folder
    assert mine.python_script == str(tmp_path.resolve() / "bridges" / "mine.py")
    assert mine.python == str(tmp_path.resolve() / "venv" / "bin" / "python")
    assert (mine.options.timeout, mine.options.max_memory) == (30.0, 2 * GiB)
    assert mine.settings == {"default_model": "tiny"}
    assert cfg.bridges["echo"].pool_size == 2
    assert MLBridgeConfig.from_toml(str(path)) == cfg


def test_from_toml_reads_pyproject_tool_section(tmp_path: Path) -> None:
    body = "[project]\nname='x'\n\n" + TOML.replace("[bridges.", "[tool.mlbridge.bridges.")
    body = body.replace('default_bridge = "mine"', "")
    body += '\n[tool.mlbridge]\ndefault_bridge = "echo"\n'
    path = write(tmp_path / "pyproject.toml", body)
    cfg = MLBridgeConfig.from_toml(path)
    assert cfg.default_bridge == "echo"
    assert cfg.bridges["mine"].options.timeout == 30.0


def test_toml_errors_name_the_file_and_key_path(tmp_path: Path) -> None:
    path = write(tmp_path / "mlbridge.toml", "[bridges.echo]\npool_size = -3\n")
    assert_mentions(
        config_error(MLBridgeConfig.from_toml, path),
        f"{path}: bridges.echo.pool_size",
        "(got -3)",
    )
    path = write(tmp_path / "mlbridge.toml", "[bridges.echo.options]\ntimout = 3\n")
    assert_mentions(
        config_error(MLBridgeConfig.from_toml, path),
        str(path),
        "bridges.echo.options.timout",
        "did you mean 'timeout'",
    )


def test_pyproject_errors_name_the_tool_key_path(tmp_path: Path) -> None:
    path = write(tmp_path / "pyproject.toml", "[tool.mlbridge.bridges.echo]\noverflow = -1\n")
    assert_mentions(
        config_error(MLBridgeConfig.from_toml, path),
        f"{path}: tool.mlbridge.bridges.echo.overflow",
    )


def test_pyproject_without_tool_section(tmp_path: Path) -> None:
    path = write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
    assert_mentions(config_error(MLBridgeConfig.from_toml, path), str(path), "[tool.mlbridge]")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert_mentions(config_error(MLBridgeConfig.from_toml, missing), str(missing), "does not exist")
    assert_mentions(config_error(MLBridgeConfig.from_toml, tmp_path), str(tmp_path), "directory")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "mlbridge.toml"
    path.write_bytes(b"\xff\xfe[bridges]")
    assert_mentions(config_error(MLBridgeConfig.from_toml, path), str(path), "cannot read", "UTF-8")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "mlbridge.toml", "[bridges.echo\npool_size = 1\n")
    message = config_error(MLBridgeConfig.from_toml, path)
    assert_mentions(message, str(path), "invalid TOML", "line 1")


# --------------------------------------------------------------------------- environment


def test_from_env_builds_a_config() -> None:
    cfg = MLBridgeConfig.from_env(
        {
            "MLBRIDGE_DEFAULT_BRIDGE": "fast",
            "MLBRIDGE_BRIDGES__ECHO__POOL_SIZE": "2",
            "MLBRIDGE_BRIDGES__ECHO__OPTIONS__TIMEOUT": "5",
            "MLBRIDGE_BRIDGES__ECHO__OPTIONS__MAX_MEMORY": "1GiB",
            "MLBRIDGE_BRIDGES__ECHO__OPTIONS__LAZY": "false",
            "MLBRIDGE_BRIDGES__ECHO__SETTINGS__X": "y",
            "MLBRIDGE_BRIDGES__ECHO__SETTINGS__N": "3",
            "MLBRIDGE_BRIDGES__ECHO__ENV__Api_Key": "123",
            "MLBRIDGE_BRIDGES__ECHO__REQUIRED_ENV": '["Api_Key"]',
            "MLBRIDGE_BRIDGES__FAST__PYTHON_MODULE": "echo",
            "PATH": "/usr/bin",
        }
    )
    assert cfg.default_bridge == "fast"
    echo = cfg.bridges["echo"]
    assert (echo.pool_size, echo.options.timeout, echo.options.max_memory) == (2, 5.0, GiB)
    assert echo.options.lazy is False
    assert echo.settings == {"x": "y", "n": 3}  # JSON when it parses, else a string
    assert dict(echo.env) == {"Api_Key": "123"}  # env values stay strings, names keep case
    assert echo.required_env == ("Api_Key",)
    assert cfg.bridges["fast"].python_module == "echo"


def test_from_env_merges_over_a_file_config(tmp_path: Path) -> None:
    base = MLBridgeConfig.from_toml(write(tmp_path / "mlbridge.toml", TOML))
    cfg = MLBridgeConfig.from_env(
        {
            "MLBRIDGE_BRIDGES__MINE__OPTIONS__TIMEOUT": "2m",
            "MLBRIDGE_BRIDGES__MINE__SETTINGS__TEMPERATURE": "0.5",
            "MLBRIDGE_BRIDGES__ECHO__PYTHON_MODULE": "mlbridge.bridges.echo:EchoBridge",
        },
        base=base,
    )
    mine = cfg.bridges["mine"]
    assert mine.options.timeout == 120.0
    assert mine.options.max_memory == 2 * GiB  # from the file
    assert mine.settings == {"default_model": "tiny", "temperature": 0.5}
    assert mine.python_script == base.bridges["mine"].python_script
    assert cfg.bridges["echo"].pool_size == 2
    assert cfg.bridges["echo"].python_module == "mlbridge.bridges.echo:EchoBridge"
    assert cfg.default_bridge == "mine"


def test_from_env_module_replaces_script_from_file(tmp_path: Path) -> None:
    base = MLBridgeConfig.from_toml(write(tmp_path / "mlbridge.toml", TOML))
    cfg = MLBridgeConfig.from_env({"MLBRIDGE_BRIDGES__MINE__PYTHON_MODULE": "pkg.m"}, base=base)
    assert (cfg.bridges["mine"].python_module, cfg.bridges["mine"].python_script) == ("pkg.m", None)


def test_from_env_without_variables_returns_the_base() -> None:
    base = MLBridgeConfig.builtin_defaults()
    environ = {"HOME": "/root", "MLBRIDGE_LOG_LEVEL": "debug", "MLBRIDGE_WORKER_SETTINGS": "{}"}
    assert MLBridgeConfig.from_env(environ, base=base) is base
    assert MLBridgeConfig.from_env({}) == MLBridgeConfig()


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLBRIDGE_BRIDGES__ECHO__OVERFLOW", "4")
    assert MLBridgeConfig.from_env().bridges["echo"].overflow == 4


@pytest.mark.parametrize(
    ("environ", "parts"),
    [
        (
            {"MLBRIDGE_BRIDGES__ECHO__POOL_SIZE": "-3"},
            [
                "environment: bridges.echo.pool_size",
                "(got -3)",
                "MLBRIDGE_BRIDGES__ECHO__POOL_SIZE",
            ],
        ),
        (
            {"MLBRIDGE_BRIDGES__ECHO__OPTIONS__TIMEOUT": "soon"},
            ["bridges.echo.options.timeout", "'soon'", "MLBRIDGE_BRIDGES__ECHO__OPTIONS__TIMEOUT"],
        ),
        (
            {"MLBRIDGE_BRIDGES__ECHO__POOLSIZE": "2"},
            [
                "bridges.echo.poolsize",
                "did you mean 'pool_size'",
                "MLBRIDGE_BRIDGES__ECHO__POOLSIZE",
            ],
        ),
        (
            {"MLBRIDGE_BRIDGE__ECHO__POOL_SIZE": "2"},
            ["MLBRIDGE_BRIDGE__ECHO__POOL_SIZE", "did you mean 'bridges'"],
        ),
        ({"MLBRIDGE_DEFAULT_BRIGDE": "echo"}, ["did you mean 'default_bridge'"]),
        ({"MLBRIDGE_BRIDGES____POOL_SIZE": "2"}, ["empty key", "two underscores"]),
        (
            {"MLBRIDGE_DEFAULT_BRIDGE": "nope", "MLBRIDGE_BRIDGES__ECHO__POOL_SIZE": "1"},
            ["default_bridge", "'nope'", "MLBRIDGE_DEFAULT_BRIDGE"],
        ),
        (
            {"MLBRIDGE_BRIDGES__ECHO__REQUIRED_ENV": "A,B"},
            ["bridges.echo.required_env", "list", "'A,B'"],
        ),
    ],
)
def test_env_errors_name_the_variable(environ: dict[str, str], parts: list[str]) -> None:
    assert_mentions(config_error(MLBridgeConfig.from_env, environ), *parts)


# --------------------------------------------------------------------------- discovery


def test_discover_walks_up_to_mlbridge_toml(tmp_path: Path) -> None:
    write(tmp_path / "mlbridge.toml", TOML)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    cfg = MLBridgeConfig.discover(deep)
    assert cfg is not None
    assert cfg.default_bridge == "mine"
    assert find_config_file(deep) == (tmp_path / "mlbridge.toml").resolve()


def test_discover_uses_cwd_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "mlbridge.toml", "[bridges.echo]\noverflow = 7\n")
    monkeypatch.chdir(tmp_path)
    cfg = MLBridgeConfig.discover()
    assert cfg is not None
    assert cfg.bridges["echo"].overflow == 7


def test_discover_pyproject_with_tool_section(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.mlbridge.bridges.echo]\npool_size = 3\n")
    sub = tmp_path / "pkg"
    # a pyproject.toml without [tool.mlbridge] on the way up is skipped, even when broken
    write(sub / "pyproject.toml", "[project\nname = broken")
    cfg = MLBridgeConfig.discover(sub)
    assert cfg is not None
    assert cfg.bridges["echo"].pool_size == 3


def test_discover_prefers_mlbridge_toml_and_the_nearest_folder(tmp_path: Path) -> None:
    write(tmp_path / "mlbridge.toml", "[bridges.echo]\npool_size = 1\n")
    write(tmp_path / "proj" / "pyproject.toml", "[tool.mlbridge.bridges.echo]\npool_size = 2\n")
    write(tmp_path / "proj" / "mlbridge.toml", "[bridges.echo]\npool_size = 3\n")
    near = MLBridgeConfig.discover(tmp_path / "proj")
    assert near is not None
    assert near.bridges["echo"].pool_size == 3
    (tmp_path / "proj" / "mlbridge.toml").unlink()
    pyproject = MLBridgeConfig.discover(tmp_path / "proj")
    assert pyproject is not None
    assert pyproject.bridges["echo"].pool_size == 2


def test_discover_finds_nothing(tmp_path: Path) -> None:
    if find_config_file(tmp_path.parent) is not None:
        pytest.skip("a config file exists above the temporary folder")
    write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n")
    assert MLBridgeConfig.discover(tmp_path) is None


def test_discover_reports_errors_in_the_found_file(tmp_path: Path) -> None:
    path = write(tmp_path / "mlbridge.toml", "[bridges.echo]\npool_size = 'x'\n")
    assert_mentions(config_error(MLBridgeConfig.discover, tmp_path), str(path), "pool_size")


def test_load_order(tmp_path: Path) -> None:
    write(tmp_path / "mlbridge.toml", "[bridges.echo]\npool_size = 2\n")
    other = write(tmp_path / "other.toml", "[bridges.echo]\npool_size = 5\n")
    env = {"MLBRIDGE_BRIDGES__ECHO__OVERFLOW": "1"}
    found = MLBridgeConfig.load(start_dir=tmp_path, environ=env).bridges["echo"]
    assert (found.pool_size, found.overflow) == (2, 1)
    explicit = MLBridgeConfig.load(other, start_dir=tmp_path, environ=env).bridges["echo"]
    assert explicit.pool_size == 5
    via_var = MLBridgeConfig.load(start_dir=tmp_path, environ={"MLBRIDGE_CONFIG": str(other)})
    assert via_var.bridges["echo"].pool_size == 5


def test_load_falls_back_to_builtins(tmp_path: Path) -> None:
    if find_config_file(tmp_path) is not None:
        pytest.skip("a config file exists above the temporary folder")
    cfg = MLBridgeConfig.load(start_dir=tmp_path, environ={"MLBRIDGE_BRIDGES__ECHO__OVERFLOW": "2"})
    assert cfg.default_bridge == "echo"
    assert cfg.bridges["echo"].overflow == 2


# --------------------------------------------------------------------------- built-ins


def test_builtin_defaults_are_echo_plus_installed_frameworks() -> None:
    cfg = MLBridgeConfig.builtin_defaults()
    assert cfg.default_bridge == "echo"
    expected = ["echo"] + [
        n
        for n in host_builtins.BUILTIN_BRIDGES
        if n != "echo" and host_builtins.builtin_available(n)
    ]
    assert list(cfg.bridges) == expected
    for name, b in cfg.bridges.items():
        assert (b.python_module, b.options.lazy, b.python) == (name, True, sys.executable)


def test_builtin_defaults_include_a_framework_when_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_config_load, "builtin_available", lambda name: name == "dspy")
    assert list(MLBridgeConfig.builtin_defaults().bridges) == ["echo", "dspy"]
    monkeypatch.setattr(_config_load, "builtin_available", lambda name: False)
    assert list(MLBridgeConfig.builtin_defaults().bridges) == ["echo"]


def test_builtin_available_checks_bridge_module_and_packages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    present = {"mlbridge.bridges.dspy"}
    monkeypatch.setattr(host_builtins, "module_importable", lambda name: name in present)
    assert not host_builtins.builtin_available("dspy")
    present.add("dspy")
    assert host_builtins.builtin_available("dspy")
    assert not host_builtins.builtin_available("langchain")


def test_builtin_defaults_import_no_framework() -> None:
    code = (
        "import sys\n"
        "from mlbridge.config import MLBridgeConfig\n"
        "MLBridgeConfig.builtin_defaults()\n"
        "names = ('torch', 'transformers', 'sentence_transformers', 'dspy', 'langchain_core')\n"
        "print(','.join(n for n in names if n in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


def test_host_and_worker_share_one_list_of_builtins() -> None:
    from mlbridge._worker.entry import BUILTIN_BRIDGES

    assert host_builtins.BUILTIN_BRIDGES is BUILTIN_BRIDGES  # one object, not two copies
    assert set(host_builtins.BUILTIN_REQUIREMENTS) == set(BUILTIN_BRIDGES)
    assert host_builtins.BUILTIN_REQUIREMENTS["transformers"] == (
        "torch",
        "transformers",
        "sentence_transformers",
    )
    assert host_builtins.builtin_module("echo") == "mlbridge.bridges.echo"


def test_env_var_names_do_not_leak_into_os_environ() -> None:
    before = dict(os.environ)
    MLBridgeConfig.from_env({"MLBRIDGE_BRIDGES__ECHO__POOL_SIZE": "2"})
    assert dict(os.environ) == before


def test_the_loader_never_imports_the_public_config_module() -> None:
    """Imports go one way (config -> _config_load): no import of mlbridge.config in the loader,
    at module level or inside a function (only under TYPE_CHECKING, for annotations)."""
    import ast
    from pathlib import Path

    import mlbridge._config_load as loader

    tree = ast.parse(Path(loader.__file__).read_text())
    type_checking_blocks = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"
    ]
    allowed = {id(n) for block in type_checking_blocks for n in ast.walk(block)}
    offending = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom)
        and (n.module or "") in ("config", "mlbridge.config")
        and id(n) not in allowed
    ]
    assert offending == [], f"_config_load imports mlbridge.config at lines {offending}"


def test_each_config_object_is_validated_once_with_the_loaders_key_path() -> None:
    import mlbridge._config_load as loader

    calls: list[str] = []
    real = loader.validate_bridge

    def counting(ctx: object, path: str, name: str, values: object) -> object:
        calls.append(path)
        return real(ctx, path, name, values)  # type: ignore[arg-type]

    loader.bridge_defaults()  # the cached defaults are built once, before counting
    loader.validate_bridge = counting  # type: ignore[assignment]
    try:
        MLBridgeConfig.from_mapping({"bridges": {"a": {"python_module": "echo"}, "echo": {}}})
    finally:
        loader.validate_bridge = real  # type: ignore[assignment]
    assert sorted(calls) == ["bridges.a", "bridges.echo"]


def test_builtin_pool_defaults_apply_however_the_bridge_is_configured() -> None:
    # langchain: pool_size 2, overflow 1 and a 120 s timeout; dspy: 4 + 2 (issue 12)
    made = [
        BridgeConfig("langchain"),
        BridgeConfig("langchain", python_module="langchain"),
        bridge_config("langchain", python_module="langchain"),  # what start_bridge builds
        MLBridgeConfig.from_mapping({"bridges": {"langchain": {}}}).bridges["langchain"],
    ]
    for cfg in made:
        assert (cfg.pool_size, cfg.overflow, cfg.options.timeout) == (2, 1, 120.0), cfg
    dspy = BridgeConfig("dspy")
    assert (dspy.pool_size, dspy.overflow) == (4, 2)
    # what the user says wins; other bridges keep 1 / 0
    own = BridgeConfig("langchain", pool_size=1, options=BridgeOptions(timeout=60.0))
    assert (own.pool_size, own.overflow, own.options.timeout) == (1, 1, 60.0)
    assert (BridgeConfig("echo").pool_size, BridgeConfig("echo").overflow) == (1, 0)
    assert pickle.loads(pickle.dumps(own)) == own
    with pytest.raises(ConfigError, match=r"pool_size.*>= 0"):
        BridgeConfig("echo", pool_size=-1)


def test_options_and_ray_keys_may_sit_in_the_bridge_table() -> None:
    cfg = MLBridgeConfig.from_mapping(
        {
            "bridges": {
                "echo": {
                    "max_memory": "2GB",
                    "max_cpu": "100%",
                    "timeout": "30s",
                    "num_cpus": 0.5,
                    "resources": {"custom": 1},
                    "options": {"max_processes": 16},
                }
            }
        }
    )
    echo = cfg.bridges["echo"]
    assert (echo.options.max_memory, echo.options.timeout, echo.options.max_processes) == (
        2_000_000_000,
        30.0,
        16,
    )
    assert echo.ray is not None and echo.ray.num_cpus == 0.5
    assert dict(echo.ray.resources) == {"custom": 1.0}
    # the options table wins over the same key beside it
    both = {"bridges": {"echo": {"timeout": "30s", "options": {"timeout": "5s"}}}}
    assert MLBridgeConfig.from_mapping(both).bridges["echo"].options.timeout == 5.0
    # keywords (start_bridge / update_config) take the Ray keys too
    kw = bridge_config("echo", python_module="echo", backend="ray", num_cpus=0.25, num_gpus=0)
    assert kw.ray is not None and (kw.ray.num_cpus, kw.options.backend) == (0.25, "ray")
    assert kw.replace(num_cpus=1).ray.num_cpus == 1.0  # type: ignore[union-attr]
