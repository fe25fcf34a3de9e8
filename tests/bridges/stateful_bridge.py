"""A test bridge with bridge-wide state and a streaming resource type (used by host tests)."""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Any

from mlbridge.bridges.base import BaseBridge, ResourceType


class StatefulBridge(BaseBridge):
    name = "stateful"

    def _initialize_framework(self) -> None:
        self.applied: list[str] = []

    def get_framework_info(self) -> dict[str, Any]:
        return {"name": "stateful", "version": "1.0"}

    def apply_bridge_state(self, key: str, value: Any) -> None:
        if key == "model" and value == "refuse":
            raise ValueError("this worker refuses model 'refuse'")
        super().apply_bridge_state(key, value)
        self.applied.append(key)

    def _state(self, args: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(args.get("delay", 0)))  # a slow call keeps its worker busy
        return {"pid": os.getpid(), "state": dict(self.bridge_state)}

    def _register_handlers(self) -> None:
        r = self.register_handler
        r("configure", self._configure)
        r("state", self._state)
        self.register_resource_type(
            ResourceType(
                "words",
                create=lambda config, state: str(config["text"]).split(),
                execute=lambda words, inputs: {"words": words},
                stream=self._stream_words,
            )
        )

    def _configure(self, args: dict[str, Any]) -> dict[str, Any]:
        for key, value in args.items():
            self.set_bridge_state(key, value)
        return {"configured": sorted(args), "pid": os.getpid()}

    def _stream_words(self, words: list[str], inputs: dict[str, Any]) -> Generator[Any, None, Any]:
        for w in words:
            yield {"delta": w + str(inputs.get("suffix", ""))}
        return {"count": len(words), "pid": os.getpid()}
