"""Gateway settings, passed by the supervisor through the environment (keys stay out of `ps`)."""

from __future__ import annotations

import json
import os

from pydantic import BaseModel, Field


class GatewaySettings(BaseModel):
    supervisor_endpoint: str
    host: str = "127.0.0.1"
    port: int = 5001
    api_keys: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_body_bytes: int = 32 << 20
    max_request_sequences: int = 256
    max_request_tokens: int = 1 << 20
    drain_timeout: float = 30.0
    # A listening socket inherited from `mlxtg up --gateways N` (shared by N gateways);
    # None: bind host:port here.
    listen_fd: int | None = None

    @classmethod
    def from_env(cls) -> GatewaySettings:
        raw = os.environ.get("MLXTG_GATEWAY_CONFIG")
        if not raw:
            raise SystemExit("MLXTG_GATEWAY_CONFIG is not set: start the gateway with `mlxtg up`")
        return cls.model_validate(json.loads(raw))
