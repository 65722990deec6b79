"""Streaming tool-call parsers, one module per output format.

The public interface (`make_parser`, `detect_format`, the delta types) lives in
`mlxtg.worker.tool_calls`; this package holds the implementations.
"""

from __future__ import annotations

from ._base import BaseParser, ParsedDelta, ToolCall, ToolCallDelta, new_call_id
from .hermes import HermesParser
from .llama3_json import Llama3JsonParser
from .mistral import MistralParser

PARSERS: dict[str, type[BaseParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}

__all__ = [
    "PARSERS",
    "BaseParser",
    "HermesParser",
    "Llama3JsonParser",
    "MistralParser",
    "ParsedDelta",
    "ToolCall",
    "ToolCallDelta",
    "new_call_id",
]
