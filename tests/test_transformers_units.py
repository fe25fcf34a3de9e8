"""In-process unit tests of the Transformers bridge helpers (no worker, no real model)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mlbridge.errors import InvalidRequestError, ModelError

pytestmark = pytest.mark.transformers
pytest.importorskip("transformers")

from mlbridge.bridges import _hf_generate as gen  # noqa: E402
from mlbridge.bridges import _hf_local as local  # noqa: E402
from mlbridge.bridges import _hf_models as models  # noqa: E402


def test_bridges_package_does_not_import_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, mlbridge.bridges, mlbridge.bridges.transformers; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_conversion_runs_once_under_concurrency(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "model-x"
    calls: list[int] = []
    results: list[bool] = []

    def convert(tmp: Path) -> None:
        calls.append(threading.get_ident())
        time.sleep(0.3)
        (tmp / "weights.bin").write_bytes(b"w" * 10)

    def worker() -> None:
        results.append(local.ensure_converted(target, convert))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(results) == [False, False, True]
    assert (target / "weights.bin").read_bytes() == b"w" * 10
    assert (target / local.COMPLETE_MARKER).is_file()
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_failed_conversion_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "model-y"

    def convert(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        local.ensure_converted(target, convert)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    # A later attempt converts from scratch.
    assert local.ensure_converted(target, lambda tmp: (tmp / "ok").write_text("1")) is True


@pytest.mark.parametrize(
    "exc",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 9 GB"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    ],
)
def test_out_of_memory_becomes_a_model_error_with_a_fix(exc: BaseException) -> None:
    with pytest.raises(ModelError, match="does not fit in memory") as info:
        with models.load_errors("big/model", "model", "cpu"):
            raise exc
    assert "big/model" in str(info.value)
    assert "smaller" in str(info.value)
    assert info.value.__cause__ is exc


def test_other_load_failures_name_the_model() -> None:
    with pytest.raises(ModelError, match="cannot load model '/x'"):
        with models.load_errors("/x", "model", "cpu"):
            raise OSError("no file named config.json")
    with pytest.raises(KeyboardInterrupt):
        with models.load_errors("/x", "model", "cpu"):
            raise KeyboardInterrupt


def test_parse_dtype() -> None:
    import torch

    assert models.parse_dtype("auto", "cpu") is torch.float32
    assert models.parse_dtype(None, "cpu") is torch.float32
    assert models.parse_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(InvalidRequestError, match="unknown dtype"):
        models.parse_dtype("float8", "cpu")


def test_gen_params() -> None:
    p = gen.gen_params({"max_tokens": 50, "max_completion_tokens": 7, "stop": "\n"})
    assert p.max_new_tokens == 7 and p.stop == ("\n",) and not p.sample
    assert gen.gen_params({}).max_new_tokens == gen.DEFAULT_MAX_TOKENS
    assert gen.gen_params({"temperature": 0.7, "seed": 3}).sample
    for bad in ({"max_tokens": 0}, {"max_tokens": 1.5}, {"temperature": -1}, {"stop": [1]}):
        with pytest.raises(InvalidRequestError):
            gen.gen_params(bad)


def test_stop_string_helpers() -> None:
    assert gen._find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert gen._find_stop("abc", ["x"]) == -1
    assert gen._held_back("hello wor", ["world"]) == 3
    assert gen._held_back("hello", ["world"]) == 0
    assert gen._held_back("a\n", ["\n\n", "xyz"]) == 1


def test_unknown_builtin_and_missing_path(tmp_path: Path) -> None:
    import torch

    store = models.ModelStore(cache_dir=tmp_path, device="cpu", dtype=torch.float32)
    with pytest.raises(ModelError, match="unknown built-in model 'local:nope'"):
        store.resolve("local:nope")
    with pytest.raises(ModelError, match="does not exist"):
        store.resolve(str(tmp_path / "missing"))
    assert store.resolve(str(tmp_path)) == str(tmp_path.resolve())
