"""``mlbridge doctor`` imports each bridge in its own interpreter; ``list``/``doctor`` show only
bridges that ship (issue 10, defects 1 and 6).

Every bridge here is a real module or script on disk, imported by a real probe process; the
runtime side boots real workers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from mlbridge import cli
from mlbridge._builtin_bridges import BUILTIN_BRIDGES
from mlbridge._host import extras
from mlbridge._host.builtins import builtin_module, module_importable


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in list(os.environ):
        if var.startswith("MLBRIDGE_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


BROKEN_MODULE = """\
import os


def _load_the_backend():
    import mlbridge_test_surely_missing_dependency  # noqa: F401


_load_the_backend()
"""


def _module_config(tmp_path: Path, module_text: str, target: str = "brokenmod:Broken") -> str:
    (tmp_path / "brokenmod.py").write_text(module_text)
    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text(
        '[bridges.echo]\npython_module = "echo"\n\n'
        f'[bridges.broken]\npython_module = "{target}"\n'
        f'[bridges.broken.env]\nPYTHONPATH = "{tmp_path}"\n'
        "[bridges.broken.options]\nmax_boot_failures = 1\n"
    )
    return str(cfg)


def test_doctor_reports_an_unimportable_module_with_its_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # find_spec finds brokenmod; only importing it shows the missing dependency.
    cfg = _module_config(tmp_path, BROKEN_MODULE)
    code, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert code == 1
    doc = json.loads(out)
    assert doc["healthy"] is False
    assert doc["bridges"]["echo"]["ok"] is True
    (problem,) = doc["bridges"]["broken"]["problems"]
    assert problem["kind"] == "import"
    assert "mlbridge_test_surely_missing_dependency" in problem["message"]
    assert "ModuleNotFoundError" in problem["message"]
    tb = problem["traceback"]
    assert "brokenmod.py" in tb and "_load_the_backend" in tb  # where it failed
    assert tb.rstrip().splitlines()[-1].startswith("ModuleNotFoundError")
    assert "<frozen importlib" not in tb

    code, out, _ = run(capsys, "doctor", "--config", cfg)
    assert code == 1
    assert "FAIL broken" in out
    assert "traceback (last lines):" in out
    assert "brokenmod.py" in out
    assert "1 problem found" in out


def test_doctor_reports_a_script_that_raises_and_a_missing_class(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    script = tmp_path / "raising_bridge.py"
    script.write_text('raise RuntimeError("no licence server reachable")\n')
    (tmp_path / "plainmod.py").write_text("VALUE = 1\n")
    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text(
        f'[bridges.script]\npython_script = "{script}"\n\n'
        '[bridges.noclass]\npython_module = "plainmod:Missing"\n'
        f'[bridges.noclass.env]\nPYTHONPATH = "{tmp_path}"\n'
    )
    code, out, _ = run(capsys, "doctor", "--json", "--config", str(cfg))
    assert code == 1
    doc = json.loads(out)
    (p,) = doc["bridges"]["script"]["problems"]
    assert p["kind"] == "import"
    assert "RuntimeError: no licence server reachable" in p["message"]
    assert "raising_bridge.py" in p["traceback"]
    (p,) = doc["bridges"]["noclass"]["problems"]
    assert p["kind"] == "import"
    assert "'Missing' is not a BaseBridge subclass" in p["message"]


def test_doctor_import_probe_times_out_and_leaves_nothing_behind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "probe.pid"
    hanging = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)\n"
    )
    cfg = _module_config(tmp_path, hanging)
    t0 = time.monotonic()
    code, out, _ = run(capsys, "doctor", "--json", "--timeout", "3", "--config", cfg)
    assert time.monotonic() - t0 < 60
    assert code == 1
    (p,) = json.loads(out)["bridges"]["broken"]["problems"]
    assert p["kind"] == "import"
    assert "did not finish within 3s" in p["message"]
    pids = [int(x) for x in pidfile.read_text().split()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(pid) for pid in pids):
        time.sleep(0.05)
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    assert not alive, f"the probe (and what it started) must be killed: {alive}"


def test_runtime_error_for_an_unimportable_bridge_names_the_cause(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The run-time error carries the import error itself (no circle back to doctor), and
    doctor, which it mentions, really shows that error."""
    cfg = _module_config(tmp_path, BROKEN_MODULE)
    code, _, err = run(capsys, "call", "broken", "ping", "--config", cfg)
    assert code == 8
    assert "mlbridge_test_surely_missing_dependency" in err
    assert "Fix:" in err
    assert "to find why its workers do not boot" not in err
    code, out, _ = run(capsys, "doctor", "--config", cfg)
    assert code == 1 and "mlbridge_test_surely_missing_dependency" in out


def test_doctor_healthy_bridge_is_imported_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    marker = tmp_path / "imported"
    module = (
        "from mlbridge import BaseBridge\n"
        f"open({str(marker)!r}, 'w').write('yes')\n"
        "class Fine(BaseBridge):\n"
        "    name = 'fine'\n"
        "    def _register_handlers(self):\n"
        "        pass\n"
    )
    cfg = _module_config(tmp_path, module, target="brokenmod:Fine")
    code, out, _ = run(capsys, "doctor", "--json", "--config", cfg)
    assert code == 0, out
    assert json.loads(out)["healthy"] is True
    assert marker.read_text() == "yes"  # the probe really imported it


# --------------------------------------------------------------------------- defect 6


def _shipped() -> list[str]:
    return [n for n in BUILTIN_BRIDGES if module_importable(builtin_module(n))]


def test_list_shows_only_builtins_that_ship_with_their_extra(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "mlbridge.toml"
    cfg.write_text('[bridges.mine]\npython_module = "echo"\n')
    # A built-in name whose bridge module this mlbridge does not have must not be offered.
    fake = {**BUILTIN_BRIDGES, "ghostframework": "mlbridge.bridges.ghostframework:Ghost"}
    monkeypatch.setattr(extras, "BUILTIN_BRIDGES", fake)
    code, out, _ = run(capsys, "list", "--json", "--config", str(cfg))
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["bridges"]}
    assert "ghostframework" not in rows
    # 'mine' runs the echo built-in, so echo is not offered a second time.
    assert set(rows) == {"mine", *(n for n in _shipped() if n != "echo")}
    for name in _shipped():
        if name == "echo":
            continue
        assert rows[name]["builtin"] is True
        assert rows[name]["extra"] == name  # the mlbridge[<name>] extra installs its packages

    code, out, _ = run(capsys, "doctor", "--json", "--config", str(cfg))
    assert code == 0
    others = json.loads(out)["other_builtins"]
    assert "ghostframework" not in others
    assert set(others) == {n for n in _shipped() if n != "echo"}
    assert others["dspy"]["install"].endswith("pip install 'mlbridge[dspy]'")


def test_install_hint_uses_the_extra_of_the_installed_distribution() -> None:
    assert extras.builtin_extra("transformers") == "transformers"
    assert extras.builtin_extra("echo") is None  # no extra: nothing to install
    assert extras.install_hint("dspy", "/venv/bin/python") == (
        "/venv/bin/python -m pip install 'mlbridge[dspy]'"
    )
    assert extras.install_hint("echo") == "nothing to install"
