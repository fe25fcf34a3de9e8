"""close() while a call waits for its pool to start: the caller gets an error, never a hang."""

from __future__ import annotations

import threading
import time

from host_helpers import config, echo_cfg
from mlbridge import MLBridge, errors


def test_close_while_the_pool_is_starting_fails_the_waiting_call() -> None:
    b = MLBridge(config(echo_cfg(settings={"boot_delay": 5})), env_overrides=False)
    box: dict[str, BaseException] = {}

    def call() -> None:
        try:
            b.execute("echo", "pid", {})
        except BaseException as exc:
            box["exc"] = exc

    t = threading.Thread(target=call, daemon=True)
    t.start()
    time.sleep(0.3)  # the worker is still booting (boot_delay)
    b.close()
    t.join(20)
    assert not t.is_alive()
    assert isinstance(box["exc"], errors.BridgeUnavailableError)
    assert "the host is closing" in str(box["exc"])
