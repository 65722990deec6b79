"""Wire protocol between gateway, supervisor and workers (imports nothing heavy)."""

from .codec import ProtocolError, decode, encode
from .errors import ErrorKind
from .messages import (
    Abort,
    Accepted,
    Config,
    Control,
    ControlOp,
    ControlReply,
    Delta,
    Error,
    FinishReason,
    Generate,
    Heartbeat,
    Hello,
    LogprobEntry,
    Message,
    MsgType,
    Output,
    Ready,
)

__all__ = [
    "Abort",
    "Accepted",
    "Config",
    "Control",
    "ControlOp",
    "ControlReply",
    "Delta",
    "Error",
    "ErrorKind",
    "FinishReason",
    "Generate",
    "Heartbeat",
    "Hello",
    "LogprobEntry",
    "Message",
    "MsgType",
    "Output",
    "ProtocolError",
    "Ready",
    "decode",
    "encode",
]
