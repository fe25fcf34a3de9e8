"""DSPy signatures from the forms callers send: strings, the DSPex dict, and type names.

* string: ``"question -> answer"``, ``"question: str, ctx: list[str] -> answer: int"``;
* DSPex dict: ``{name?, description?, instructions?, inputs: [{name, description?, type?}],
  outputs: [...]}`` (a field may also be a bare name);
* field types: ``str``, ``int``, ``float``, ``bool``, ``list[...]``, ``dict[...]``,
  ``tuple[...]``, ``Literal[...]``, ``Optional[...]``/``X | None``, ``Any``, and the JSON-schema
  names ``string``, ``integer``, ``number``, ``boolean``, ``array``, ``object``.

Anything else is an :class:`InvalidConfigurationError` that names the problem: a bad signature is
never replaced by a default one (the old DSPex bridge fell back to ``question -> answer``).
Type names are parsed with :mod:`ast` against a fixed vocabulary; nothing is evaluated.
"""

from __future__ import annotations

import ast
import keyword
import typing
from typing import Any

from ..errors import InvalidConfigurationError

__all__ = ["build_signature", "describe_signature", "parse_type", "type_name"]

_SCALARS: dict[str, Any] = {
    "str": str,
    "string": str,
    "text": str,
    "int": int,
    "integer": int,
    "float": float,
    "number": float,
    "bool": bool,
    "boolean": bool,
    "list": list,
    "array": list,
    "dict": dict,
    "object": dict,
    "tuple": tuple,
    "Any": Any,
    "any": Any,
    "None": type(None),
}
_GENERICS: dict[str, Any] = {"list": list, "List": list, "dict": dict, "Dict": dict}
_GENERICS.update({"tuple": tuple, "Tuple": tuple})
TYPE_HELP = (
    "str, int, float, bool, list[...], dict[...], tuple[...], Literal[...], Optional[...], Any"
)


def _bad(message: str) -> InvalidConfigurationError:
    return InvalidConfigurationError(message)


def parse_type(text: Any, *, where: str = "type") -> Any:
    """A Python type from a type name such as ``"list[str]"`` or ``"Literal['a', 'b']"``."""
    if text is None or text == "":
        return str
    if not isinstance(text, str):
        raise _bad(f"{where}: a type is a string such as 'int' or 'list[str]', got {text!r}")
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise _bad(f"{where}: {text!r} is not a type expression ({exc.msg})") from exc
    return _type_of(node, text, where)


def _type_of(node: ast.AST, text: str, where: str) -> Any:
    if isinstance(node, ast.Name):
        if node.id in _SCALARS:
            return _SCALARS[node.id]
        raise _bad(f"{where}: unknown type {node.id!r} in {text!r}; use one of {TYPE_HELP}")
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _type_of(node.left, text, where), _type_of(node.right, text, where)
        return typing.Union[left, right]  # noqa: UP007 - built from runtime values
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        base = node.value.id
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Literal":
            values = []
            for item in items:
                if not isinstance(item, ast.Constant) or not isinstance(
                    item.value, str | int | float | bool
                ):
                    raise _bad(f"{where}: Literal[...] takes plain constants, got {text!r}")
                values.append(item.value)
            return typing.Literal[tuple(values)]
        args = tuple(_type_of(item, text, where) for item in items)
        if base == "Optional" and len(args) == 1:
            return typing.Optional[args[0]]  # noqa: UP045 - built from runtime values
        if base == "Union":
            return typing.Union[args]  # noqa: UP007
        generic = _GENERICS.get(base)
        if generic is None:
            raise _bad(f"{where}: unknown generic {base!r} in {text!r}; use one of {TYPE_HELP}")
        if generic is list and len(args) != 1:
            raise _bad(f"{where}: list takes one item type, got {text!r}")
        if generic is dict and len(args) != 2:
            raise _bad(f"{where}: dict takes a key and a value type, got {text!r}")
        return generic[args if len(args) > 1 else args[0]]
    raise _bad(f"{where}: {text!r} is not a type expression; use one of {TYPE_HELP}")


