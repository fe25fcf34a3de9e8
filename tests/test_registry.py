"""Registry (register/get/list/default/update/unregister) and environment checks, run for real."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbridge._host.builtins import BUILTIN_REQUIREMENTS
from mlbridge._host.registry import (
    EnvironmentProblem,
    Registry,
    check_environment,
    clear_environment_cache,
    validate_environment,
    worker_environment,
)
from mlbridge.config import BridgeConfig, MLBridgeConfig, bridge_config
from mlbridge.errors import ConfigError, EnvironmentCheckError, FrameworkNotFoundError

MISSING_PKG = "mlbridge_test_no_such_package_xyz"
MISSING_VAR = "MLBRIDGE_TEST_SURELY_UNSET_VAR"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_environment_cache()
    yield
    clear_environment_cache()


def kinds(problems: list[EnvironmentProblem]) -> list[str]:
    return [p.kind for p in problems]


def executable(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --------------------------------------------------------------------------- registry


def test_register_get_list_default() -> None:
    reg = Registry()
    assert (reg.list(), reg.default, len(reg)) == ([], None, 0)
    echo = reg.register(bridge_config("echo"))
    fast = reg.register(bridge_config("fast", python_module="echo", pool_size=2))
    assert reg.list() == ["echo", "fast"]
    assert list(reg) == ["echo", "fast"]
    assert reg.default == "echo"  # the first registered
    assert reg.get("fast") == fast
    assert reg.get("echo") == echo
    assert "fast" in reg
    assert "slow" not in reg
    reg.set_default("fast")
    assert reg.default == "fast"
    assert reg.config.default_bridge == "fast"


def test_registry_from_a_config() -> None:
    bridges = {"echo": {}, "b": {"python_module": "echo"}}
    cfg = MLBridgeConfig.from_mapping({"default_bridge": "b", "bridges": bridges})
    reg = Registry(cfg)
    assert (reg.list(), reg.default) == (["echo", "b"], "b")
    assert reg.config is cfg


def test_register_rejects_duplicates_unless_replacing() -> None:
    reg = Registry()
    reg.register(bridge_config("echo"))
    with pytest.raises(ConfigError) as info:
        reg.register(bridge_config("echo", pool_size=3))
    assert "bridges.echo" in str(info.value)
    assert "update('echo'" in str(info.value)
    assert reg.get("echo").pool_size == 1
    reg.register(bridge_config("echo", pool_size=3), replace_existing=True)
    assert reg.get("echo").pool_size == 3


def test_register_validates() -> None:
    reg = Registry()
    with pytest.raises(ConfigError) as info:
        reg.register({"name": "echo"})  # type: ignore[arg-type]
    assert "BridgeConfig" in str(info.value)
    # a config forced into an invalid state is caught again at registration
    bad = bridge_config("echo")
    object.__setattr__(bad, "pool_size", -5)
    with pytest.raises(ConfigError) as info:
        reg.register(bad)
    assert "bridges.echo.pool_size" in str(info.value)
    assert "(got -5)" in str(info.value)
    assert reg.list() == []


def test_get_unknown_lists_known_names_and_suggests() -> None:
    reg = Registry()
    reg.register(bridge_config("echo"))
    reg.register(bridge_config("fast", python_module="echo"))
    with pytest.raises(FrameworkNotFoundError) as info:
        reg.get("ehco")
    message = str(info.value)
    assert isinstance(info.value, LookupError)
    assert "'ehco'" in message
    assert "echo, fast" in message
    assert "did you mean 'echo'" in message.lower()
    assert info.value.details["known"] == ["echo", "fast"]


def test_get_unregistered_builtin_says_what_it_needs() -> None:
    with pytest.raises(FrameworkNotFoundError) as info:
        Registry().get("dspy")
    assert "built-in" in str(info.value)
    assert "needs: dspy" in str(info.value)
    assert "start_bridge('dspy')" in str(info.value)


def test_update_returns_the_new_validated_config() -> None:
    reg = Registry()
    reg.register(bridge_config("echo"))
    old = reg.get("echo")
    new = reg.update("echo", pool_size=3, timeout="2s", settings={"a": 1})
    assert (new.pool_size, new.options.timeout, dict(new.settings)) == (3, 2.0, {"a": 1})
    assert reg.get("echo") == new
    assert old.pool_size == 1  # the old snapshot is unchanged
    with pytest.raises(ConfigError) as info:
        reg.update("echo", overflow=-1)
    assert "bridges.echo.overflow" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.update("echo", timout=1)
    assert "did you mean 'timeout'" in str(info.value).lower()
    assert reg.get("echo") == new
    with pytest.raises(FrameworkNotFoundError):
        reg.update("nope", pool_size=1)


def test_unregister_moves_the_default() -> None:
    reg = Registry()
    reg.register(bridge_config("echo"))
    reg.register(bridge_config("fast", python_module="echo"))
    removed = reg.unregister("echo")
    assert removed.name == "echo"
    assert (reg.list(), reg.default) == (["fast"], "fast")
    reg.unregister("fast")
    assert (reg.list(), reg.default) == ([], None)
    with pytest.raises(FrameworkNotFoundError):
        reg.unregister("fast")
    with pytest.raises(FrameworkNotFoundError):
        reg.set_default("fast")


# --------------------------------------------------------------------------- environment


def test_good_echo_bridge_passes() -> None:
    assert validate_environment(bridge_config("echo")) == []
    check_environment(bridge_config("echo"))  # does not raise
    assert Registry(MLBridgeConfig.builtin_defaults()).validate_environment("echo") == []


def test_missing_package() -> None:
    cfg = bridge_config("echo", required_packages=[MISSING_PKG, "json"])
    problems = validate_environment(cfg)
    assert kinds(problems) == ["package"]
    assert MISSING_PKG in problems[0].message
    assert sys.executable in problems[0].message
    assert problems[0].fix == f"{sys.executable} -m pip install {MISSING_PKG.replace('_', '-')}"
    assert problems[0].bridge == "echo"


def test_builtin_requirements_are_checked() -> None:
    problems = validate_environment(bridge_config("transformers"))
    missing = {
        p.message.split("'")[1] for p in problems if p.kind == "package" and "required" in p.message
    }
    expected = {
        pkg for pkg in BUILTIN_REQUIREMENTS["transformers"] if importlib.util.find_spec(pkg) is None
    }
    assert missing == expected
    bridge_module = importlib.util.find_spec("mlbridge.bridges.transformers") is not None
    assert ("module" in kinds(problems)) is not bridge_module


def test_missing_env_var() -> None:
    cfg = bridge_config("echo", required_env=[MISSING_VAR])
    problems = validate_environment(cfg, environ={"PATH": os.environ.get("PATH", "")})
    assert kinds(problems) == ["env"]
    assert f"{MISSING_VAR} is not set" in problems[0].message
    assert f"bridges.echo.env.{MISSING_VAR}" in problems[0].fix
    # present in the host's environment, or given in cfg.env: fine
    assert validate_environment(cfg, environ={**os.environ, MISSING_VAR: "1"}) == []
    with_env = bridge_config("echo", required_env=[MISSING_VAR], env={MISSING_VAR: "1"})
    assert validate_environment(with_env, environ={}) == []
    empty = validate_environment(cfg, environ={**os.environ, MISSING_VAR: ""})
    assert "is empty" in empty[0].message


def test_missing_env_var_in_the_real_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MISSING_VAR, raising=False)
    cfg = bridge_config("echo", required_env=[MISSING_VAR])
    assert kinds(validate_environment(cfg)) == ["env"]
    monkeypatch.setenv(MISSING_VAR, "yes")
    assert validate_environment(cfg) == []


def test_nonexistent_interpreter(tmp_path: Path) -> None:
    cfg = bridge_config("echo", python=str(tmp_path / "no" / "python"), required_env=[MISSING_VAR])
    problems = validate_environment(cfg, environ={})
    assert sorted(kinds(problems)) == ["env", "interpreter"]
    interp = next(p for p in problems if p.kind == "interpreter")
    assert str(tmp_path / "no" / "python") in interp.message
    assert "bridges.echo.python" in interp.fix


def test_interpreter_not_on_path() -> None:
    problems = validate_environment(bridge_config("echo", python="no-such-python-xyz"))
    assert kinds(problems) == ["interpreter"]
    assert "'no-such-python-xyz'" in problems[0].message


def test_interpreter_that_fails(tmp_path: Path) -> None:
    broken = executable(tmp_path / "python", "#!/bin/sh\necho boom >&2\nexit 3\n")
    problems = validate_environment(bridge_config("echo", python=str(broken)))
    assert kinds(problems) == ["interpreter"]
    assert "exit 3" in problems[0].message
    assert "boom" in problems[0].message


def test_interpreter_that_hangs(tmp_path: Path) -> None:
    slow = executable(tmp_path / "python", "#!/bin/sh\nexec sleep 30\n")
    problems = validate_environment(bridge_config("echo", python=str(slow)), timeout=0.5)
    assert kinds(problems) == ["interpreter"]
    assert "did not answer within 0.5s" in problems[0].message


def test_interpreter_too_old(tmp_path: Path) -> None:
    answer = '{"version": [3, 8, 10], "modules": {}, "mlbridge": null, "script": null}'
    old = executable(tmp_path / "python", f"#!/bin/sh\necho 'MLBRIDGE-PROBE {answer}'\n")
    problems = validate_environment(bridge_config("echo", python=str(old)))
    assert "interpreter" in kinds(problems)
    assert any("Python 3.8.10" in p.message for p in problems)


def test_mlbridge_not_importable_by_that_interpreter(tmp_path: Path) -> None:
    # -S: no site-packages, so mlbridge's own dependencies are missing there
    bare = executable(tmp_path / "python", f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    problems = validate_environment(bridge_config("echo", python=str(bare)))
    runtime = [p for p in problems if "worker runtime" in p.message]
    assert len(runtime) == 1
    assert runtime[0].kind == "package"
    assert "pip install mlbridge" in runtime[0].fix


def test_script_that_does_not_exist(tmp_path: Path) -> None:
    script = tmp_path / "nope.py"
    problems = validate_environment(bridge_config("mine", python_script=str(script)))
    assert kinds(problems) == ["module"]
    assert str(script) in problems[0].message
    assert "bridges.mine.python_script" in problems[0].fix


def test_script_that_does_not_compile(tmp_path: Path) -> None:
    script = tmp_path / "bad.py"
    script.write_text("def broken(:\n", encoding="utf-8")
    problems = validate_environment(bridge_config("mine", python_script=f"{script}:Bridge"))
    assert kinds(problems) == ["module"]
    assert "SyntaxError" in problems[0].message


def test_script_that_compiles(tmp_path: Path) -> None:
    script = tmp_path / "good.py"
    script.write_text("from mlbridge import BaseBridge\n", encoding="utf-8")
    assert validate_environment(bridge_config("mine", python_script=str(script))) == []


def test_module_not_importable() -> None:
    cfg = bridge_config("mine", python_module="mlbridge_test_no_such_module.sub:Bridge")
    problems = validate_environment(cfg)
    assert kinds(problems) == ["module"]
    assert "'mlbridge_test_no_such_module.sub'" in problems[0].message
    assert "bridges.mine.python_module" in problems[0].fix


def test_module_found_through_the_bridge_env(tmp_path: Path) -> None:
    (tmp_path / "mlbridge_test_mod_on_path.py").write_text("X = 1\n", encoding="utf-8")
    cfg = bridge_config("mine", python_module="mlbridge_test_mod_on_path:Bridge")
    assert kinds(validate_environment(cfg)) == ["module"]
    with_path = bridge_config(
        "mine", python_module="mlbridge_test_mod_on_path:Bridge", env={"PYTHONPATH": str(tmp_path)}
    )
    assert validate_environment(with_path) == []


def test_missing_answers_are_asked_again(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    cfg = bridge_config("echo", required_packages=["mlbridge_test_late_pkg"])
    assert kinds(validate_environment(cfg, environ=env)) == ["package"]
    (tmp_path / "mlbridge_test_late_pkg.py").write_text("", encoding="utf-8")
    assert validate_environment(cfg, environ=env) == []


def test_found_answers_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = bridge_config("echo", required_packages=["json"])
    calls: list[Any] = []
    real_run = subprocess.run

    def counting_run(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    assert validate_environment(cfg) == []
    assert validate_environment(cfg) == []
    assert len(calls) == 1
    clear_environment_cache()
    assert validate_environment(cfg) == []
    assert len(calls) == 2


def test_check_environment_raises_with_every_problem() -> None:
    cfg = bridge_config("echo", required_packages=[MISSING_PKG], required_env=[MISSING_VAR])
    with pytest.raises(EnvironmentCheckError) as info:
        check_environment(cfg, environ={"PATH": os.environ.get("PATH", "")})
    message = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "'echo'" in message
    assert "2 problems" in message
    assert MISSING_PKG in message
    assert MISSING_VAR in message
    assert message.count("Fix: ") == 2
    assert kinds(info.value.details["problems"]) == ["env", "package"]


def test_environment_problem_is_frozen() -> None:
    problem = EnvironmentProblem("echo", "env", "X is not set", "export X=1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.kind = "module"  # type: ignore[misc]
    assert str(problem) == "[echo] X is not set. Fix: export X=1"


def test_worker_environment() -> None:
    own = bridge_config("echo", env={"A": "1"})
    env = worker_environment(own, {"PATH": "/bin", "A": "0"})
    assert env == {"PATH": "/bin", "A": "1"}
    other: BridgeConfig = bridge_config("echo", python="/usr/bin/python3")
    env = worker_environment(other, {"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(os.pathsep)[1:] == ["/x"]
    assert os.path.isdir(os.path.join(env["PYTHONPATH"].split(os.pathsep)[0], "mlbridge"))
