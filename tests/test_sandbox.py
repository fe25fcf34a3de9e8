"""The ``sandbox`` bridge (issue 16): untrusted snippets and functions through a real worker.

Escape attempts (imports of os/sys/subprocess, ``__subclasses__`` walks, ``__globals__`` and
``__builtins__``, frame and generator tricks, format-string attribute access, ``open``, the
network, the host's environment, writing outside the working directory...) must each be refused
by the RestrictedPython layer or contained by the process around it, with the host alive. The
process layer is checked from outside too: the worker's user, namespaces and environment.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbridge import errors
from mlbridge._api import MLBridge
from mlbridge._backends import isolation
from mlbridge.config import BridgeConfig, BridgeOptions, MLBridgeConfig

pytestmark = pytest.mark.sandbox
pytest.importorskip("RestrictedPython")
CAPS = isolation.probe()
SECRET = "sandbox-test-secret-4b1d"


@pytest.fixture(scope="module")
def bridge() -> Iterator[MLBridge]:
    os.environ["SANDBOX_TEST_SECRET"] = SECRET
    try:
        opts = BridgeOptions(timeout=20.0, startup_timeout=60.0, health_check_interval=0.5)
        cfg = MLBridgeConfig(bridges={"sandbox": BridgeConfig("sandbox", options=opts)})
        with MLBridge(cfg) as b:
            yield b
    finally:
        del os.environ["SANDBOX_TEST_SECRET"]


def run(b: MLBridge, code: str, **kw: Any) -> Any:
    return b.execute("sandbox", "run", {"code": code, **kw})


def worker_pid(b: MLBridge) -> int:
    run(b, "result = 1")
    workers = b.statistics()["pools"]["sandbox"]["workers"]
    return int(workers[0]["pid"])


# --------------------------------------------------------------------------- what works


def test_snippet_runs_with_inputs_allowed_imports_and_print(bridge: MLBridge) -> None:
    got = run(
        bridge,
        "import math\nimport json\nprint('n =', n)\nresult = json.dumps([math.sqrt(n), n * 2])",
        inputs={"n": 16},
    )
    assert got == {"result": "[4.0, 32]", "printed": "n = 16\n"}


def test_ordinary_code_works_classes_comprehensions_exceptions(bridge: MLBridge) -> None:
    code = (
        "import collections\n"
        "class Point:\n"
        "    def __init__(self, x, y):\n"
        "        self.x = x\n"
        "        self.y = y\n"
        "    def norm2(self):\n"
        "        return self.x ** 2 + self.y ** 2\n"
        "p = Point(3, 4)\n"
        "counts = collections.Counter('abracadabra')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError as e:\n"
        "    err = str(e)\n"
        "total = 0\n"
        "for a, b in [(1, 2), (3, 4)]:\n"
        "    total += a * b\n"
        "result = [p.norm2(), counts.most_common(1)[0][0], err, total, sorted({3, 1, 2})]\n"
    )
    got = run(bridge, code)["result"]
    assert got == [25, "a", "division by zero", 14, [1, 2, 3]]


def test_function_resource_is_compiled_once_and_called_many_times(bridge: MLBridge) -> None:
    code = "def score(text, bonus=0):\n    return len(text.split()) + bonus\n"
    rid = bridge.create_resource("sandbox", "function", {"code": code})
    assert bridge.execute_resource("sandbox", rid, {"args": ["a b c"]}) == 3
    assert bridge.execute_resource("sandbox", rid, {"args": ["a"], "kwargs": {"bonus": 5}}) == 6
    # inputs without args / kwargs are the keyword arguments themselves
    assert bridge.execute_resource("sandbox", rid, {"text": "a b", "bonus": 1}) == 3
    listed = [r for r in bridge.list_resources("sandbox") if r["resource_id"] == rid]
    assert len(listed) == 1 and listed[0]["type"] == "function"
    with pytest.raises(errors.InvalidRequestError) as caught:
        bridge.create_resource("sandbox", "function", {"code": "def a(): pass\ndef b(): pass\n"})
    assert "exactly one function" in str(caught.value) and "pass 'name'" in str(caught.value)


def test_get_info_reports_the_limits_and_isolation_on_by_default(bridge: MLBridge) -> None:
    info = bridge.execute("sandbox", "get_info")["isolation"]
    limits = info["limits"]
    assert limits["network"] is False and limits["read_only"] is True
    assert limits["env_allowlist"] == [] and limits["private_tmp"] is True
    assert {"max_memory", "max_cpu", "max_processes", "max_open_files"} <= set(limits)
    for key in ("max_memory", "max_cpu", "max_processes", "max_open_files", "timeout"):
        assert key in info["mechanisms"]
    assert isinstance(info["not_applied"], dict)


# --------------------------------------------------------------------------- escapes

REFUSED = "REFUSED"  # an InvalidRequestError from the sandbox's policy, or a compile refusal
ESCAPES: list[tuple[str, str, str]] = [
    ("import os", "import os\nresult = os.getcwd()", "import of 'os' is not allowed"),
    ("import sys", "import sys\nresult = sys.modules", "import of 'sys' is not allowed"),
    ("import subprocess", "import subprocess", "import of 'subprocess' is not allowed"),
    ("from os import system", "from os import system", "import of 'os' is not allowed"),
    ("import ctypes", "import ctypes", "import of 'ctypes' is not allowed"),
    ("import importlib", "import importlib", "import of 'importlib' is not allowed"),
    ("import socket", "import socket\nsocket.create_connection(('1.1.1.1', 80))", "'socket'"),
    ("import urllib", "import urllib.request", "is not allowed"),
    ("submodule import", "import json.decoder", "import of 'json.decoder' is not allowed"),
    ("module via fromlist", "from json import codecs", "'codecs' is not allowed"),
    ("Formatter via fromlist", "from string import Formatter", "Formatter is not safe"),
    ("async generator frame", "async def f():\n    yield 1\nresult = f().ag_frame", "restricted"),
    ("module via attribute", "import json\nresult = json.codecs", "'codecs' is not allowed"),
    ("__import__ call", "m = __import__('os')", "starts with"),
    ("__subclasses__ walk", "result = ().__class__.__bases__[0].__subclasses__()", "starts with"),
    ("getattr __class__", "result = getattr((), '__class__')", "private name"),
    ("getattr default", "result = getattr(1, '__class__', None)", "private name"),
    ("__globals__", "def f():\n    pass\nresult = f.__globals__", "starts with"),
    ("getattr __globals__", "def f():\n    pass\nresult = getattr(f, '__globals__')", "private"),
    ("__builtins__", "result = __builtins__", "starts with"),
    ("globals()", "result = globals()", "name 'globals' is not defined"),
    ("vars()", "result = vars()", "name 'vars' is not defined"),
    ("generator gi_frame", "g = (x for x in [1])\nresult = g.gi_frame", "restricted name"),
    ("generator gi_code", "g = (x for x in [1])\nresult = g.gi_code", "restricted name"),
    (
        "traceback frame",
        "try:\n    1/0\nexcept Exception as e:\n    result = e.__traceback__.tb_frame",
        "starts with",
    ),
    ("lambda __code__", "result = (lambda: 0).__code__", "starts with"),
    ("bound __self__", "result = [].append.__self__", "starts with"),
    ("str.format attribute", "result = '{0.__class__}'.format(1)", "format"),
    ("str.format_map", "result = '{x.__class__}'.format_map({'x': 1})", "format"),
    ("string.Formatter", "import string\nresult = string.Formatter()", "Formatter"),
    ("f-string dunder", "result = f'{().__class__}'", "starts with"),
    ("open a file", "result = open('/etc/passwd').read()", "name 'open' is not defined"),
    ("write outside", "open('/tmp/escaped.txt', 'w').write('x')", "name 'open' is not defined"),
    ("exec", "exec('import os')", "Exec"),
    ("eval", "result = eval('1 + 1')", "Eval"),
    ("compile", "result = compile('1', 'x', 'eval')", "name 'compile' is not defined"),
    ("type()", "result = type(1)", "name 'type' is not defined"),
    ("private module attr", "import random\nresult = random._os", "starts with"),
    ("getattr private", "import random\nresult = getattr(random, '_os')", "private name"),
    ("dunder item", "result = {'__x__': 1}['__x__']", "private name"),
    ("environment", "import os\nresult = dict(os.environ)", "import of 'os' is not allowed"),
    ("write module attribute", "import math\nmath.pi = 3", "attribute-less object"),
    ("write class attribute", "class A:\n    pass\nA.x = 1", "attribute-less object"),
    ("write library object", "import random\nr = random.Random()\nr.x = 1", "attribute-less"),
    ("dunder input", "result = 1", "names may not start with _"),
    ("returns a module", "import math\nresult = math", "not plain data"),
]


@pytest.mark.parametrize(
    ("code", "fragment"), [(c, f) for _, c, f in ESCAPES], ids=[n for n, _, _ in ESCAPES]
)
def test_escape_attempt_is_refused(bridge: MLBridge, code: str, fragment: str) -> None:
    inputs = {"__x": 1} if fragment == "names may not start with _" else {}
    with pytest.raises(errors.MLBridgeError) as caught:
        run(bridge, code, inputs=inputs)
    assert fragment in str(caught.value)
    assert not Path("/tmp/escaped.txt").exists()


def test_at_least_thirty_escape_cases() -> None:
    assert len(ESCAPES) >= 30


def test_memory_bomb_is_contained_by_max_memory(bridge: MLBridge) -> None:
    before = worker_pid(bridge)
    with pytest.raises(errors.ResourceLimitError) as caught:
        run(bridge, "x = 'a' * (4 * 10**9)\nresult = len(x)")
    assert caught.value.details["limit"] == "max_memory"
    assert worker_pid(bridge) != before  # replaced


def test_busy_loop_is_contained_by_the_timeout(bridge: MLBridge) -> None:
    with pytest.raises(errors.CallTimeoutError):
        bridge.execute("sandbox", "run", {"code": "while True:\n    pass"}, timeout=2)
    assert run(bridge, "result = 2 + 2")["result"] == 4


def test_recursion_bomb_is_contained(bridge: MLBridge) -> None:
    with pytest.raises(errors.MLBridgeError) as caught:
        run(bridge, "def f(n):\n    return f(n + 1)\nresult = f(0)")
    assert "recursion" in str(caught.value)
    assert run(bridge, "result = 'alive'")["result"] == "alive"


def test_host_alive_and_pool_serving_after_the_escape_suite(bridge: MLBridge) -> None:
    assert run(bridge, "result = sum(range(10))")["result"] == 45
    assert bridge.statistics()["pools"]["sandbox"]["state"] == "ready"


# --------------------------------------------------------------------------- the process layer


def _status(pid: int, key: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(key)


@pytest.mark.skipif(os.geteuid() != 0, reason="the drop to nobody applies to a root host")
def test_worker_runs_as_nobody_not_root(bridge: MLBridge) -> None:
    pid = worker_pid(bridge)
    assert _status(pid, "Uid").split()[:2] == ["65534", "65534"]


@pytest.mark.skipif(not CAPS.netns, reason=str(CAPS.why_not.get("netns")))
def test_worker_has_its_own_network_namespace(bridge: MLBridge) -> None:
    pid = worker_pid(bridge)
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")


@pytest.mark.skipif(not CAPS.mountns, reason=str(CAPS.why_not.get("mountns")))
def test_worker_sees_a_read_only_file_system(bridge: MLBridge) -> None:
    pid = worker_pid(bridge)
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    mounts = Path(f"/proc/{pid}/mounts").read_text().splitlines()
    root = [m.split() for m in mounts if m.split()[1] == "/"]
    assert root and all("ro" in m[3].split(",") for m in root)


def test_worker_did_not_inherit_the_hosts_secrets(bridge: MLBridge) -> None:
    pid = worker_pid(bridge)
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert SECRET.encode() not in environ
    assert b"SANDBOX_TEST_SECRET" not in environ


def test_private_directory_is_removed_when_the_worker_exits() -> None:
    cfg = MLBridgeConfig(bridges={"sandbox": BridgeConfig("sandbox")})
    with MLBridge(cfg) as b:
        pid = worker_pid(b)
        cwd = os.readlink(f"/proc/{pid}/cwd")
        assert os.path.basename(cwd).startswith(f"mlbridge-tmp-{os.getpid()}-sandbox-")
        assert os.path.isdir(cwd)
    assert not os.path.exists(cwd)


# --------------------------------------------------------------------------- as a tool


def test_another_worker_calls_the_sandbox_through_the_host() -> None:
    cfg = MLBridgeConfig(
        bridges={
            "sandbox": BridgeConfig("sandbox"),
            "echo": BridgeConfig("echo", python_module="echo"),
        }
    )
    with MLBridge(cfg) as b:
        got = b.execute(
            "echo",
            "call_host",
            {"bridge": "sandbox", "command": "run", "args": {"code": "result = 6 * 7"}},
        )
    assert got["result"] == 42


@pytest.mark.dspy
def test_sandbox_as_a_dspy_tool() -> None:
    dspy = pytest.importorskip("dspy")
    cfg = MLBridgeConfig(bridges={"sandbox": BridgeConfig("sandbox")})
    with MLBridge(cfg) as b:

        def run_python(code: str) -> str:
            """Run Python code in the sandbox; set `result` to return a value."""
            try:
                out = b.execute("sandbox", "run", {"code": code})
            except errors.MLBridgeError as exc:
                return f"error: {exc}"
            return str(out["result"]) + out["printed"]

        tool = dspy.Tool(run_python, name="python", desc="Run untrusted Python safely")
        assert tool(code="result = 2 ** 10") == "1024"
        assert tool(code="import os").startswith("error: sandbox: import of 'os' is not allowed")


@pytest.mark.dspy
def test_a_dspy_react_program_in_its_worker_uses_the_sandbox_as_a_tool() -> None:
    pytest.importorskip("dspy")
    answers = [
        {
            "next_thought": "compute it",
            "next_tool_name": "run_python",
            "next_tool_args": {"code": "result = 6 * 7"},
        },
        {"next_thought": "done", "next_tool_name": "finish", "next_tool_args": {}},
        {"reasoning": "the sandbox said 42", "answer": "42"},
    ]
    cfg = MLBridgeConfig(
        bridges={
            "sandbox": BridgeConfig("sandbox"),
            "dspy": BridgeConfig("dspy", python_module="dspy", pool_size=1),
        }
    )
    with MLBridge(cfg) as b:
        rid = b.create_resource(
            "dspy",
            "program",
            {
                "signature": "question -> answer",
                "program_type": "react",
                "tools": ["mlbridge.bridges.sandbox_tool:run_python"],
                "lm": {"class": "dspy.utils.dummies:DummyLM", "kwargs": {"answers": answers}},
            },
        )
        out = b.execute_resource("dspy", rid, {"question": "What is 6 * 7?"})
    trajectory = out["outputs"]["trajectory"]
    assert trajectory["tool_name_0"] == "run_python"
    assert trajectory["observation_0"] == "42"  # computed in the sandbox's worker
    assert out["outputs"]["answer"] == "42"
