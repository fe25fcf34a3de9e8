"""The llama.cpp runtime of the Transformers bridge: GGUF chat models, several times faster on CPU.

Theory of operation
-------------------
The bridge setting ``runtime`` (``"auto"``, ``"transformers"`` or ``"llama_cpp"``, alias
``"llama.cpp"``) picks who generates text for a model that has a GGUF source (``local:smollm2``,
or a ``*.gguf`` path the caller names). :class:`LlamaRuntime` is made once per worker at boot
when the setting allows llama.cpp and ``llama_cpp`` imports (``auto`` without it falls back to
Transformers; ``llama_cpp`` without it fails the boot, naming the install command).

Models load through the worker's :class:`~._hf_models.ModelStore` (key ``("llama_cpp", path)``),
so ``list_models``, ``unload_model`` and ``model_ttl`` treat them like any other model. A
``Llama`` object is used by one call at a time: calls run on the worker's main thread, one after
another, and a stream's tokens are produced inside the stream's own generator on that thread (no
helper thread). The ``model_ttl`` sweep only drops the store's reference; a running call keeps
its own until it returns. At load the chat template's fixed opening (the default system prompt)
is evaluated once; ``Llama.generate`` reuses the longest prefix already in the KV cache, so a
chat's first token waits only for its new tokens.

A :class:`LlamaGeneration` has the same contract as the Transformers one (:mod:`._hf_generate`):
the prompt is the model's chat template rendered the way Transformers renders it, greedy unless
``temperature`` > 0, ``stop`` strings cut the text before the earliest one and are never streamed
(the same held-back tail), cancel is checked before every token, and the result has the same
shape with real token counts (the end-of-turn token counts as a completion token, as it does
there).
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CancelledCallError, InvalidConfigurationError, InvalidRequestError
from ._hf_local import BUILTIN_MODELS
from ._hf_stops import chat_result, find_stop, held_back

if TYPE_CHECKING:
    from ._hf_generate import GenParams

__all__ = [
    "INSTALL_HINT",
    "RUNTIMES",
    "LlamaGeneration",
    "LlamaModel",
    "LlamaRuntime",
    "LlamaTokenizer",
    "fast_runtime",
    "gguf_source",
    "import_llama_cpp",
    "parse_runtime",
]

logger = logging.getLogger("mlbridge.bridge.transformers")

RUNTIMES = ("auto", "transformers", "llama_cpp")
_ALIASES = {"llama.cpp": "llama_cpp"}
INSTALL_HINT = (
    "install it with `make venv` (its fast-LM step, tools/fast_lm.sh, builds the wheel once "
    "into ~/.cache/mlbridge/wheels), or by hand: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
    "--no-cache-dir llama-cpp-python==0.3.36"
)
DEFAULT_CONTEXT = 8192


def parse_runtime(raw: Any) -> str:
    """The ``runtime`` setting, canonical (``"llama.cpp"`` -> ``"llama_cpp"``)."""
    value = "auto" if raw is None else raw
    if isinstance(value, str):
        value = _ALIASES.get(value.strip().lower(), value.strip().lower())
        if value in RUNTIMES:
            return str(value)
    raise InvalidConfigurationError(
        f"setting 'runtime' must be one of {', '.join(repr(r) for r in RUNTIMES)} "
        f"(or 'llama.cpp'), got {raw!r}. Fix: 'auto' uses llama.cpp for GGUF models when it is "
        "installed and Transformers otherwise"
    )


def import_llama_cpp() -> tuple[Any, str | None]:
    """``(llama_cpp module, None)``, or ``(None, why it does not import)``."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: its shared library did not load
        return None, f"{type(exc).__name__}: {exc}"
    return llama_cpp, None


def fast_runtime(
    runtime: str, settings: Mapping[str, Any], threads: int | None
) -> LlamaRuntime | None:
    """The llama.cpp runtime when the ``runtime`` setting allows it and it imports (a boot
    error when the setting asks for it and it does not)."""
    if runtime == "transformers":
        return None
    module, why = import_llama_cpp()
    if module is None:
        if runtime == "llama_cpp":
            raise InvalidConfigurationError(
                f"setting runtime='llama_cpp' but llama-cpp-python does not import in this "
                f"worker ({why}). Fix: {INSTALL_HINT}; or set runtime='auto' to fall back to "
                "Transformers"
            )
        logger.info("llama.cpp is not available (%s): runtime 'auto' uses Transformers", why)
        return None
    ctx = settings.get("context_length")
    if ctx is not None and (isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 16):
        raise InvalidConfigurationError(
            f"setting 'context_length' must be an integer >= 16 (tokens), got {ctx!r}"
        )
    return LlamaRuntime(module, threads=threads, context_length=ctx)


