"""Declared payload JSON Schemas compiled to pydantic models: how the gateway validates any service's writes.

A service in any language declares each operation's payload as a JSON Schema (docs/service-contract.md,
section 9). The gateway compiles it once per catalogue version into a frozen pydantic model that
refuses unknown fields, so validation and its field-level messages are the same for every service, and
the GraphQL layer reads argument types from the model's fields as it would from a hand-written one.

The supported keywords are listed in the contract; `errorMessage` (a string, or an object from keyword
to message) replaces the generic message of a failed keyword with the author's own words. Keywords
outside that list are carried in the declaration but enforced only by the service itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

# Deliberately loose (one @, a dot in the domain, no whitespace): the mail server is the real judge.
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_FIELD_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MAX_DEPTH = 6

# pydantic error types -> the JSON Schema keyword whose failure they report (for `errorMessage`).
_KEYWORD_OF_ERROR = {
    "string_too_short": "minLength",
    "string_too_long": "maxLength",
    "string_pattern_mismatch": "pattern",
    "greater_than_equal": "minimum",
    "greater_than": "exclusiveMinimum",
    "less_than_equal": "maximum",
    "less_than": "exclusiveMaximum",
    "multiple_of": "multipleOf",
    "too_short": "minItems",
    "too_long": "maxItems",
    "literal_error": "enum",
    "missing": "required",
    "email_format": "format",
    "not_const": "not",
}


class PayloadSchemaError(ValueError):
    """A declared payload schema the gateway cannot compile; the message names the field and the fix."""


class PayloadModel(BaseModel):
    """Base of every compiled payload: unknown fields are refused so an agent's typo is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def compile_payload_schema(schema: Mapping[str, Any], model_name: str) -> type[PayloadModel]:
    """The pydantic model that validates payloads against `schema` (a JSON Schema of type object)."""
    return _object_model(normalize_schema(schema), model_name, "payload", 0)


def normalize_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """`schema` with local `$ref`s inlined and `anyOf: [X, {type: null}]` folded into a nullable X.

    Those are the two shapes generators (pydantic, zod, Go's reflectors) emit for nested and optional
    fields; folding them here keeps the compiler to one form.
    """
    found = [schema.get(key) for key in ("definitions", "$defs")]
    definitions = {k: v for table in found if isinstance(table, Mapping) for k, v in table.items()}

    def walk(node: Any, depth: int) -> Any:
        if depth > 2 * _MAX_DEPTH or not isinstance(node, Mapping | list):
            return node
        if isinstance(node, list):
            return [walk(item, depth + 1) for item in node]
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.rsplit("/", 1)[-1] in definitions:
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return walk({**definitions[ref.rsplit("/", 1)[-1]], **rest}, depth + 1)
        folded = {k: walk(v, depth + 1) for k, v in node.items() if k not in ("$defs", "definitions")}
        for key in ("anyOf", "oneOf"):
            options = folded.get(key)
            others = [o for o in options if o != {"type": "null"}] if isinstance(options, list) else []
            if isinstance(options, list) and len(options) == 2 and len(others) == 1:
                other = others[0]
                if isinstance(other, Mapping) and isinstance(other.get("type"), str):
                    merged = {**other, **{k: v for k, v in folded.items() if k != key}}
                    merged["type"] = [other["type"], "null"]
                    return merged
        return folded

    result: dict[str, Any] = walk(dict(schema), 0)
    return result


