"""msgpack codec for protocol messages: two frames, `[type, body]`.

The body is a msgpack map of the dataclass fields. Nested messages (deltas, logprobs) are
encoded as arrays of field values to keep per-step output small and fast to pack.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from .messages import MESSAGE_CLASSES, Message, MsgType


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of the closed set."""


def _to_plain(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        nested = msg.NESTED.get(f.name)
        if nested is not None and value is not None:
            value = [_to_row(v) for v in value]
        out[f.name] = value
    return out


def _to_row(msg: Message) -> list[Any]:
    row = []
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        nested = msg.NESTED.get(f.name)
        if nested is not None and value is not None:
            value = [_to_row(v) for v in value]
        row.append(value)
    return row


def _from_row(cls: type[Message], row: list[Any]) -> Message:
    names = [f.name for f in dataclasses.fields(cls)]
    if len(row) != len(names):
        raise ProtocolError(f"{cls.__name__}: expected {len(names)} fields, got {len(row)}")
    kwargs = dict(zip(names, row, strict=True))
    _decode_nested(cls, kwargs)
    return cls(**kwargs)


def _decode_nested(cls: type[Message], kwargs: dict[str, Any]) -> None:
    for name, (sub, _is_list) in cls.NESTED.items():
        value = kwargs.get(name)
        if value is not None:
            kwargs[name] = [_from_row(sub, row) for row in value]


def encode(msg: Message) -> list[bytes]:
    """Encode a message as the two frames `[type, body]`."""
    body = msgpack.packb(_to_plain(msg), use_bin_type=True)
    return [msg.TYPE.value.encode("ascii"), body]


def decode(frames: list[bytes]) -> Message:
    """Decode `[type, body]` frames; raises ProtocolError on anything malformed."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    try:
        mtype = MsgType(frames[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"unknown message type {frames[0][:32]!r}") from exc
    cls = MESSAGE_CLASSES[mtype]
    try:
        body = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise ProtocolError(f"{mtype}: undecodable body") from exc
    if not isinstance(body, dict):
        raise ProtocolError(f"{mtype}: body is not a map")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(body) - known
    if unknown:
        raise ProtocolError(f"{mtype}: unknown fields {sorted(unknown)}")
    try:
        _decode_nested(cls, body)
        return cls(**body)
    except TypeError as exc:
        raise ProtocolError(f"{mtype}: {exc}") from exc
