from __future__ import annotations

import os

# Workers spawned by tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- Ray (issue 14): one two-node cluster for every test that asks for it (see ray_helpers)
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    from ray_helpers import two_node_cluster

    yield from two_node_cluster()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the Ray tests last, together: the shared cluster then idles through no other test."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)
