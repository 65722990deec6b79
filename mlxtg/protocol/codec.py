"""msgpack codec for protocol messages: two frames, `[type, body]`.

The body is a msgpack map of the message's fields, decoded with msgspec into the message's
type: every nested record is checked too (types, enums, no unknown fields). Deltas and
logprobs are arrays of field values (`Row`) to keep per-step output small and fast.
"""

from __future__ import annotations

import msgspec

from .messages import MESSAGE_CLASSES, Message, MsgType


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of the closed set."""


_ENCODER = msgspec.msgpack.Encoder()
_DECODERS: dict[MsgType, msgspec.msgpack.Decoder[Message]] = {
    mtype: msgspec.msgpack.Decoder(cls) for mtype, cls in MESSAGE_CLASSES.items()
}
_TYPES: dict[bytes, MsgType] = {m.value.encode("ascii"): m for m in MESSAGE_CLASSES}


def encode(msg: Message) -> list[bytes]:
    """Encode a message as the two frames `[type, body]`. Raises OverflowError for an int
    msgpack cannot hold and UnicodeEncodeError for a lone surrogate in a string."""
    return [msg.TYPE.value.encode("ascii"), _ENCODER.encode(msg)]


def decode(frames: list[bytes]) -> Message:
    """Decode `[type, body]` frames; raises ProtocolError on anything malformed."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    mtype = _TYPES.get(bytes(frames[0]))
    if mtype is None:
        raise ProtocolError(f"unknown message type {bytes(frames[0][:32])!r}")
    try:
        return _DECODERS[mtype].decode(frames[1])
    except msgspec.DecodeError as exc:  # ValidationError too: a wrong, missing or extra field
        raise ProtocolError(f"{mtype}: {exc}") from exc


def request_id_of(frames: list[bytes]) -> str | None:
    """The `request_id` of a message that failed to decode, when its body is still a map
    that holds one: the receiver can then fail that request instead of dropping it, so its
    client gets an error rather than waiting for a reply that never comes."""
    if len(frames) != 2:
        return None
    try:
        body = msgspec.msgpack.decode(frames[1])
    except msgspec.DecodeError:
        return None
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else None
