"""A tiny language-model bridge with the Transformers bridge's /v1 contract (chat, embed,
list_models, model resources), for the gateway's fast tests; the real smollm2 runs in the slow
module. Replies are deterministic: "you said: <last user words>", one word per token; with
``temperature`` > 0 the words are shuffled by ``seed`` (same seed, same reply)."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Generator
from typing import Any

import numpy as np

from mlbridge.bridges.base import BaseBridge, ResourceType
from mlbridge.errors import InvalidRequestError, ModelError

_BUILTIN = {"tiny:chat": "chat", "tiny:embed": "embedding"}


class TinyLMBridge(BaseBridge):
    name = "tinylm"

    def _initialize_framework(self) -> None:
        self.token_delay = float(self.settings.get("token_delay", 0.0))

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "tinylm", "version": "1.0", "capabilities": ["chat", "embed"]}

    def _register_handlers(self) -> None:
        self.register_resource_type(
            ResourceType(
                "model",
                create=lambda config, state: {"prefix": str(config.get("prefix", "model says:"))},
                execute=lambda obj, inputs: {"prefix": obj["prefix"]},
            )
        )
        r = self.register_handler
        r("chat", self._chat)
        r("embed", self._embed)
        r("stream_then_fail", self._stream_then_fail)
        r(
            "list_models",
            lambda a: {
                "builtin": [{"id": k, "kind": v, "available": True} for k, v in _BUILTIN.items()]
            },
        )

    def _prefix(self, model: Any) -> str:
        if model == "tiny:chat":
            return "you said:"
        rec = self.resources.get(model) if isinstance(model, str) else None
        if rec is not None:
            return str(rec.obj["prefix"])
        raise ModelError(
            f"unknown model {model!r}; this bridge has tiny:chat, tiny:embed and its model "
            "resources"
        )

    def _chat(self, args: dict[str, Any]) -> Any:
        prefix = self._prefix(args.get("model"))
        messages = args.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' must be a non-empty list")
        last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1])
        content = last.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        words = [*prefix.split(), *str(content or "").split()]
        temperature = float(args.get("temperature") or 0)
        if temperature > 0:
            random.Random(args.get("seed")).shuffle(words)
        limit = args.get("max_completion_tokens") or args.get("max_tokens") or 64
        stops = args.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        prompt_tokens = sum(len(str(m.get("content") or "").split()) for m in messages)
        if self.call.stream:
            return self._stream(words, int(limit), stops, prompt_tokens)
        return self._run(words, int(limit), stops, prompt_tokens, lambda _: None)

    def _run(
        self, words: list[str], limit: int, stops: list[str], prompt_tokens: int, emit: Any
    ) -> dict[str, Any]:
        out: list[str] = []
        reason = "stop"
        for word in words:
            if len(out) >= limit:
                reason = "length"
                break
            if word in stops:
                break
            if self.token_delay:
                time.sleep(self.token_delay)
            out.append(word)
            emit(word)
        text = " ".join(out)
        return {
            "message": {"role": "assistant", "content": text},
            "text": text,
            "finish_reason": reason,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(out),
                "total_tokens": prompt_tokens + len(out),
            },
        }

    def _stream(
        self, words: list[str], limit: int, stops: list[str], prompt_tokens: int
    ) -> Generator[dict[str, Any], None, dict[str, Any]]:
        yield {"progress": {"stage": "ready"}}  # like the real bridge while a model loads
        pieces: list[str] = []
        result = self._run(words, limit, stops, prompt_tokens, pieces.append)
        for i, word in enumerate(pieces):
            if self.token_delay:
                time.sleep(self.token_delay)
            yield {"delta": word if i == 0 else " " + word}
        return result

    def _stream_then_fail(self, args: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        n = int(args.get("n", 1))
        for i in range(n):
            yield {"index": i}
        raise InvalidRequestError(f"failing after {n} chunks, on request")

    def _embed(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("model") not in (None, "tiny:embed"):
            raise ModelError(f"unknown embedding model {args.get('model')!r}; use tiny:embed")
        texts = args.get("texts")
        if not isinstance(texts, list):
            raise InvalidRequestError("'texts' must be a list of strings")
        rows = []
        for t in texts:
            digest = hashlib.sha256(str(t).encode()).digest()[:8]
            v = np.frombuffer(digest, dtype=np.uint8).astype(np.float32) + 1.0
            rows.append(v / np.linalg.norm(v))
        arr = np.stack(rows) if rows else np.zeros((0, 8), dtype=np.float32)
        return {
            "embeddings": arr.tolist() if args.get("as_list") else arr,
            "dims": 8,
            "count": len(texts),
        }
