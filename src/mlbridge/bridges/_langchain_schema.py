"""The ``{"json_schema": {...}}`` parser: JSON output checked against a JSON Schema.

Streaming yields partial objects as LangChain's ``JsonOutputParser`` does; the complete output is
validated (with ``jsonschema`` when it is installed, otherwise the schema's ``type``,
``required`` and top-level property types are checked). A reply that does not fit raises
LangChain's ``OutputParserException``, which the bridge reports as ``model_error``.
"""

from __future__ import annotations

from typing import Any

from langchain_core.exceptions import OutputParserException
from langchain_core.output_parsers import JsonOutputParser

__all__ = ["SchemaJsonParser"]

_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _problem(value: Any, schema: dict[str, Any]) -> str | None:
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return _basic_problem(value, schema)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return str(exc.message)
    except jsonschema.SchemaError as exc:
        return f"the json_schema itself is invalid: {exc.message}"
    return None


def _fits(value: Any, kind: Any) -> bool:
    wanted = _TYPES.get(kind) if isinstance(kind, str) else None
    if wanted is None:
        return True
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, wanted)


def _basic_problem(value: Any, schema: dict[str, Any]) -> str | None:
    if not _fits(value, schema.get("type")):
        return f"expected {schema.get('type')}, got {type(value).__name__}"
    if isinstance(value, dict):
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return f"missing required properties {missing}"
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and isinstance(sub, dict) and not _fits(value[key], sub.get("type")):
                return f"property {key!r}: expected {sub.get('type')}"
    return None


class SchemaJsonParser(JsonOutputParser):
    """``JsonOutputParser`` whose complete result must match ``json_schema``."""

    json_schema: dict[str, Any]

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        value = super().parse_result(result, partial=partial)
        if partial:
            return value
        problem = _problem(value, self.json_schema)
        if problem is not None:
            raise OutputParserException(
                f"the model's JSON does not match the chain's json_schema: {problem}",
                llm_output=result[0].text if result else None,
            )
        return value

    def get_format_instructions(self) -> str:
        import json

        return "Return a JSON object matching this JSON Schema: " + json.dumps(self.json_schema)
