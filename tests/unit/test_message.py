"""The Message a sink sees: the payload decoded on demand from its stored JSON text."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pgqueue.payload import Undecodable
from pgqueue.sinks import Message

AT = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)


def _message(**fields: object) -> Message:
    return Message(id="m-1", sequence=7, topic="orders", key="k", created_at=AT, **fields)  # type: ignore[arg-type]


def test_a_message_read_from_the_database_decodes_its_payload_on_first_read() -> None:
    message = _message(payload_json='{"total": 12.5, "items": [1, 2]}')
    assert message.payload_json == '{"total": 12.5, "items": [1, 2]}'
    assert message.payload == {"total": 12.5, "items": [1, 2]}
    assert message.payload is message.payload  # decoded once


def test_a_message_built_in_python_encodes_its_payload_compactly() -> None:
    message = _message(payload={"note": "crème", "n": None})
    assert message.payload_json == '{"note":"crème","n":null}'
    assert _message(payload=None).payload_json == "null"


def test_the_two_forms_of_one_message_are_equal() -> None:
    assert _message(payload_json='{"a": [1]}') == _message(payload={"a": [1]})
    assert _message(payload={"a": 1}) != _message(payload={"a": 2})


def test_a_payload_nested_past_the_decoder_stays_text_and_reads_as_undecodable() -> None:
    deep = "[" * 5000 + "]" * 5000
    message = _message(payload_json=deep)
    assert message.payload_json == deep
    assert isinstance(message.payload, Undecodable)


def test_a_message_is_read_only_and_needs_a_payload() -> None:
    message = _message(payload={})
    with pytest.raises(AttributeError, match="read-only"):
        message.topic = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="payload"):
        _message()
    with pytest.raises(TypeError, match="JSON"):
        _message(payload={1j}).payload_json  # noqa: B018 - the property raises


def test_a_message_survives_pickle_copy_and_replace_with_its_stored_text() -> None:
    import copy
    import pickle

    message = _message(payload_json='{"n": 1e400}', headers={"h": "1"})
    for twin in (pickle.loads(pickle.dumps(message)), copy.copy(message), copy.deepcopy(message)):
        assert twin.payload_json == '{"n": 1e400}' and twin.headers == {"h": "1"}
        assert twin.id == message.id and twin.created_at == AT
    tagged = message.replace(headers={"h": "2"})
    assert tagged.payload_json == '{"n": 1e400}' and tagged.headers == {"h": "2"}
    assert message.replace(payload={"n": 2}).payload_json == '{"n":2}'


def test_a_payload_json_cannot_hold_is_refused_not_sent() -> None:
    with pytest.raises(ValueError, match="nan"):
        _message(payload={"x": float("nan")}).payload_json  # noqa: B018 - the property raises
    with pytest.raises(TypeError, match="payload_json must be str"):
        _message(payload_json=b"{}")
    with pytest.raises(TypeError, match="one of them"):
        _message(payload={}, payload_json="{}")
