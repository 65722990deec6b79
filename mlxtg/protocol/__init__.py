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
from .specs import ConstraintKind, EngineSettings, GuidedSpec, ModelLoad, SamplingParams

__all__ = [
    "Abort",
    "Accepted",
    "Config",
    "ConstraintKind",
    "Control",
    "ControlOp",
    "ControlReply",
    "Delta",
    "EngineSettings",
    "Error",
    "ErrorKind",
    "FinishReason",
    "Generate",
    "GuidedSpec",
    "Heartbeat",
    "Hello",
    "LogprobEntry",
    "Message",
    "ModelLoad",
    "MsgType",
    "Output",
    "ProtocolError",
    "Ready",
    "SamplingParams",
    "decode",
    "encode",
]
