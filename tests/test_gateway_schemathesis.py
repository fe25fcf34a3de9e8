"""Schemathesis against the gateway's own OpenAPI document (echo bridge): valid and invalid
inputs generated for every operation must never get a server error."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from gateway_helpers import serving

pytestmark = pytest.mark.gateway

CONFIG = """
[bridges.echo]
pool_size = 1
[gateway]
openai_bridge = "echo"
"""
TOKEN = "schema-token-1"
EXAMPLES = 6  # per operation and mode: bounded, CI runs the whole suite on 2 cores


def _checker(
    op: Any, mode: GenerationMode, url: str, seen: list[int], failures: list[str]
) -> Callable[[], None]:
    headers = {"Authorization": f"Bearer {TOKEN}"}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, headers=headers, timeout=60)
        seen.append(response.status_code)
        if response.status_code >= 500:
            failures.append(
                f"{case.method} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}"
            )

    return run  # type: ignore[no-any-return]


def test_no_server_error_for_any_generated_request(tmp_path: Path) -> None:
    with serving(tmp_path, CONFIG, token=TOKEN) as gw:
        schema = schemathesis.openapi.from_url(
            gw.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        failures: list[str] = []
        seen: list[int] = []
        operations = 0
        for result in schema.get_all_operations():
            operations += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    _checker(result.ok(), mode, gw.url, seen, failures)()
                except Unsatisfiable:
                    # no input of this operation can be made invalid (e.g. GET /healthz)
                    assert mode is GenerationMode.NEGATIVE
        assert operations >= 18
        assert len(seen) >= operations * EXAMPLES, len(seen)  # every operation was exercised
        assert any(400 <= s < 500 for s in seen)
        assert not failures, "\n".join(failures[:10])
        gw.remember_workers()
