"""A bridge under its own interpreter sees mlbridge, never the host's site-packages.

Built for real: a host venv with mlbridge installed from a wheel (not editable) plus a package
only the host has (``six``), and a second, bare venv for the bridge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib.util, sys
from mlbridge.bridges.base import BaseBridge

class Probe(BaseBridge):
    name = "probe"
    def _initialize_framework(self): pass
    def get_framework_info(self): return {"name": "probe", "version": "1"}
    def _register_handlers(self):
        self.register_handler("where", lambda a: {
            "path": sys.path,
            "six": importlib.util.find_spec("six") is not None,
            "mlbridge": __import__("mlbridge").__file__,
            "python": sys.executable,
        })
"""

HOST = """
import json, sys
from mlbridge import MLBridge
cfg = {"bridges": {"probe": {"python_script": sys.argv[1], "python": sys.argv[2], "pool_size": 1}}}
with MLBridge(cfg, env_overrides=False) as b:
    print("RESULT " + json.dumps(b.execute("probe", "where", {})))
"""


CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _pip(python: Path, *args: str) -> None:
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
        check=True,
        timeout=600,
        env=CLEAN_ENV,
    )


@pytest.mark.slow
def test_bridge_interpreter_gets_mlbridge_but_not_the_hosts_site_packages(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=600,
    )
    wheel = next(wheels.glob("mlbridge-*.whl"))
    host_env, bridge_env = tmp_path / "host", tmp_path / "bridge"
    venv.EnvBuilder(with_pip=True).create(host_env)
    venv.EnvBuilder(with_pip=True).create(bridge_env)
    host_py, bridge_py = host_env / "bin" / "python", bridge_env / "bin" / "python"
    _pip(host_py, str(wheel), "six")  # six: only the host has it
    _pip(bridge_py, "orjson", "msgpack", "psutil")  # what the worker runtime itself needs

    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(PROBE))
    env = dict(CLEAN_ENV)
    env["MLBRIDGE_RUNTIME_DIR"] = str(tmp_path / "run")
    out = subprocess.run(
        [str(host_py), "-c", HOST, str(script), str(bridge_py)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    seen = json.loads(line[len("RESULT ") :])

    host_site = subprocess.run(
        [str(host_py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert seen["python"].startswith(str(bridge_env))
    assert seen["six"] is False  # the host's packages do not shadow the bridge's own
    assert not any(p.startswith(host_site) for p in seen["path"]), seen["path"]
    # mlbridge itself is visible, through the one-package folder, and is the host's copy
    assert os.path.realpath(seen["mlbridge"]).startswith(os.path.realpath(host_site))
