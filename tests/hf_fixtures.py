"""Shared helpers for the Transformers bridge tests; the session fixtures built from them live in
``conftest.py`` (defined once, so each is built once per session, not once per module):

* ``tiny_gpt2_dir``: a 2-layer, 64-dim GPT-2 with a byte-level BPE tokenizer trained on a few
  lines and a small chat template, saved with ``save_pretrained`` (~0.5 MB, built once a session).
* ``hf_cache_dir``: a model cache directory for this test session (never ``~/.cache``).
* ``smollm2_load``: ``local:smollm2`` converted from its GGUF once a session, through a real worker
  (the streamed ``load_model`` reply and its progress chunks are kept for the tests to inspect).
* ``transformers_worker(...)``: a real worker process speaking MessagePack (or JSON).

Ask for the fixtures by name; import the helpers: ``from hf_fixtures import hf_settings``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlbridge.testing import WorkerProcess

pytest.importorskip("transformers")
pytest.importorskip("torch")

TRAIN_LINES = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny language model for tests",
    "user: what is the capital of france? assistant: paris is the capital",
    "mlbridge runs transformers in worker processes",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
    "<|user|> <|assistant|> <|system|> hello! how are you? i am fine.",
] * 4

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
EOS = "<|endoftext|>"


def build_tiny_gpt2(path: Path) -> Path:
    """A deterministic tiny GPT-2 with only ASCII tokens (so streamed text never splits bytes)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=[EOS], initial_alphabet=[]
    )
    bpe.train_from_iterator(TRAIN_LINES, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.3,  # varied greedy output (the default repeats one word)
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.eval()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def hf_settings(cache_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"model_cache_dir": str(cache_dir), "threads": 2, **extra}


@contextlib.contextmanager
def transformers_worker(
    cache_dir: Path, codec: str = "msgpack", env: dict[str, str] | None = None, **settings: Any
) -> Iterator[WorkerProcess]:
    w = WorkerProcess("transformers", settings=hf_settings(cache_dir, **settings), env=env)
    try:
        w.hello(codec)
        yield w
    finally:
        w.close()


def stream_request(
    w: WorkerProcess, command: str, args: dict[str, Any], *, timeout: float = 120.0
) -> tuple[list[Any], dict[str, Any]]:
    """Send a streaming request; return (chunks, final reply) as they came off the pipe."""
    rid = int(time.monotonic_ns() % 1_000_000_000)
    w.send({"id": rid, "command": command, "args": args, "stream": True})
    chunks: list[Any] = []
    deadline = time.monotonic() + timeout
    while True:
        frame = w.recv(max(0.1, deadline - time.monotonic()))
        assert frame.get("id") == rid, frame
        if "chunk" in frame:
            chunks.append(frame["chunk"])
            continue
        return chunks, frame


def convert_smollm2(cache_dir: Path) -> dict[str, Any]:
    """Convert local:smollm2 into ``cache_dir`` (~20 s), streaming its progress (the session
    fixture ``smollm2_load`` in conftest.py calls this once)."""
    pytest.importorskip("gguf")
    # runtime="transformers": only its load converts (llama.cpp would run the GGUF as it is)
    with transformers_worker(cache_dir, runtime="transformers") as w:
        t0 = time.perf_counter()
        chunks, reply = stream_request(w, "load_model", {"model": "local:smollm2"}, timeout=300)
        seconds = time.perf_counter() - t0
    assert reply["success"], reply.get("error")
    return {"chunks": chunks, "result": reply["result"], "seconds": seconds}


def smollm2_path(cache_dir: Path) -> str:
    """The converted SmolLM2 directory inside ``cache_dir`` (after ``smollm2_load``)."""
    from mlbridge.bridges._hf_local import BUILTIN_MODELS, gguf_cache_path

    src = BUILTIN_MODELS["local:smollm2"].source()
    assert src is not None
    path = gguf_cache_path(cache_dir, src)
    assert path.is_dir(), path
    return os.fspath(path)