def gguf_source(ref: str) -> Path | None:
    """The GGUF file behind ``ref`` (a built-in GGUF model or a ``*.gguf`` path), or None."""
    builtin = BUILTIN_MODELS.get(ref)
    if builtin is not None:
        src = builtin.source()
        return src if src is not None and src.suffix == ".gguf" else None
    if ref.startswith("local:") or not ref.endswith(".gguf"):
        return None
    path = Path(ref).expanduser()
    return path.resolve() if path.is_file() else None


class _Template:
    """The GGUF's chat template, rendered as Transformers renders it (same Jinja options): the
    ``tokenizer`` that :func:`~._hf_generate.prompt_from_messages` takes."""

    def __init__(self, formatter: Any) -> None:
        self._formatter = formatter
        self.chat_template = "gguf" if formatter is not None else None

    def apply_chat_template(
        self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool
    ) -> str:
        return str(self._formatter(messages=messages).prompt)


class LlamaTokenizer:
    """llama.cpp's tokenizer with the three methods the bridge's ``tokenize``/``detokenize``
    call on a Transformers tokenizer (same vocabulary; special tokens in text are parsed)."""

    def __init__(self, llama: Any) -> None:
        self._llama = llama

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self._llama.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        return {"input_ids": list(ids)}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        model = self._llama._model
        return [str(model.token_get_text(i)) for i in ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raw = self._llama.detokenize(ids, special=not skip_special_tokens)
        return bytes(raw).decode("utf-8", errors="replace")


@dataclass(slots=True)
class LlamaModel:
    """A GGUF model loaded by llama.cpp (the store's entry for it)."""

    ref: str
    path: str
    llama: Any
    template: _Template
    load_time_s: float
    threads: int
    is_eog: Callable[[int], bool]

    def generation(
        self,
        params: GenParams,
        args: dict[str, Any],
        chat: bool,
        ref: str,
        cancel_event: threading.Event,
    ) -> LlamaGeneration:
        """A ``chat`` (messages through the chat template) or ``generate`` (a raw ``prompt``,
        or ``messages``) call, as the Transformers path reads them."""
        from ._hf_generate import prompt_from_messages

        prompt: Any = args.get("prompt")
        if chat or args.get("messages") is not None:
            prompt = prompt_from_messages(self.template, args.get("messages"))
            chat = True
        elif not isinstance(prompt, str):
            raise InvalidRequestError("generate needs 'prompt' (a string) or 'messages'")
        return LlamaGeneration(
            model=self,
            model_name=ref,
            prompt=prompt,
            params=params,
            cancel_event=cancel_event,
            chat=chat,
        )

    @property
    def tokenizer(self) -> LlamaTokenizer:
        return LlamaTokenizer(self.llama)

    def describe(self) -> dict[str, Any]:
        meta = self.llama.metadata
        return {
            "model": self.ref,
            "path": self.path,
            "runtime": "llama_cpp",
            "architecture": str(meta.get("general.architecture", "")),
            "description": self.llama._model.desc(),
            "device": "cpu",
            "parameters": int(self.llama._model.n_params()),
            "context_length": int(self.llama.n_ctx()),
            "threads": self.threads,
            "load_time_s": round(self.load_time_s, 3),
        }


class LlamaRuntime:
    """Loads GGUF models with llama.cpp and makes generations; one per worker."""

    name = "llama_cpp"

    def __init__(self, module: Any, *, threads: int | None, context_length: int | None) -> None:
        self.module = module
        self.version = str(getattr(module, "__version__", "?"))
        self.threads = threads or len(os.sched_getaffinity(0)) or 1
        self.context_length = context_length or DEFAULT_CONTEXT

    def load(self, ref: str, src: Path) -> LlamaModel:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        t0 = time.perf_counter()
        llama = self.module.Llama(
            model_path=str(src),
            n_ctx=self.context_length,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        template = llama.metadata.get("tokenizer.chat_template")
        formatter = None
        if template:
            model = llama._model

            def text(tok: int) -> str:
                return str(model.token_get_text(tok)) if tok != -1 else ""

            formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=text(llama.token_eos()),
                bos_token=text(llama.token_bos()),
            )
        if formatter is not None:
            _warm_prefix(llama, formatter)
        vocab = llama._model.vocab
        lib = self.module
        return LlamaModel(
            ref,
            str(src),
            llama,
            _Template(formatter),
            time.perf_counter() - t0,
            self.threads,
            lambda tok: bool(lib.llama_vocab_is_eog(vocab, tok)),
        )


def _warm_prefix(llama: Any, formatter: Any) -> None:
    """Evaluate the chat template's fixed opening (SmolLM2's default system prompt, ~30 tokens)
    once at load: ``generate`` reuses the longest cached prefix, so the first token of a chat
    without its own system message waits only for the new tokens."""
    marker = "\x00mlbridge\x00"
    try:  # an optimisation only: a template that cannot render this alone is not an error here
        text = str(formatter(messages=[{"role": "user", "content": marker}]).prompt)
    except Exception as exc:
        logger.info("chat template prefix not pre-evaluated: %s: %s", type(exc).__name__, exc)
        return
    prefix = text[: text.find(marker)] if marker in text else ""
    if prefix:
        llama.eval(llama.tokenize(prefix.encode("utf-8"), add_bos=False, special=True))


class LlamaGeneration:
    """One generation on llama.cpp: ``run()`` for the answer, ``stream()`` for deltas then it."""

    def __init__(
        self,
        *,
        model: LlamaModel,
        model_name: str,
        prompt: str,
        params: GenParams,
        cancel_event: threading.Event,
        chat: bool,
    ) -> None:
        self.model = model
        self.llama = model.llama
        self.model_name = model_name
        self.params = params
        self.cancel_event = cancel_event
        # A chat prompt already holds its special tokens; a raw one gets BOS if the model adds it
        # (as Transformers' add_special_tokens does).
        self.tokens: list[int] = self.llama.tokenize(
            prompt.encode("utf-8"), add_bos=not chat, special=True
        )
        self.prompt_tokens = len(self.tokens)
        room = int(self.llama.n_ctx()) - self.prompt_tokens
        if room <= 0:
            raise InvalidRequestError(
                f"the prompt has {self.prompt_tokens} tokens but model {model_name!r} has a "
                f"context of {self.llama.n_ctx()}; shorten the messages"
            )
        self.max_new_tokens = min(params.max_new_tokens, room)
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.stopped = False

    def _sampling(self) -> dict[str, Any]:
        p = self.params
        kwargs: dict[str, Any] = {"repeat_penalty": p.repetition_penalty or 1.0}
        if not p.sample:
            return {**kwargs, "temp": 0.0}
        seed = p.seed if p.seed is not None else random.randrange(2**31)
        self.llama.set_seed(seed)
        # Transformers' sampling: top_k 50 unless given, no min_p, top_p 1.0 unless given
        return {
            **kwargs,
            "temp": float(p.temperature or 0.0),
            "top_k": p.top_k if p.top_k is not None else 50,
            "top_p": p.top_p if p.top_p is not None else 1.0,
            "min_p": 0.0,
        }

    def _pieces(self) -> Generator[str, None, None]:
        """Text of each new token (UTF-8 sequences split across tokens are joined); sets
        ``completion_tokens`` and ``finish_reason``; stops before a token once cancelled."""
        llama, is_eog = self.llama, self.model.is_eog
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens = llama.generate(self.tokens, **self._sampling())
        try:
            for token in tokens:
                if self.cancel_event.is_set():
                    raise CancelledCallError(f"generation with {self.model_name!r} was cancelled")
                self.completion_tokens += 1
                if is_eog(token):
                    self.finish_reason = "stop"
                    break
                piece = decoder.decode(llama.detokenize([token], special=False))
                if piece:
                    yield piece
                if self.completion_tokens >= self.max_new_tokens:
                    break
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            tokens.close()

    def _deltas(self) -> Generator[str, None, None]:
        """The streamable text: a tail that could start a stop string is held back until the
        next piece shows it is not; sets ``stopped`` when a stop string ended the text."""
        stops = self.params.stop
        pending = ""
        pieces = self._pieces()
        try:
            for piece in pieces:
                pending += piece
                cut = find_stop(pending, stops) if stops else -1
                if cut >= 0:
                    pending, self.stopped = pending[:cut], True
                    break
                keep = held_back(pending, stops) if stops else 0
                delta, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if delta:
                    yield delta
            if pending:
                yield pending
        finally:
            pieces.close()

    def _result(self, text: str, t0: float) -> dict[str, Any]:
        n = self.completion_tokens
        reason = "stop" if self.stopped else self.finish_reason
        seconds = time.perf_counter() - t0
        return chat_result(self.model_name, text, reason, self.prompt_tokens, n, seconds)

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        text = "".join(self._deltas())
        return self._result(text, t0)

    def stream(self) -> Generator[dict[str, Any], None, dict[str, Any]]:
        t0 = time.perf_counter()
        out: list[str] = []
        deltas = self._deltas()  # produced on this (the caller's) thread as chunks are pulled
        try:
            for delta in deltas:
                out.append(delta)
                yield {"delta": delta}
        finally:
            deltas.close()
        return self._result("".join(out), t0)
