"""Engine settings a worker receives in its CONFIG message."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class EngineSettings:
    max_batch: int = 32  # sequences decoded together
    max_queued: int = 128  # requests waiting for prefill before 429
    prefill_chunk: int = 512  # prompt tokens per step, so long prompts never stall streams
    idle_prefill_chunk: int = 2048  # the budget when nothing runs: no stream to stall
    batched_prefill: bool = True  # False: every prompt alone at batch 1 (batch-invariant)
    cache_ram_bytes: int = 2 << 30  # hot prefix cache budget
    cache_min_tokens: int = 16  # shorter matches are not worth reusing
    cache_disk_bytes: int = 10 << 30  # disk tier budget; 0 disables it
    cache_slots: int = 50  # conversations kept on disk
    cache_block_tokens: int = 128  # disk blocks: a request reads only its prefix's blocks
    cache_dir: str = ""  # default: $MLXTG_HOME/kv-cache
    heartbeat_s: float = 1.0

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> EngineSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
