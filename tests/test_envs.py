"""Per-bridge environments built with uv (issue 14): real uv, real PyPI index, real workers.

The cache lives in a temporary folder (``MLBRIDGE_CACHE_DIR``) shared by this module, so each
environment is built once; uv's own download cache is the user's, as in real use.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbridge import MLBridge
from mlbridge import _envs as envs
from mlbridge.cli import main
from mlbridge.config import EnvironmentSpec, MLBridgeConfig
from mlbridge.errors import ConfigError, EnvironmentCheckError

BRIDGE = str(Path(__file__).parent / "bridges" / "six_version_bridge.py")
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("mlbridge-cache")
    old = os.environ.get("MLBRIDGE_CACHE_DIR")
    os.environ["MLBRIDGE_CACHE_DIR"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("MLBRIDGE_CACHE_DIR", None)
        else:
            os.environ["MLBRIDGE_CACHE_DIR"] = old


def _bridge(packages: list[str], **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"packages": packages}
    env.update(extra.pop("environment", {}))
    return {
        "python_script": BRIDGE,
        "environment": env,
        "options": {"startup_timeout": 60, "timeout": 30},
        **extra,
    }


def _two_bridges() -> MLBridgeConfig:
    return MLBridgeConfig.from_mapping(
        {
            "bridges": {
                "six_old": _bridge(["six==1.16.0"], required_packages=["six"]),
                "six_new": _bridge(["six==1.17.0"], required_packages=["six"]),
            }
        }
    )


def _built_markers(root: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (root / "envs").glob(f"*/{envs.MARKER}")}


# --------------------------------------------------------------------------- unit: config, index


def test_environment_table_is_validated() -> None:
    cfg = MLBridgeConfig.from_mapping(
        {
            "bridges": {
                "a": _bridge(
                    ["six==1.17.0"],
                    environment={"python": "3.11", "constraints": ["idna<4"]},
                )
            }
        }
    )
    spec = cfg.bridges["a"].environment
    assert spec == EnvironmentSpec(("six==1.17.0",), "3.11", None, ("idna<4",))
    assert MLBridgeConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ConfigError, match=r"bridges\.a\.environment\.pakages.*Did you mean"):
        MLBridgeConfig.from_mapping(
            {"bridges": {"a": {"python_script": BRIDGE, "environment": {"pakages": ["six"]}}}}
        )
    with pytest.raises(ConfigError, match=r"environment\.packages: is empty"):
        MLBridgeConfig.from_mapping({"bridges": {"a": _bridge([])}})
    with pytest.raises(ConfigError, match=r"environment\.index_url: is not an http"):
        MLBridgeConfig.from_mapping(
            {"bridges": {"a": _bridge(["six"], environment={"index_url": "pypi.org"})}}
        )


def test_ray_tables_are_validated() -> None:
    cfg = MLBridgeConfig.from_mapping(
        {
            "ray": {"address": "ray://head:10001"},
            "bridges": {
                "a": {
                    "python_module": "echo",
                    "backend": "ray",  # in the bridge's table, or in its options
                    "ray": {"num_cpus": 0.5, "resources": {"side": 1}},
                }
            },
        }
    )
    assert cfg.ray.address == "ray://head:10001"
    assert cfg.bridges["a"].options.backend == "ray"
    assert cfg.bridges["a"].ray is not None and cfg.bridges["a"].ray.resources == {"side": 1.0}
    assert MLBridgeConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ConfigError, match=r"ray\.address: must be"):
        MLBridgeConfig.from_mapping({"ray": {"address": "not an address"}})
    with pytest.raises(ConfigError, match=r"bridges\.a\.ray\.num_gpu.*Did you mean 'num_gpus'"):
        MLBridgeConfig.from_mapping(
            {"bridges": {"a": {"python_module": "echo", "ray": {"num_gpu": 1}}}}
        )
    with pytest.raises(ConfigError, match=r"options\.backend: must be"):
        MLBridgeConfig.from_mapping({"bridges": {"a": {"python_module": "echo", "backend": "rya"}}})


def test_index_follows_pip_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\n"
        "extra-index-url = file:///opt/a/simple file:///opt/b/simple\n"
        "[install]\nfind-links = /opt/wheels\n"
    )
    base = {"HOME": str(tmp_path), "XDG_CONFIG_DIRS": str(tmp_path / "none")}
    got = envs.pip_index_settings({**base, "PIP_CONFIG_FILE": str(conf)})
    assert got.index_url == "https://mirror.example/simple"
    assert got.extra_index_urls == ("file:///opt/a/simple", "file:///opt/b/simple")
    assert got.find_links == ("/opt/wheels",)
    over = envs.pip_index_settings(
        {**base, "PIP_CONFIG_FILE": str(conf), "PIP_INDEX_URL": "https://other/simple"}
    )
    assert over.index_url == "https://other/simple"
    assert envs.pip_index_settings({**base, "PIP_CONFIG_FILE": os.devnull}).index_url == (
        "https://pypi.org/simple"
    )
    # the spec's own index wins, and changes the hash
    a = envs.resolve(EnvironmentSpec(("six",)), {**base, "MLBRIDGE_CACHE_DIR": str(tmp_path)})
    b = envs.resolve(
        EnvironmentSpec(("six",), index_url="https://x.example/simple"),
        {**base, "MLBRIDGE_CACHE_DIR": str(tmp_path)},
    )
    assert b.index.index_url == "https://x.example/simple" and b.index.extra_index_urls == ()
    assert a.key != b.key and a.path.parent == b.path.parent == tmp_path / "envs"


def test_cache_root_honours_overrides(tmp_path: Path) -> None:
    assert envs.cache_root({"MLBRIDGE_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert envs.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mlbridge"
    assert envs.cache_root({}) == Path.home() / ".cache" / "mlbridge"


def test_a_held_build_lock_times_out_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    spec = EnvironmentSpec(("six==1.17.0",), constraints=("six<2",))
    monkeypatch.setenv("MLBRIDGE_CACHE_DIR", str(tmp_path))
    env = envs.resolve(spec)
    (tmp_path / "envs").mkdir()
    fd = os.open(tmp_path / "envs" / f"{env.key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another host" is building it
    try:
        with pytest.raises(envs.EnvironmentBuildError, match="held the build lock"):
            envs.build(spec, timeout=0.5)
    finally:
        os.close(fd)
    assert not env.built
    assert [p.name for p in (tmp_path / "envs").iterdir()] == [f"{env.key}.lock"]


def test_missing_uv_is_a_clear_error(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["uv"] = None  # as without the envs extra
        from mlbridge import _envs as envs
        from mlbridge.config import EnvironmentSpec
        try:
            envs.build(EnvironmentSpec(("six==1.17.0",)))
        except envs.EnvironmentBuildError as exc:
            print("ERROR", exc)
        """
    )
    env = {"PATH": str(tmp_path), "PYTHONPATH": SRC, "MLBRIDGE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "needs uv" in out.stdout and "pip install 'mlbridge[envs]'" in out.stdout


# --------------------------------------------------------------------------- real builds


@pytest.mark.envs
def test_two_pinned_versions_side_by_side_then_reused(cache: Path) -> None:
    progress: list[Any] = []
    with MLBridge(_two_bridges()) as mb:
        mb.add_hook(lambda e: progress.append(e) if e.kind == "progress" else None)
        old = mb.execute("six_old", "versions", {})
        new = mb.execute("six_new", "versions", {})
    assert old["six"] == old["six_dist"] == "1.16.0"
    assert new["six"] == new["six_dist"] == "1.17.0"
    assert old["prefix"] != new["prefix"]
    assert Path(old["prefix"]).parent == Path(new["prefix"]).parent == cache / "envs"
    assert {e.framework for e in progress} == {"six_old", "six_new"}
    assert any(e.step == e.total for e in progress) and all(e.total == 4 for e in progress)
    markers = _built_markers(cache)
    assert len(markers) == 2
    assert not [p for p in (cache / "envs").iterdir() if p.name.startswith(".")]

    # A second host start reuses both environments: no build step, markers untouched.
    again: list[Any] = []
    with MLBridge(_two_bridges()) as mb:
        mb.add_hook(lambda e: again.append(e) if e.kind == "progress" else None)
        assert mb.execute("six_old", "versions", {})["six"] == "1.16.0"
        assert mb.execute("six_new", "versions", {})["six"] == "1.17.0"
    assert again == []
    assert _built_markers(cache) == markers
    spec = _two_bridges().bridges["six_old"].environment
    assert spec is not None and envs.build(spec).built is False


@pytest.mark.envs
def test_required_packages_are_checked_in_the_bridges_own_interpreter(cache: Path) -> None:
    # The host's interpreter has idna (httpx needs it); the environment does not.
    assert subprocess.run([sys.executable, "-c", "import idna"], check=False).returncode == 0
    cfg = MLBridgeConfig.from_mapping(
        {"bridges": {"lacks": _bridge(["six==1.17.0"], required_packages=["six", "idna"])}}
    )
    with MLBridge(cfg) as mb, pytest.raises(EnvironmentCheckError) as info:
        mb.execute("lacks", "versions", {})
    text = str(info.value)
    assert "'idna' is not importable by" in text and str(cache / "envs") in text
    assert "'six'" not in text


@pytest.mark.envs
def test_failed_resolution_names_the_conflicting_requirement(cache: Path) -> None:
    cfg = MLBridgeConfig.from_mapping(
        {
            "bridges": {
                "clash": _bridge(["six==1.16.0"], environment={"constraints": ["six==1.17.0"]})
            }
        }
    )
    before = set((cache / "envs").iterdir()) if (cache / "envs").exists() else set()
    with MLBridge(cfg) as mb, pytest.raises(envs.EnvironmentBuildError) as info:
        mb.execute("clash", "versions", {})
    err = info.value
    assert "cannot be resolved" in str(err) and "'six==1.16.0'" in str(err)
    assert "'six==1.17.0'" in str(err) and "[bridges.clash.environment]" in str(err)
    assert err.details["conflicting"] == ["six==1.16.0", "six==1.17.0"]
    after = {p for p in (cache / "envs").iterdir() if not p.name.endswith(".lock")}
    assert after <= before  # nothing half-built left behind


_RACER = textwrap.dedent(
    """
    import json, sys
    from mlbridge import _envs as envs
    from mlbridge.config import EnvironmentSpec
    sys.stdin.readline()  # start together
    r = envs.build(EnvironmentSpec(("six==1.16.0", "idna==3.10")))
    print(json.dumps({"built": r.built, "python": r.env.python}))
    """
)


@pytest.mark.envs
def test_two_hosts_building_the_same_environment_at_once(cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outs) == [False, True]  # one built, one waited and reused
    assert outs[0]["python"] == outs[1]["python"]
    check = subprocess.run(
        [outs[0]["python"], "-c", "import six, idna; print(six.__version__, idna.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.split() == ["1.16.0", "3.10"]
    assert not [p for p in (cache / "envs").iterdir() if p.name.startswith(".build-")]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.envs
def test_cli_env_build_list_prune(cache: Path, tmp_path: Path) -> None:
    toml = tmp_path / "mlbridge.toml"
    toml.write_text(
        textwrap.dedent(
            f"""
            [bridges.six_new]
            python_script = "{BRIDGE}"
            [bridges.six_new.environment]
            packages = ["six==1.17.0"]
            [bridges.plain]
            python_module = "echo"
            """
        )
    )
    code, out, err = _cli("env", "build", "--json", "--config", str(toml))
    assert code == 0, err
    doc = json.loads(out)
    (row,) = doc["environments"]
    assert row["bridge"] == "six_new" and row["packages"] == ["six==1.17.0"]
    assert Path(row["python"]).is_file()

    code, _, err = _cli("env", "build", "six_new", "--rebuild", "--config", str(toml))
    assert code == 0 and "six_new [####################] 4/4" in err  # the progress bar
    assert "[##########----------] 2/4" in err

    code, out, _ = _cli("doctor", "--json", "--config", str(toml))
    doctor = json.loads(out)["bridges"]["six_new"]
    assert code == 0 and doctor["ok"] and doctor["python"] == row["python"]

    code, out, err = _cli("env", "build", "plain", "--config", str(toml))
    assert code == 3 and "declare no environment" in err

    code, out, _ = _cli("env", "list", "--json", "--config", str(toml))
    listed = {e["key"]: e for e in json.loads(out)["environments"]}
    assert listed[row["key"]]["bridges"] == ["six_new"]
    assert "six==1.17.0" in listed[row["key"]]["installed"]
    others = set(listed) - {row["key"]}

    code, out, _ = _cli("env", "list", "--config", str(toml))
    assert code == 0 and row["key"] in out and "six_new" in out

    # prune keeps what the config uses and removes the rest
    code, out, _ = _cli("env", "prune", "--json", "--config", str(toml))
    assert code == 0
    assert {r["key"] for r in json.loads(out)["removed"]} == others
    assert list(_built_markers(cache)) == [row["key"]]
    code, out, _ = _cli("env", "prune", "--all", "--config", str(toml))
    assert code == 0 and "removed 1 environment" in out
    assert _built_markers(cache) == {}