def type_name(annotation: Any) -> str:
    """The readable name of a field type (``str``, ``list[int]``, ``Literal['a', 'b']``)."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = repr(annotation)
    return text.replace("typing.", "")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise _bad(f"{where}: field name {name!r} must be a Python identifier such as 'question'")
    return name


def build_signature(spec: Any, instructions: str | None = None) -> Any:
    """A ``dspy.Signature`` class from a string or a DSPex dict (see the module docstring)."""
    import dspy

    if isinstance(spec, str):
        sig = _from_string(dspy, spec)
    elif isinstance(spec, dict):
        sig = _from_dict(dspy, spec)
        instructions = instructions or spec.get("instructions")
    elif isinstance(spec, type) and issubclass(spec, dspy.Signature):
        sig = spec
    else:
        raise _bad(
            "'signature' must be a string such as 'question -> answer' or an object "
            f"{{inputs: [...], outputs: [...]}}, got {type(spec).__name__}"
        )
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad(f"'instructions' must be a string, got {type(instructions).__name__}")
        sig = sig.with_instructions(instructions)
    return sig


def _from_string(dspy: Any, text: str) -> Any:
    if text.count("->") != 1:
        raise _bad(
            f"signature {text!r} must have exactly one '->' between inputs and outputs, "
            "e.g. 'question -> answer'"
        )
    left, right = (part.strip() for part in text.split("->"))
    if not right:
        raise _bad(f"signature {text!r} has no output fields after '->'")
    try:
        sig = dspy.Signature(text)
    except (ValueError, SyntaxError, TypeError, NameError) as exc:
        raise _bad(f"invalid signature {text!r}: {exc}") from exc
    declared = [_split_field(p) for p in _split_top(left)] if left else []
    declared_out = [_split_field(p) for p in _split_top(right)]
    for n in (*declared, *declared_out):
        _check_name(n, f"signature {text!r}")
    if list(sig.input_fields) != declared or list(sig.output_fields) != declared_out:
        raise _bad(f"invalid signature {text!r}: could not read its fields")
    return sig


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets (``a: dict[str, int], b`` -> two parts)."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def _split_field(part: str) -> str:
    return part.split(":", 1)[0].strip()


def _fields(spec: dict[str, Any], key: str) -> list[tuple[str, str | None, Any]]:
    raw = spec.get(key, [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise _bad(f"signature.{key} must be a list of fields, got {type(raw).__name__}")
    out = []
    for i, item in enumerate(raw):
        where = f"signature.{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise _bad(f"{where} must be a field object {{name, description?, type?}}")
        name = _check_name(item.get("name"), where)
        desc = item.get("description", item.get("desc"))
        if desc is not None and not isinstance(desc, str):
            raise _bad(f"{where}.description must be a string")
        out.append((name, desc, parse_type(item.get("type"), where=f"{where}.type")))
    return out


def _from_dict(dspy: Any, spec: dict[str, Any]) -> Any:
    inputs, outputs = _fields(spec, "inputs"), _fields(spec, "outputs")
    if not outputs:
        raise _bad("signature.outputs must name at least one output field")
    seen: set[str] = set()
    for name, _, _ in (*inputs, *outputs):
        if name in seen:
            raise _bad(f"signature: field {name!r} appears twice (inputs and outputs must differ)")
        seen.add(name)
    fields: dict[str, Any] = {}
    for name, desc, ftype in inputs:
        kw = {"desc": desc} if desc else {}
        fields[name] = (ftype, dspy.InputField(**kw))
    for name, desc, ftype in outputs:
        kw = {"desc": desc} if desc else {}
        fields[name] = (ftype, dspy.OutputField(**kw))
    sig_name = spec.get("name") or "DynamicSignature"
    if not isinstance(sig_name, str) or not sig_name.isidentifier():
        raise _bad(f"signature.name {sig_name!r} must be an identifier such as 'QASignature'")
    instructions = spec.get("description") or spec.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("signature.description must be a string")
    try:
        return dspy.make_signature(fields, instructions, signature_name=sig_name)
    except (ValueError, TypeError) as exc:
        raise _bad(f"invalid signature: {exc}") from exc


def _field_info(name: str, field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra or {}
    desc = extra.get("desc")
    if isinstance(desc, str) and desc.startswith("${"):
        desc = None
    return {"name": name, "description": desc, "type": type_name(field.annotation)}


def describe_signature(sig: Any) -> dict[str, Any]:
    """Plain data for a signature: name, instructions, the string form and typed fields."""
    return {
        "name": sig.__name__,
        "instructions": sig.instructions,
        "string": sig.signature,
        "inputs": [_field_info(n, f) for n, f in sig.input_fields.items()],
        "outputs": [_field_info(n, f) for n, f in sig.output_fields.items()],
    }
