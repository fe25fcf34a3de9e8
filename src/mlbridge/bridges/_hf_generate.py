"""Text generation for the Transformers bridge: prompts, stop strings, usage and streaming.

Theory of operation
-------------------
A :class:`Generation` is one ``generate``/``chat`` call. :meth:`Generation.run` calls
``model.generate`` on the caller's (main) thread. :meth:`Generation.stream` runs ``generate`` on a
short-lived thread that feeds a ``TextIteratorStreamer``; the caller's generator reads text pieces
from it and yields ``{"delta": text}`` chunks. The generator owns that thread: whatever way it
ends (finished, stop string seen, closed because the call was cancelled) it sets the stop flag and
joins the thread before returning, so no generation outlives its call.

Both paths pass a stopping criterion that reads two flags every decoding step: the call's cancel
event (set by the worker's control thread when a ``cancel`` arrives) and the generation's own stop
flag. A cancelled call therefore stops within one token and ends with ``CancelledCallError``.

Stop strings: ``generate`` stops on them (``stop_strings``); the text is cut before the earliest
one. While streaming, any tail that could be the start of a stop string is held back until the
next piece shows it is not, so a stop string is never streamed.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from ..errors import CancelledCallError, InvalidRequestError, ModelError
from ._hf_models import is_oom
from ._hf_stops import chat_result
from ._hf_stops import find_stop as _find_stop
from ._hf_stops import held_back as _held_back

__all__ = ["GenParams", "Generation", "gen_params", "prompt_from_messages"]

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True, slots=True)
class GenParams:
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repetition_penalty: float | None = None

    @property
    def sample(self) -> bool:
        return bool(self.temperature)


def _number(args: dict[str, Any], key: str, kind: type, *, minimum: float | None = None) -> Any:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{key!r} must be a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise InvalidRequestError(f"{key!r} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidRequestError(f"{key!r} must be >= {minimum}, got {value!r}")
    return kind(value)


def gen_params(args: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenParams:
    """Read OpenAI-style options; ``max_completion_tokens`` wins over ``max_tokens``."""
    max_tokens = _number(args, "max_completion_tokens", int, minimum=1)
    if max_tokens is None:
        max_tokens = _number(args, "max_tokens", int, minimum=1)
    if max_tokens is None:
        max_tokens = _number(args, "max_new_tokens", int, minimum=1)
    stop = args.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list | tuple) and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise InvalidRequestError(f"'stop' must be a string or a list of strings, got {stop!r}")
    return GenParams(
        max_new_tokens=max_tokens or default_max_tokens,
        temperature=_number(args, "temperature", float, minimum=0.0),
        top_p=_number(args, "top_p", float, minimum=0.0),
        top_k=_number(args, "top_k", int, minimum=0),
        stop=stops,
        seed=_number(args, "seed", int),
        repetition_penalty=_number(args, "repetition_penalty", float, minimum=0.0),
    )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise InvalidRequestError(
                    f"only text content parts are supported by this model, got {part!r}"
                )
        return "".join(parts)
    raise InvalidRequestError(f"message content must be a string, got {type(content).__name__}")


def prompt_from_messages(tokenizer: Any, messages: Any) -> str:
    """The model's chat template applied to ``messages`` (a plain transcript if it has none)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"each message needs a string 'role', got {m!r}")
        clean.append({"role": m["role"], "content": _content_text(m.get("content"))})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        return str(text)
    lines = [f"{m['role']}: {m['content']}" for m in clean]
    return "\n".join([*lines, "assistant:"])


@contextlib.contextmanager
def _generation_errors(model_name: str, device: str) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        if is_oom(exc):
            raise ModelError(
                f"generation with {model_name!r} ran out of memory on {device} "
                f"({type(exc).__name__}: {exc}). Fix: lower max_tokens, shorten the prompt, use "
                "a smaller dtype or model, or give the worker more memory.",
                model=model_name,
            ) from exc
        raise


