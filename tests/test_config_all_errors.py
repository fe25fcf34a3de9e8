"""Every config error in the file is reported at once (issue 10, defect 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlbridge import cli
from mlbridge.config import BridgeConfig, MLBridgeConfig
from mlbridge.errors import ConfigError

BAD_TOML = """\
default_bridge = "echo"
defualt_timeout = 3

[bridges.echo]
python_module = "echo"
pool_size = -1
overflow = "lots"

[bridges.echo.options]
timeout = "soon"
max_memory = "4 parsecs"
helth_check_interval = "5s"

[bridges.other]
python_module = "echo"
pool_sise = 2
"""

EXPECTED_PATHS = [
    "defualt_timeout",
    "bridges.echo.pool_size",
    "bridges.echo.overflow",
    "bridges.echo.options.helth_check_interval",
    "bridges.echo.options.timeout",
    "bridges.echo.options.max_memory",
    "bridges.other.pool_sise",
]


def test_every_error_in_the_file_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "mlbridge.toml"
    path.write_text(BAD_TOML)
    with pytest.raises(ConfigError) as info:
        MLBridgeConfig.load(path, environ={})
    exc = info.value
    text = str(exc)
    assert f"{len(EXPECTED_PATHS)} errors in the config" in text
    listed = exc.details["errors"]
    assert sorted(e["key_path"] for e in listed) == sorted(EXPECTED_PATHS)
    for e in listed:
        assert e["key_path"] in text and e["fix"]  # each names its key and its fix
    assert "'soon'" in text and "'4 parsecs'" in text and "'lots'" in text  # the bad values
    assert "Did you mean 'pool_size'?" in text
    # default_bridge names 'echo', which has errors: not also "not configured"
    assert "names a bridge that is not configured" not in text


def test_a_single_error_keeps_its_own_message(tmp_path: Path) -> None:
    path = tmp_path / "mlbridge.toml"
    path.write_text(
        '[bridges.echo]\npython_module = "echo"\n[bridges.echo.options]\ntimeout = "x"\n'
    )
    with pytest.raises(ConfigError) as info:
        MLBridgeConfig.load(path, environ={})
    assert str(info.value).startswith(f"{path}: bridges.echo.options.timeout: is not a duration")
    assert info.value.details["key_path"] == "bridges.echo.options.timeout"
    assert "errors" not in info.value.details


def test_a_default_naming_no_bridge_is_reported_beside_the_other_errors() -> None:
    data = {"default_bridge": "nope", "bridges": {"echo": {"pool_size": "two"}}}
    with pytest.raises(ConfigError) as info:
        MLBridgeConfig.from_mapping(data, source="cfg.toml")
    paths = [e["key_path"] for e in info.value.details["errors"]]
    assert paths == ["bridges.echo.pool_size", "default_bridge"]


def test_objects_built_in_code_still_raise_the_first_error() -> None:
    with pytest.raises(ConfigError) as info:
        BridgeConfig(name="echo", python_module="echo", pool_size=-1, overflow=-1)
    assert "errors" not in info.value.details
    assert "pool_size" in str(info.value)


def test_doctor_lists_each_config_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "mlbridge.toml"
    path.write_text(BAD_TOML)
    code = cli.main(["doctor", "--json", "--config", str(path)])
    out, _ = capsys.readouterr()
    assert code == 1
    problems = json.loads(out)["problems"]
    assert sorted(p["key_path"] for p in problems) == sorted(EXPECTED_PATHS)
    assert all(p["kind"] == "config" and p["fix"] for p in problems)

    code = cli.main(["call", "echo", "echo", "--config", str(path)])
    _, err = capsys.readouterr()
    assert code == 3
    assert all(p in err for p in EXPECTED_PATHS)
