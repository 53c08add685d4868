"""Structured output, the one way for every backend: schema, constrained call, validation, retries.

The backend constrains decoding to the JSON schema where it can; whatever comes back is still
parsed and validated with pydantic here. An answer that does not validate is retried with the
error named, and after the last retry raised as :class:`LLMOutputError`, never accepted.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from typing import Any

from pydantic import BaseModel, ValidationError

from ehrflow.llm.base import LLM, ChatMessage, LLMOutputError, T

log = logging.getLogger(__name__)

_SCHEMA_INSTRUCTION = "Answer with one JSON object, nothing else, that matches this JSON schema:\n"


@cache
def json_schema_for(output_type: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema handed to constrained decoding. Warns (once per type) about unbounded
    arrays and strings: small models loop inside them until ``max_tokens`` and never close the JSON."""
    schema = output_type.model_json_schema()
    loose = unbounded_paths(schema)
    if loose:
        log.warning(
            "%s: unbounded %s in the output schema; set maxItems/maxLength or small models may not terminate",
            output_type.__name__,
            ", ".join(loose),
        )
    return schema


def unbounded_paths(schema: dict[str, Any]) -> list[str]:
    """Paths of arrays without ``maxItems`` and free strings without ``maxLength`` (``$defs`` included)."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "array" and "maxItems" not in node:
                found.append(path or "<root>")
            if kind == "string" and not ({"maxLength", "enum", "const", "format"} & node.keys()):
                found.append(path or "<root>")
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(schema, "")
    return found


def extract_json(text: str) -> Any:
    """The first JSON value in an answer, tolerating code fences and chatter around it."""
    stripped = text.strip()
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        pass
    start = stripped.find("{")
    if start < 0:
        raise ValueError("the answer holds no JSON object")
    try:
        value, _ = json.JSONDecoder().raw_decode(stripped, start)
    except json.JSONDecodeError as exc:
        # The position, not the text: answers may quote patient notes.
        raise ValueError(f"the answer is not valid JSON ({exc.msg} at char {exc.pos})") from None
    return value


def parse_output(text: str, output_type: type[T]) -> T:
    """Parse and validate one answer; raises ``ValueError`` (not JSON) or ``ValidationError``."""
    return output_type.model_validate(extract_json(text))


def describe_error(error: ValidationError | ValueError) -> str:
    """A short, content-free description of why an answer was rejected (field paths and reasons)."""
    if isinstance(error, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in error.errors()[:5]]
        more = error.error_count() - len(parts)
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    return str(error)


def with_schema_instruction(messages: list[ChatMessage], schema: dict[str, Any]) -> list[ChatMessage]:
    """Show the schema in the system message: backends without constrained decoding only see it there."""
    instruction = _SCHEMA_INSTRUCTION + json.dumps(schema, separators=(",", ":"))
    if messages[0].role == "system":
        first = ChatMessage(role="system", content=f"{messages[0].content}\n\n{instruction}")
        return [first, *messages[1:]]
    return [ChatMessage(role="system", content=instruction), *messages]


def generate_structured(
    llm: LLM,
    messages: list[ChatMessage],
    output_type: type[T],
    *,
    retries: int,
    max_tokens: int | None = None,
    temperature: float | None = None,
) -> T:
    """Ask for ``output_type`` up to ``retries + 1`` times; return the first answer that validates.

    A retry re-sends the original conversation plus a note naming the previous error (not the
    previous answer, which may be a long loop that would crowd the context window).
    """
    schema = json_schema_for(output_type)
    base = with_schema_instruction(messages, schema)
    conversation = base
    attempts = retries + 1
    last_text = ""
    last_error: ValidationError | ValueError | None = None
    for attempt in range(1, attempts + 1):
        completion = llm.complete(conversation, json_schema=schema, max_tokens=max_tokens, temperature=temperature)
        try:
            return parse_output(completion.text, output_type)
        except (ValidationError, ValueError) as exc:
            last_text, last_error = completion.text, exc
            reason = describe_error(exc)
            log.warning("%s: attempt %d/%d rejected: %s", output_type.__name__, attempt, attempts, reason)
            note = (
                f"Your previous answer was rejected: {reason}. "
                "Reply again with only a JSON object that matches the schema."
            )
            conversation = [*base, ChatMessage(role="user", content=note)]
    assert last_error is not None
    raise LLMOutputError(
        f"{output_type.__name__}: the model's answer did not validate ({describe_error(last_error)})",
        raw_text=last_text,
        error=last_error,
        attempts=attempts,
    )