class _StopFlags(StoppingCriteria):
    def __init__(self, *events: threading.Event) -> None:
        self.events = events

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class Generation:
    """One generation: ``run()`` for the whole answer, ``stream()`` for deltas then the answer."""

    def __init__(
        self,
        *,
        model: Any,
        tokenizer: Any,
        model_name: str,
        prompt: str,
        params: GenParams,
        cancel_event: threading.Event,
        chat: bool,
    ) -> None:
        if tokenizer is None:
            raise InvalidRequestError(
                f"model {model_name!r} has no tokenizer, so it cannot generate"
            )
        if not hasattr(model, "generate") or not getattr(model, "can_generate", lambda: True)():
            raise InvalidRequestError(
                f"model {model_name!r} ({type(model).__name__}) cannot generate text; use a "
                "causal language model such as local:smollm2 or a *ForCausalLM checkpoint"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.params = params
        self.cancel_event = cancel_event
        self.stop_event = threading.Event()
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
        self.input_ids = enc["input_ids"].to(model.device)
        self.attention_mask = enc["attention_mask"].to(model.device)
        self.prompt_tokens = int(self.input_ids.shape[1])
        self.max_new_tokens = self._fit_context(params.max_new_tokens)

    def _fit_context(self, wanted: int) -> int:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if not isinstance(limit, int):
            return wanted
        room = limit - self.prompt_tokens
        if room <= 0:
            raise InvalidRequestError(
                f"the prompt has {self.prompt_tokens} tokens but model {self.model_name!r} has a "
                f"context of {limit}; shorten the messages"
            )
        return min(wanted, room)

    def _kwargs(self) -> dict[str, Any]:
        p = self.params
        config = copy.deepcopy(self.model.generation_config)
        config.max_new_tokens = self.max_new_tokens
        config.max_length = None
        config.do_sample = p.sample
        if p.sample:
            config.temperature = p.temperature
            if p.top_p is not None:
                config.top_p = p.top_p
            if p.top_k is not None:
                config.top_k = p.top_k
        else:  # greedy: clear sampling knobs so generate does not warn they are unused
            config.temperature = None
            config.top_p = None
            config.top_k = None
        if p.repetition_penalty is not None:
            config.repetition_penalty = p.repetition_penalty
        if config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "generation_config": config,
            "stopping_criteria": StoppingCriteriaList(
                [_StopFlags(self.cancel_event, self.stop_event)]
            ),
        }
        if p.stop:
            kwargs["stop_strings"] = list(p.stop)
            kwargs["tokenizer"] = self.tokenizer
        if p.seed is not None:
            torch.manual_seed(p.seed)
        return kwargs

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in eos} if isinstance(eos, list | tuple) else {int(eos)}

    def _check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise CancelledCallError(f"generation with {self.model_name!r} was cancelled")

    def _result(self, output: Any, text: str, stopped: bool, t0: float) -> dict[str, Any]:
        ids = output[0, self.prompt_tokens :].tolist()
        pad = self.model.generation_config.pad_token_id
        eos = self._eos_ids()
        while ids and ids[-1] == pad and pad not in eos:
            ids.pop()
        n = len(ids)
        if stopped or (ids and ids[-1] in eos):
            reason = "stop"
        elif n >= self.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        seconds = time.perf_counter() - t0
        return chat_result(self.model_name, text, reason, self.prompt_tokens, n, seconds)

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        with _generation_errors(self.model_name, str(self.model.device)):
            with torch.inference_mode():
                output = self.model.generate(**self._kwargs())
        self._check_cancelled()
        ids = output[0, self.prompt_tokens :]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = _find_stop(text, self.params.stop)
        if cut >= 0:
            text = text[:cut]
        return self._result(output, text, cut >= 0, t0)

    def stream(self) -> Generator[dict[str, Any], None, dict[str, Any]]:
        t0 = time.perf_counter()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        holder: dict[str, Any] = {}
        kwargs = self._kwargs()

        def target() -> None:
            try:
                with torch.inference_mode():
                    holder["output"] = self.model.generate(**kwargs, streamer=streamer)
            except BaseException as exc:
                holder["error"] = exc
                streamer.on_finalized_text("", stream_end=True)

        thread = threading.Thread(target=target, name="mlbridge-generate", daemon=True)
        stops = self.params.stop
        emitted: list[str] = []
        pending = ""
        stopped = False
        thread.start()
        try:
            for piece in streamer:
                if not piece:
                    continue
                pending += piece
                cut = _find_stop(pending, stops) if stops else -1
                if cut >= 0:
                    pending, stopped = pending[:cut], True
                    break
                keep = _held_back(pending, stops) if stops else 0
                delta, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if delta:
                    emitted.append(delta)
                    yield {"delta": delta}
            if pending:
                emitted.append(pending)
                yield {"delta": pending}
        finally:
            self.stop_event.set()  # ends generate at the next step if we left early
            thread.join()
        error = holder.get("error")
        if error is not None:
            with _generation_errors(self.model_name, str(self.model.device)):
                raise error
        self._check_cancelled()
        if "output" not in holder:
            raise ModelError(f"generation with {self.model_name!r} ended without output")
        return self._result(holder["output"], "".join(emitted), stopped, t0)
