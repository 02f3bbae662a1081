"""JSON encoding of job arguments, headers and messages: strict, sized, with useful errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pgqueue.errors import PayloadTooLarge

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
_MAX_DEPTH = 200


def _reused(encoder: json.JSONEncoder) -> Callable[[Any], str]:
    """``encoder.encode`` without building its C encoder anew on every call.

    ``JSONEncoder.encode`` makes a fresh C encoder per value, which cost as much as encoding
    a small job's arguments; a bulk enqueue encodes one value per job. This one is made
    once and has no cycle check (that needs per-call state): a cyclic value recurses until
    ``RecursionError``, which :func:`encode` turns into an error naming the path. Where the
    C accelerator is missing or behaves otherwise, ``encoder.encode`` itself is used.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    strings = (
        json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
        if encoder.ensure_ascii
        else json.encoder.encode_basestring  # type: ignore[attr-defined]
    )
    try:
        chunks = make(
            None,
            encoder.default,
            strings,
            encoder.indent,
            encoder.key_separator,
            encoder.item_separator,
            encoder.sort_keys,
            encoder.skipkeys,
            encoder.allow_nan,
        )

        def encode_once(value: Any) -> str:
            return "".join(chunks(value, 0))

        sample = {"a": [1, 2.5, None, True, 'é\n"', {"b": -0.0}], "": 10**30}
        if encode_once(sample) != encoder.encode(sample):
            return encoder.encode
    except Exception:
        return encoder.encode
    return encode_once


_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_encode_strict = _reused(_ENCODER)
# For values read back from jsonb (sinks re-encode headers): one encoder for all, since
# ``json.dumps`` with any keyword builds a new one per call.
_WIRE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
wire_json: Callable[[Any], str] = _reused(_WIRE_ENCODER)
"""Compact JSON text of a value that came from the database (UTF-8, no spaces)."""


def encode(value: Any, *, what: str = "args", max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode ``value`` as compact JSON text, or raise a precise error.

    ``TypeError`` names the path of a value JSON cannot hold (``args['items'][3]``);
    ``ValueError`` covers NaN/Infinity, lone surrogates and nesting deeper than the encoder
    handles (about 1,000 levels; the error then names the first path past 200);
    ``PayloadTooLarge`` fires before any SQL when the text exceeds ``max_bytes``.
    """
    try:
        text = _encode_strict(value)
    except (TypeError, ValueError, RecursionError):
        _explain(value, what, 0)
        raise
    try:
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{what} contains text that is not valid Unicode ({exc.reason}): "
            "PostgreSQL jsonb cannot store lone surrogates"
        ) from None
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {size} bytes of JSON, over the limit of {max_bytes}: store large data "
            "elsewhere (a table or object storage) and enqueue a reference to it"
        )
    if "\\u0000" in text:
        raise ValueError(f"{what} contains a NUL character, which PostgreSQL jsonb cannot store")
    return text


def _explain(value: Any, path: str, depth: int) -> None:
    """Walk ``value`` and raise an error naming the first offending path."""
    if depth > _MAX_DEPTH:
        raise ValueError(f"{path} nests deeper than {_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{path} is not valid Unicode (a lone surrogate?)") from None
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value!r}, which JSON cannot represent")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise TypeError(
                    f"{path} has a key of type {type(key).__name__}; JSON keys are text"
                )
            _explain(item, f"{path}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _explain(item, f"{path}[{index}]", depth + 1)
        return
    raise TypeError(
        f"{path} is a {type(value).__name__}, which is not JSON-serializable: "
        "pass plain dicts, lists, str, int, float, bool or None"
    )


class Undecodable:
    """Stands in for a stored value that cannot be decoded (corrupted by hand, or nested
    deeper than Python's parser goes): the job or message is dead-lettered, the process
    that claimed it keeps going."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Undecodable({self.error!r})"


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} does not fit a float")
    return value


# One decoder for every row: ``json.loads`` with any keyword builds a new decoder per call,
# which cost more than the parsing itself on the claim path.
_DECODER = json.JSONDecoder(parse_float=_finite)


def safe_loads(data: str | bytes) -> Any:
    """``json.loads`` that returns :class:`Undecodable` instead of raising, and refuses
    numbers a float cannot hold (jsonb keeps ``1e400``; Python would turn it into inf)."""
    if data == b"{}" or data == "{}":
        return {}  # the usual headers: skip the parser
    try:
        return _DECODER.decode(data if isinstance(data, str) else bytes(data).decode())
    except (ValueError, RecursionError) as exc:
        return Undecodable(f"{type(exc).__name__}: {exc}"[:500])


def loads_many(texts: Sequence[str]) -> list[Any]:
    """Decode many JSON texts (each one value, as jsonb prints them) in one parser call.

    A claimed batch decoded value by value spent more in the decoder's per-call overhead
    than in parsing. Any text that does not decode sends the whole batch through
    :func:`safe_loads`, so a bad value becomes :class:`Undecodable` on its own row.
    """
    if not texts:
        return []
    try:
        values = _DECODER.decode("[" + ",".join(texts) + "]")
    except (ValueError, RecursionError):
        return [safe_loads(text) for text in texts]
    if not isinstance(values, list) or len(values) != len(texts):
        return [safe_loads(text) for text in texts]
    return values
