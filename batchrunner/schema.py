"""Structured output: does an answer's content match the json_schema its request asked for?"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    # jsonschema costs ~0.07 s to import and only requests with a json_schema need it.
    import jsonschema

#: Bodies that contain neither cannot ask for JSON; checked before parsing anything.
_MARKERS = ('"json_schema"', '"json_object"')


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.protocols.Validator | None:
    import jsonschema

    schema = orjson.loads(schema_json)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


#: What `json_object` asks for, as a schema: any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _schema_of(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return _ANY_OBJECT
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        return None
    schema: dict[str, Any] = spec["schema"]
    return schema


class SchemaCheck:
    """Validates every choice's content against the request's schema."""

    @staticmethod
    def wanted(body_text: str) -> bool:
        # Spelled out: called for every answer, and cheaper than any() over _MARKERS.
        return _MARKERS[0] in body_text or _MARKERS[1] in body_text

    def verdict(self, body_text: str, completion: dict[str, Any] | None) -> bool | None:
        """True when every choice's content parses and matches (json_object: is a JSON object);
        None when there is nothing to judge: no schema, a schema that is not valid JSON Schema,
        or only tool calls (the schema is for the final answer, after the tool results)."""
        schema = _schema_of(orjson.loads(body_text))
        if schema is None:
            return None
        validator = _validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode())
        if validator is None:
            return None
        choices = (completion or {}).get("choices")
        if not isinstance(choices, list) or not choices:
            return False
        judged = 0
        for choice in choices:
            message = choice.get("message") if isinstance(choice, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if content is None and isinstance(message, dict) and message.get("tool_calls"):
                continue
            judged += 1
            if isinstance(content, list):
                content = _text_of(content)  # content parts (Mistral's thinking, then text)
            if not isinstance(content, str):
                return False
            try:
                value = orjson.loads(content)
            except orjson.JSONDecodeError:
                return False
            if not validator.is_valid(value):
                return False
        return True if judged else None


def _text_of(parts: list[Any]) -> str | None:
    """The text parts of content sent as a list of parts, joined; None when there are none."""
    texts = [
        p["text"]
        for p in parts
        if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
    ]
    return "".join(texts) if texts else None
