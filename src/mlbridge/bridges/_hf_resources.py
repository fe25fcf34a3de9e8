"""Resources and model-agnostic operations of the Transformers bridge.

The four resource types (``model``, ``pipeline``, ``tokenizer``, ``embedder``) are built here from
their config, always through the worker's :class:`~._hf_models.ModelStore`, so resources that name
the same model share one loaded copy. ``Models`` also answers "which object does this ``model``
argument mean": a resource id of this worker first, then a built-in name, a local path or a hub id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import pipelines as hf_pipelines

from ..errors import InvalidRequestError, ModelError
from ._hf_models import LoadedModel, ModelStore, load_errors, parse_dtype

__all__ = ["CAUSAL_TASKS", "Embedder", "Models", "embedding_dims", "to_wire"]

CAUSAL_TASKS = frozenset({"causal-lm", "causal_lm", "chat", "generate", "text-generation"})
_PIPELINE_KEYS = frozenset({"task", "model", "tokenizer", "dtype", "kwargs"})


@dataclass(slots=True)
class Embedder:
    ref: str
    model: Any  # a SentenceTransformer
    normalize: bool = True

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.ref,
            "dims": embedding_dims(self.model),
            "normalize": self.normalize,
        }


def embedding_dims(st: Any) -> int:
    getter = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    return int(getter())


def to_wire(obj: Any, as_list: bool) -> Any:
    """Plain data for the codec: tensors -> numpy arrays (or lists with ``as_list``)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        obj = t.numpy()
    if isinstance(obj, np.ndarray):
        return obj.tolist() if as_list else obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): to_wire(v, as_list) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_wire(v, as_list) for v in obj]
    if obj is None or isinstance(obj, str | int | float | bool | bytes):
        return obj
    if hasattr(obj, "to_dict"):
        return to_wire(obj.to_dict(), as_list)
    return str(obj)


def _texts(inputs: dict[str, Any], *keys: str) -> tuple[list[str], bool]:
    """The texts of a request and whether a single string was given."""
    for key in keys:
        value = inputs.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return [value], True
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), False
        raise InvalidRequestError(f"{key!r} must be a string or a list of strings")
    raise InvalidRequestError(f"give the text as one of {', '.join(repr(k) for k in keys)}")


def _unknown_task(task: Any) -> InvalidRequestError:
    tasks = hf_pipelines.PIPELINE_REGISTRY.get_supported_tasks()
    return InvalidRequestError(
        f"unknown task {task!r}. Fix: use a Transformers pipeline task ({', '.join(tasks)})"
        ", or 'causal-lm' for a model resource",
        task=str(task),
    )


def _architectures(path: str) -> list[str]:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    arch = config.get("architectures") or []
    return [str(a) for a in arch] if isinstance(arch, list) else []


