"""A bridge's own log lines (e.g. model-load progress during a call that does not stream) reach
the host's log at their level; other worker stderr stays at DEBUG (issue 10, defect 4)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from mlbridge import MLBridge
from mlbridge._host.worker_logs import bridge_log_level
from mlbridge.config import MLBridgeConfig

BRIDGE = """\
import logging, sys
from mlbridge import BaseBridge
from mlbridge.bridges._logs import setup_bridge_logging

log = logging.getLogger("mlbridge.bridge.loud")

class Loud(BaseBridge):
    name = "loud"

    def _initialize_framework(self):
        setup_bridge_logging(log, "INFO", "INFO")

    def _register_handlers(self):
        self.register_handler("work", self.work)

    def work(self, args):
        log.info("model m: convert_tensors (done=5 total=10)")
        sys.stderr.write("some framework noise\\n")
        sys.stderr.flush()
        return "done"
"""


def test_bridge_log_lines_keep_their_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "loud_bridge.py"
    script.write_text(BRIDGE)
    cfg = MLBridgeConfig.from_mapping({"bridges": {"loud": {"python_script": str(script)}}})
    caplog.set_level(logging.DEBUG, logger="mlbridge")

    def messages(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    with MLBridge(cfg, env_overrides=False) as bridge:
        assert bridge.execute("loud", "work", {}) == "done"
        deadline = time.monotonic() + 30  # stderr is drained asynchronously
        while time.monotonic() < deadline and not any(
            "some framework noise" in m for m in messages(logging.DEBUG)
        ):
            time.sleep(0.05)
    assert any("convert_tensors (done=5 total=10)" in m for m in messages(logging.INFO))
    assert any("some framework noise" in m for m in messages(logging.DEBUG))
    assert not any("some framework noise" in m for m in messages(logging.INFO))


def test_bridge_log_level_parses_only_bridge_logger_lines() -> None:
    line = "2026-12-02 00:41:08,123 mlbridge.bridge.transformers[4242] WARNING model x: slow"
    assert bridge_log_level(line) == logging.WARNING
    assert bridge_log_level(line.replace("WARNING", "INFO")) == logging.INFO
    assert bridge_log_level("INFO something printed by a library") == logging.DEBUG
    assert bridge_log_level(line.replace("mlbridge.bridge.", "torch.")) == logging.DEBUG