def error_messages(schema: Mapping[str, Any], exc: ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    """(location, message) per error, with each field's `errorMessage` replacing the generic words."""
    found: list[tuple[tuple[Any, ...], str]] = []
    normalized = normalize_schema(schema)
    for error in exc.errors(include_url=False, include_input=False):
        loc = tuple(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        custom = _custom_message(_property_schema(normalized, loc), _KEYWORD_OF_ERROR.get(error["type"]))
        found.append((loc, custom or message))
    return found


def _custom_message(prop: Mapping[str, Any] | None, keyword: str | None) -> str | None:
    if prop is None or keyword is None:
        return None
    custom = prop.get("errorMessage")
    if isinstance(custom, str):
        return custom
    if isinstance(custom, Mapping) and isinstance(custom.get(keyword), str):
        return str(custom[keyword])
    return None


def _property_schema(schema: Mapping[str, Any], loc: tuple[Any, ...]) -> Mapping[str, Any] | None:
    node: Any = schema
    for part in loc:
        if not isinstance(node, Mapping):
            return None
        if isinstance(part, int):
            node = node.get("items")
        else:
            props = node.get("properties")
            node = props.get(part) if isinstance(props, Mapping) else None
    return node if isinstance(node, Mapping) else None


def _object_model(schema: Mapping[str, Any], name: str, where: str, depth: int) -> type[PayloadModel]:
    if depth > _MAX_DEPTH:
        raise PayloadSchemaError(
            f"{where}: objects nest deeper than {_MAX_DEPTH} levels: flatten the payload")
    if schema.get("type", "object") != "object":
        raise PayloadSchemaError(f"{where}: must be a JSON Schema of type object, got {schema.get('type')!r}")
    if schema.get("additionalProperties", False) is not False:
        raise PayloadSchemaError(
            f"{where}: set additionalProperties to false so a misspelt field is refused, not dropped")
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, Mapping) or not isinstance(required, list):
        raise PayloadSchemaError(f"{where}: properties must be an object and required a list of names")
    unknown = [r for r in required if r not in properties]
    if unknown:
        raise PayloadSchemaError(f"{where}: required names fields that are not properties: {unknown}")
    fields: dict[str, Any] = {}
    for field_name, prop in properties.items():
        if not isinstance(field_name, str) or not _FIELD_RE.match(field_name):
            raise PayloadSchemaError(
                f"{where}: field name {field_name!r} must be snake_case (lowercase letters, digits, '_')")
        if not isinstance(prop, Mapping):
            raise PayloadSchemaError(f"{where}.{field_name}: must be a JSON Schema object")
        annotation = _annotation(prop, f"{name}_{field_name}", f"{where}.{field_name}", depth)
        description = prop.get("description") if isinstance(prop.get("description"), str) else None
        if field_name in required:
            fields[field_name] = (annotation, Field(description=description))
        elif prop.get("default") is not None:
            fields[field_name] = (annotation, Field(default=prop["default"], description=description))
        else:
            fields[field_name] = (annotation | None, Field(default=None, description=description))
    model: type[PayloadModel] = create_model(
        _class_name(name), __base__=PayloadModel, **fields)
    return model


def _class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)


def _annotation(prop: Mapping[str, Any], name: str, where: str, depth: int) -> Any:
    kind = prop.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        if len(kinds) != 1:
            raise PayloadSchemaError(f"{where}: type may name one type, optionally with null; got {kind}")
        return _annotation({**prop, "type": kinds[0]}, name, where, depth) | None
    if "enum" in prop or "const" in prop:
        values = prop["enum"] if "enum" in prop else [prop["const"]]
        if not isinstance(values, list) or not values:
            raise PayloadSchemaError(f"{where}: enum must be a non-empty list")
        return _with_not(Literal[tuple(values)], prop, where)
    base: Any
    if kind == "string":
        base = _string(prop, where)
    elif kind == "integer":
        base = Annotated[int, Strict(), *_numeric(prop)]
    elif kind == "number":
        base = Annotated[float, *_numeric(prop)]
    elif kind == "boolean":
        base = Annotated[bool, Strict()]
    elif kind == "array":
        items = prop.get("items", {})
        inner = _annotation(items, f"{name}_item", f"{where}[]", depth) if items else Any
        base = Annotated[list[inner], Field(min_length=prop.get("minItems"),  # type: ignore[valid-type]
                                            max_length=prop.get("maxItems"))]
    elif kind == "object":
        if "properties" in prop:
            base = _object_model(prop, name, where, depth + 1)
        else:
            base = dict[str, Any]
    else:
        raise PayloadSchemaError(
            f"{where}: type {kind!r} is not supported: use string, integer, number, boolean, array or object")
    return _with_not(base, prop, where)


def _string(prop: Mapping[str, Any], where: str) -> Any:
    pattern = prop.get("pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise PayloadSchemaError(f"{where}: pattern {pattern!r} does not compile: {exc}") from exc
    parts: list[Any] = [StringConstraints(min_length=prop.get("minLength"), max_length=prop.get("maxLength"),
                                          pattern=pattern)]
    if prop.get("format") == "email":
        parts.append(AfterValidator(_email))
    return Annotated[str, Strict(), *parts]


def _email(value: str) -> str:
    if not EMAIL_RE.match(value):
        raise PydanticCustomError(
            "email_format", "'{value}' is not an email address: use the form name@example.org",
            {"value": value})
    return value


def _numeric(prop: Mapping[str, Any]) -> list[Any]:
    # Flat annotated-types constraints, so the GraphQL layer can read the bounds off the field.
    bounds = {"minimum": annotated_types.Ge, "maximum": annotated_types.Le,
              "exclusiveMinimum": annotated_types.Gt, "exclusiveMaximum": annotated_types.Lt,
              "multipleOf": annotated_types.MultipleOf}
    return [make(prop[keyword]) for keyword, make in bounds.items() if prop.get(keyword) is not None]


def _with_not(base: Any, prop: Mapping[str, Any], where: str) -> Any:
    refused = prop.get("not")
    if refused is None:
        return base
    if not (isinstance(refused, Mapping) and set(refused) == {"const"}):
        raise PayloadSchemaError(f"{where}: only `not: {{const: value}}` is supported")
    forbidden = refused["const"]

    def check(value: Any) -> Any:
        if value == forbidden and type(value) is type(forbidden):
            raise PydanticCustomError("not_const", "must not be {forbidden}", {"forbidden": forbidden})
        return value

    return Annotated[base, AfterValidator(check)]