class Models:
    """Resolves a ``model`` argument to loaded objects and builds the resource objects."""

    def __init__(self, store: ModelStore, lookup: Callable[[str], Any]) -> None:
        self.store = store
        self.lookup = lookup  # resource id -> live object, or None

    # ------------------------------------------------------------------ model arguments
    def language_model(self, ref: str) -> tuple[Any, Any]:
        """(model, tokenizer) of a causal LM named by ``ref``."""
        obj = self.lookup(ref)
        if obj is None:
            loaded = self.store.model(ref, transformers.AutoModelForCausalLM)
            return loaded.model, loaded.tokenizer
        if isinstance(obj, LoadedModel):
            return obj.model, obj.tokenizer
        if isinstance(obj, transformers.Pipeline):
            return obj.model, obj.tokenizer
        raise InvalidRequestError(
            f"resource {ref!r} is a {type(obj).__name__}, not a model that generates text"
        )

    def tokenizer(self, ref: str) -> Any:
        obj = self.lookup(ref)
        if obj is None:
            return self.store.tokenizer(ref)
        tok = obj
        if isinstance(obj, LoadedModel | transformers.Pipeline):
            tok = obj.tokenizer
        elif isinstance(obj, Embedder):
            tok = obj.model.tokenizer
        if tok is None:
            raise InvalidRequestError(f"resource {ref!r} has no tokenizer")
        return tok

    def embedder(self, ref: str, *, dtype: Any = None) -> Any:
        obj = self.lookup(ref)
        if obj is None:
            return self.store.embedder(ref, dtype)
        if isinstance(obj, Embedder):
            return obj.model
        if isinstance(obj, LoadedModel):
            return self.store.embedder(obj.path, dtype)
        raise InvalidRequestError(f"resource {ref!r} is a {type(obj).__name__}, not an embedder")

    # ------------------------------------------------------------------ resources
    def auto_class(self, config: dict[str, Any], path: str) -> Any:
        name = config.get("auto_class")
        if name is not None:
            cls = getattr(transformers, str(name), None)
            if cls is None or not str(name).startswith("Auto"):
                raise InvalidRequestError(
                    f"unknown auto_class {name!r}; use a transformers Auto* class such as "
                    "AutoModel or AutoModelForCausalLM"
                )
            return cls
        task = config.get("task")
        if task in CAUSAL_TASKS:
            return transformers.AutoModelForCausalLM
        if task is not None:
            try:
                _, targeted, _ = hf_pipelines.check_task(str(task))
            except KeyError:
                raise _unknown_task(task) from None
            classes = targeted.get("pt") or ()
            if not classes:
                raise InvalidRequestError(f"task {task!r} has no PyTorch model class")
            return classes[0]
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(path)):
            return transformers.AutoModelForCausalLM
        return transformers.AutoModel

    def make_model(self, config: dict[str, Any], state: Any) -> LoadedModel:
        ref = self._ref(config, "model")
        path = self.store.resolve(ref)
        dtype = parse_dtype(config["dtype"], self.store.device) if config.get("dtype") else None
        return self.store.model(ref, self.auto_class(config, path), dtype=dtype)

    def make_tokenizer(self, config: dict[str, Any], state: Any) -> Any:
        return self.tokenizer(self._ref(config, "tokenizer"))

    def make_embedder(self, config: dict[str, Any], state: Any) -> Embedder:
        ref = str(config.get("model") or "local:minilm")
        dtype = parse_dtype(config["dtype"], self.store.device) if config.get("dtype") else None
        return Embedder(ref, self.embedder(ref, dtype=dtype), bool(config.get("normalize", True)))

    def make_pipeline(self, config: dict[str, Any], state: Any) -> Any:
        task = config.get("task")
        if not isinstance(task, str) or not task:
            raise InvalidRequestError("a pipeline needs a 'task', e.g. 'text-generation'")
        try:
            _, targeted, _ = hf_pipelines.check_task(task)
        except KeyError:
            raise _unknown_task(task) from None
        ref = self._ref(config, "pipeline")
        kwargs = dict(config.get("kwargs") or {})
        kwargs.update({k: v for k, v in config.items() if k not in _PIPELINE_KEYS})
        obj = self.lookup(ref)
        if isinstance(obj, LoadedModel):
            model, tok = obj.model, obj.tokenizer
        else:
            self.store.resolve(ref)  # a missing path or offline hub id fails here, clearly
            dtype = parse_dtype(config["dtype"], self.store.device) if config.get("dtype") else None
            model, tok = self._model_for_task(ref, task, targeted.get("pt") or (), dtype)
        if config.get("tokenizer"):
            tok = self.tokenizer(str(config["tokenizer"]))
        with load_errors(ref, f"{task} pipeline for", self.store.device):
            make: Any = transformers.pipeline  # its overloads want a literal task name
            return make(task, model=model, tokenizer=tok, **kwargs)

    def _model_for_task(
        self, ref: str, task: str, classes: tuple[Any, ...], dtype: Any
    ) -> tuple[Any, Any]:
        last: ModelError | None = None
        for cls in classes:
            try:
                loaded = self.store.model(ref, cls, dtype=dtype)
            except ModelError as exc:
                last = exc
                continue
            return loaded.model, loaded.tokenizer
        raise ModelError(
            f"model {ref!r} cannot run the {task!r} task: {last}. Fix: pick a task this "
            "model's architecture supports, or a model made for this task.",
            model=ref,
            task=task,
        ) from last

    @staticmethod
    def _ref(config: dict[str, Any], what: str) -> str:
        ref = config.get("model")
        if not isinstance(ref, str) or not ref:
            raise InvalidRequestError(
                f"a {what} needs 'model': a local path, a built-in model (local:smollm2, "
                "local:minilm) or, with downloads on, a hub id"
            )
        return ref

    # ------------------------------------------------------------------ operations
    @staticmethod
    def run_pipeline(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        args = dict(inputs)
        as_list = bool(args.pop("as_list", True))
        data = None
        for key in ("inputs", "text", "texts"):
            if key in args:
                data = args.pop(key)
                break
        if data is None:
            raise InvalidRequestError("execute a pipeline with {'inputs': ...} (or 'text')")
        with torch.inference_mode():
            out = pipe(data, **args)
        return {"outputs": to_wire(out, as_list)}

    @staticmethod
    def tokenize(tok: Any, args: dict[str, Any]) -> dict[str, Any]:
        texts, single = _texts(args, "text", "texts")
        add_special = bool(args.get("add_special_tokens", True))
        ids = [tok(t, add_special_tokens=add_special)["input_ids"] for t in texts]
        if single:
            tokens = tok.convert_ids_to_tokens(ids[0])
            return {"ids": ids[0], "tokens": tokens, "count": len(ids[0])}
        return {"ids": ids, "counts": [len(i) for i in ids]}

    @staticmethod
    def detokenize(tok: Any, args: dict[str, Any]) -> dict[str, Any]:
        ids = args.get("ids")
        skip = bool(args.get("skip_special_tokens", True))
        if isinstance(ids, list) and all(isinstance(i, int) for i in ids):
            return {"text": tok.decode(ids, skip_special_tokens=skip)}
        if isinstance(ids, list) and all(
            isinstance(row, list) and all(isinstance(i, int) for i in row) for row in ids
        ):
            return {"texts": [tok.decode(row, skip_special_tokens=skip) for row in ids]}
        raise InvalidRequestError("'ids' must be a list of token ids (or a list of such lists)")

    @staticmethod
    def embed(st: Any, ref: str, args: dict[str, Any], normalize: bool = True) -> dict[str, Any]:
        texts, _ = _texts(args, "texts", "text", "input", "inputs")
        batch_size = int(args.get("batch_size", 32))
        if batch_size < 1:
            raise InvalidRequestError("'batch_size' must be >= 1")
        normalize = bool(args.get("normalize", normalize))
        if not texts:
            empty = np.zeros((0, embedding_dims(st)), dtype=np.float32)
            return {
                "model": ref,
                "embeddings": [] if args.get("as_list") else empty,
                "dims": embedding_dims(st),
                "count": 0,
                "normalized": normalize,
            }
        with torch.inference_mode():
            vectors = st.encode(
                texts,
                batch_size=batch_size,
                normalize_embeddings=normalize,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return {
            "model": ref,
            "embeddings": vectors.tolist() if args.get("as_list") else vectors,
            "dims": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "count": len(texts),
            "normalized": normalize,
        }

    @staticmethod
    def forward(loaded: LoadedModel, inputs: dict[str, Any]) -> dict[str, Any]:
        """Run a non-generative model on text: its output tensors as float32 arrays."""
        if loaded.tokenizer is None:
            raise InvalidRequestError(f"model {loaded.ref!r} has no tokenizer to encode text")
        texts, _ = _texts(inputs, "text", "texts", "inputs")
        tok = loaded.tokenizer
        if len(texts) > 1 and tok.pad_token is None:
            tok.pad_token = tok.eos_token  # GPT-2 style tokenizers have none; any id works
        enc = tok(texts, return_tensors="pt", padding=len(texts) > 1, truncation=True)
        enc = {k: v.to(loaded.model.device) for k, v in enc.items()}
        with torch.inference_mode():
            out = loaded.model(**enc)
        as_list = bool(inputs.get("as_list", False))
        result = {k: to_wire(v, as_list) for k, v in out.items() if isinstance(v, torch.Tensor)}
        result["attention_mask"] = to_wire(enc["attention_mask"], as_list)
        return result
