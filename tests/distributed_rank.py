"""One rank of a sharded engine run for tests/test_distributed.py (or the whole run alone).

    python tests/distributed_rank.py MODEL SPLIT OUT.json

Under MLX_RANK/MLX_HOSTFILE it joins the group, shards the model and leads (rank 0) or
follows; alone it runs the same script in one process. Every rank writes the tokens its own
engine produced, so the test compares ranks with each other and with the single process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from mlxtg.models import ModelSpec
from mlxtg.protocol import Abort, Generate, Output
from mlxtg.worker import distributed
from mlxtg.worker.engine import Engine
from mlxtg.worker.loader import load
from mlxtg.worker.params import SamplingParams
from mlxtg.worker.prefix_cache import RamPrefixCache
from mlxtg.worker.preprocess import Preprocessor
from mlxtg.worker.prompt_cache import PromptCache
from mlxtg.worker.scheduler import Scheduler

PROMPTS = [
    "the quick brown fox",
    "weather in oslo is",
    "json schema number string object array",
    "hello world",
    "the quick brown fox",  # a repeat: its prefix comes from the RAM cache
]


def generate(rid: str, text: str, n: int = 1, **params: Any) -> Generate:
    p = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, "ignore_eos": True, **params})
    return Generate(
        request_id=rid, model="m", params=p, n=n, messages=[{"role": "user", "content": text}]
    )


def schedule() -> dict[int, list[Any]]:
    """Which inputs arrive before which step: greedy prompts, a seeded and an unseeded
    sampled one with n=2, a late arrival, and an abort."""
    plan: dict[int, list[Any]] = {0: [generate(f"g{i}", t) for i, t in enumerate(PROMPTS[:4])]}
    plan[0].append(generate("seeded", "lazy dog", temperature=1.0, seed=7, n=2))
    plan[0].append(generate("unseeded", "rain snow", temperature=1.0))
    plan[2] = [generate("late", PROMPTS[4]), generate("doomed", "tool call function")]
    plan[4] = [Abort(request_id="doomed")]
    return plan


def main() -> None:
    model_path, split, out = sys.argv[1:4]
    group = distributed.init_group() if distributed.in_group() else None
    loaded = load(ModelSpec(model_id_or_path=model_path))
    if group is not None:
        import mlx.core as mx

        distributed.shard(loaded.model, group, split)
        mx.eval(loaded.model.parameters())
    engine = Engine(
        loaded,
        PromptCache(RamPrefixCache(1 << 28, min_tokens=4)),
        scheduler=Scheduler(max_batch=8, max_queued=32, chunk_tokens=64),
    )
    tokens: dict[str, list[int]] = {}

    def record(messages: list[Any]) -> None:
        for m in messages:
            if isinstance(m, Output):
                for d in m.deltas:
                    tokens.setdefault(f"{d.request_id}/{d.index}", []).extend(d.token_ids)

    prepare = Preprocessor(loaded)
    share = None
    if group is not None:
        share = distributed.StepShare(distributed.StepChannel.open(group))
    if share is not None and not share.leader:
        distributed.follow(engine, prepare, share, outputs=record)
    else:
        seeding = distributed.Seeding(prepare) if share is not None else prepare
        plan = schedule()
        step = 0
        while step <= max(plan) or not engine.idle:
            items = [seeding(m) if isinstance(m, Generate) else m for m in plan.get(step, [])]
            if share is not None:
                share.lead(items)
            record(engine.step(items))
            step += 1
        if share is not None:
            share.lead([], stop=True)
    with open(out, "w") as f:
        json.dump(tokens, f)


if __name__ == "__main__":
    main()
