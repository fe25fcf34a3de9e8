"""Optimising DSPy programs: ``bootstrap_few_shot`` and ``labeled_few_shot``.

``optimize {program, optimizer, trainset: [{...inputs and labels...}], input_keys?, metric?,
params?}`` compiles the program in this worker and replaces its module with the compiled one. The
caller (the bridge) then reports the new ``dump_state()`` to the host, which keeps it in the
resource's record: every worker, and a replacement after a crash, rebuilds the optimised program.

``metric`` is ``"exact_match"`` (every label in the example equals the prediction's field, compared
as stripped text) or an import path ``"pkg.mod:function"`` taking ``(example, prediction,
trace=None)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import dspy

from ..errors import InvalidConfigurationError, InvalidRequestError
from ._dspy_lm import import_object
from ._dspy_programs import Program

__all__ = ["OPTIMIZERS", "exact_match", "optimize"]

OPTIMIZERS = {
    "bootstrap_few_shot": "BootstrapFewShot",
    "BootstrapFewShot": "BootstrapFewShot",
    "labeled_few_shot": "LabeledFewShot",
    "LabeledFewShot": "LabeledFewShot",
}


def _text(value: Any) -> str:
    return str(value).strip()


def make_exact_match(label_keys: list[str]) -> Callable[..., bool]:
    def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
        keys = label_keys or list(example.labels())
        return all(
            _text(getattr(prediction, k, None)) == _text(example[k]) for k in keys if k in example
        )

    return exact_match


exact_match = make_exact_match([])


def _trainset(raw: Any, input_keys: list[str]) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise InvalidRequestError("optimize: 'trainset' must be a non-empty list of examples")
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequestError(f"optimize: trainset[{i}] must be an object")
        missing = [k for k in input_keys if k not in item]
        if missing:
            raise InvalidRequestError(f"optimize: trainset[{i}] lacks the inputs {missing}")
        out.append(dspy.Example(**item).with_inputs(*input_keys))
    return out


def optimize(prog: Program, args: dict[str, Any], lm: Any) -> dict[str, Any]:
    """Compile ``prog`` in place; return what was done (optimizer, sizes, demos, seconds)."""
    name = args.get("optimizer", "bootstrap_few_shot")
    cls_name = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if cls_name is None:
        raise InvalidConfigurationError(
            f"optimizer must be one of bootstrap_few_shot, labeled_few_shot, got {name!r}"
        )
    input_keys = args.get("input_keys") or prog.input_names()
    if not input_keys or not all(isinstance(k, str) for k in input_keys):
        raise InvalidRequestError(
            "optimize: give 'input_keys' (the example fields that are inputs); a program built "
            "from a module has no signature to take them from"
        )
    trainset = _trainset(args.get("trainset"), list(input_keys))
    params = args.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("optimize: 'params' must be an object")
    metric_ref = args.get("metric", "exact_match")
    if cls_name == "BootstrapFewShot":
        labels = prog.output_names() or []
        metric = (
            make_exact_match(labels)
            if metric_ref in (None, "exact_match")
            else import_object(metric_ref, "metric")
        )
        if not callable(metric):
            raise InvalidConfigurationError(f"metric {metric_ref!r} is not callable")
        make: Callable[[], Any] = lambda: dspy.BootstrapFewShot(metric=metric, **params)  # noqa: E731
    else:
        make = lambda: dspy.LabeledFewShot(**params)  # noqa: E731
    try:
        optimizer = make()
    except TypeError as exc:
        raise InvalidConfigurationError(f"optimize: bad params for {cls_name}: {exc}") from exc
    t0 = time.perf_counter()
    settings: dict[str, Any] = {"lm": prog.lm or lm}
    if prog.adapter is not None:
        settings["adapter"] = prog.adapter
    with dspy.context(**settings):
        compiled = optimizer.compile(prog.module, trainset=trainset)
    prog.module = compiled
    prog.optimization = {
        "optimizer": OPTIMIZERS[name] if name in OPTIMIZERS else name,
        "trainset_size": len(trainset),
        "input_keys": list(input_keys),
        "metric": metric_ref if cls_name == "BootstrapFewShot" else None,
        "params": params,
        "optimized_at": time.time(),
    }
    return {
        "status": "optimized",
        "optimizer": name,
        "trainset_size": len(trainset),
        "demos": prog.demos_count(),
        "seconds": time.perf_counter() - t0,
    }
