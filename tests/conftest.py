from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Workers spawned by tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- Transformers test models (see hf_fixtures): defined here, once, so that each is built once
# a session (a fixture imported into several modules is a separate fixture in each).
@pytest.fixture(scope="session")
def hf_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache directory for this test session (never ``~/.cache``)."""
    return tmp_path_factory.mktemp("mlbridge-model-cache")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hf_fixtures import build_tiny_gpt2  # skips the test where transformers is missing

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2_load(hf_cache_dir: Path) -> dict[str, Any]:
    """``local:smollm2`` converted into the session cache once (progress chunks kept)."""
    from hf_fixtures import convert_smollm2

    return convert_smollm2(hf_cache_dir)


# --- Ray (issue 14): one two-node cluster for every test that asks for it (see ray_helpers)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    from ray_helpers import two_node_cluster

    yield from two_node_cluster()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the Ray tests last, together: the shared cluster then idles through no other test."""
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)
