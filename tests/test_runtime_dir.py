"""The private runtime directory: where it is, what is refused, that nothing outside is touched."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlbridge._host.reaper import PidRegistry, WorkerRecord
from mlbridge._host.runtime_dir import ENV_VAR, RuntimeDirError, open_path, open_runtime_dir


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _victim(tmp_path: Path) -> dict[str, tuple[int, bytes | None]]:
    """Someone else's folder, with files the old reaper would have unlinked; its snapshot."""
    victim = tmp_path / "victim"
    (victim / "workers").mkdir(parents=True)
    rec = WorkerRecord(4242, 1, 4242, 999_999, 1, "a" * 32)
    (victim / "123").write_bytes(b"precious 1\n")
    (victim / "workers" / "456").write_bytes(b"999999 12345\n")
    (victim / "workers" / rec.filename).write_bytes(rec.encode())
    return _snapshot(victim)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry under ``root``: its mode and, for files, its content."""
    out: dict[str, tuple[int, bytes | None]] = {}
    for path in [root, *root.rglob("*")]:
        st = os.lstat(path)
        out[str(path)] = (st.st_mode, path.read_bytes() if stat.S_ISREG(st.st_mode) else None)
    return out


def _untouched(snapshot: dict[str, tuple[int, bytes | None]]) -> bool:
    root = Path(min(snapshot, key=len))
    return _snapshot(root) == snapshot


def test_xdg_runtime_dir_is_used_with_mode_0700(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    d = open_runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}, tempdir=str(tmp_path / "tmp"))
    assert d is not None
    try:
        assert d.path == str(xdg / "mlbridge")
        assert _mode(xdg / "mlbridge") == 0o700
        sub = d.subdir("workers")
        assert _mode(xdg / "mlbridge" / "workers") == 0o700
        sub.close()
    finally:
        d.close()


def test_without_xdg_a_per_user_dir_under_the_temp_dir(tmp_path: Path) -> None:
    d = open_runtime_dir({}, tempdir=str(tmp_path))
    assert d is not None
    try:
        assert d.path == str(tmp_path / f"mlbridge-{os.getuid()}")
        assert _mode(Path(d.path)) == 0o700
    finally:
        d.close()


def test_the_override_wins_over_xdg(tmp_path: Path) -> None:
    env = {ENV_VAR: str(tmp_path / "mine"), "XDG_RUNTIME_DIR": str(tmp_path)}
    d = open_runtime_dir(env, tempdir=str(tmp_path))
    assert d is not None
    assert d.path == str(tmp_path / "mine")
    d.close()


def test_a_planted_symlink_is_refused_and_nothing_outside_is_touched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _victim(tmp_path)
    planted = tmp_path / "rt"
    planted.symlink_to(tmp_path / "victim")
    caplog.set_level(logging.WARNING, "mlbridge.host")
    assert open_runtime_dir({ENV_VAR: str(planted)}) is None
    assert "symlink" in caplog.text and "orphan reaping is off" in caplog.text
    reg = PidRegistry(planted, exit_hooks=False)
    assert not reg.enabled
    reg.register(os.getpid())
    reg.unregister(os.getpid())
    assert reg.reap() == []
    reg.close()
    assert _untouched(files)
    assert planted.is_symlink()


def test_a_symlinked_subdirectory_is_refused(tmp_path: Path) -> None:
    files = _victim(tmp_path)
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    (rt / "workers").symlink_to(tmp_path / "victim" / "workers")
    d = open_runtime_dir({ENV_VAR: str(rt)})
    assert d is not None
    with pytest.raises(RuntimeDirError, match="symlink"):
        d.subdir("workers")
    d.close()
    assert _untouched(files)


def test_an_xdg_symlink_falls_back_to_the_temp_dir_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _victim(tmp_path)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    (xdg / "mlbridge").symlink_to(tmp_path / "victim")
    (tmp_path / "t").mkdir()
    caplog.set_level(logging.WARNING, "mlbridge.host")
    d = open_runtime_dir({"XDG_RUNTIME_DIR": str(xdg)}, tempdir=str(tmp_path / "t"))
    assert d is not None
    assert d.path == str(tmp_path / "t" / f"mlbridge-{os.getuid()}")
    d.close()
    assert "refusing runtime directory" in caplog.text and "trying" in caplog.text
    assert _untouched(files)


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    # As seen by another uid: the directory exists and is not theirs.
    with pytest.raises(RuntimeDirError, match="belongs to uid"):
        open_path(str(rt), uid=os.getuid() + 4242)


def test_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    rt.chmod(0o730)
    with pytest.raises(RuntimeDirError, match="writable by group or others"):
        open_path(str(rt))
    assert _mode(rt) == 0o730  # refused, not "fixed"


def test_a_readable_directory_of_ours_is_tightened_to_0700(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    rt.mkdir()
    rt.chmod(0o755)
    open_path(str(rt)).close()
    assert _mode(rt) == 0o700


def test_a_parent_others_can_write_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    with pytest.raises(RuntimeDirError, match="writable by others and not sticky"):
        open_path(str(parent / "rt"))
    assert not (parent / "rt").exists()
    parent.chmod(0o1777)  # like /tmp: others cannot rename or remove our entry
    open_path(str(parent / "rt")).close()
    assert _mode(parent / "rt") == 0o700


def test_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rt").write_text("x")
    with pytest.raises(RuntimeDirError):
        open_path(str(tmp_path / "rt"))


def test_a_host_start_on_a_planted_symlink_touches_nothing(tmp_path: Path) -> None:
    """Through a real host: MLBridge starts, serves, closes; the victim folder is unchanged."""
    files = _victim(tmp_path)
    planted = tmp_path / "rt"
    planted.symlink_to(tmp_path / "victim")
    code = textwrap.dedent(
        """
        from mlbridge import MLBridge
        from mlbridge.config import BridgeConfig, MLBridgeConfig
        cfg = MLBridgeConfig(bridges={"echo": BridgeConfig("echo", python_module="echo")})
        with MLBridge(cfg) as b:
            assert b.execute("echo", "echo", {"x": 1}) == {"x": 1}
        """
    )
    env = {**os.environ, ENV_VAR: str(planted)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert _untouched(files)
