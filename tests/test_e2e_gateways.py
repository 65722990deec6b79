"""End-to-end: `mlxtg up --gateways 2` runs two gateway processes on one port and one
supervisor (issue 13 item 4). Connections spread over both; streams, stored Responses
chains and /metrics work whichever gateway a request lands on; a stop drains both."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import psutil
import pytest
from conftest import API_KEY, start_server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"


def test_two_gateways_share_one_port_and_one_supervisor(tmp_path):
    srv = start_server(tmp_path / "home", ["--gateways", "2"])
    try:
        info = json.loads((srv.home / "run" / "server.json").read_text())
        assert len(info["gateway_pids"]) == 2
        # Fresh connections land on both gateways.
        seen = set()
        for _ in range(60):
            seen.add(srv.status()["gateway"]["pid"])
            if len(seen) == 2:
                break
        assert seen == set(info["gateway_pids"])

        # Concurrent streams (one connection each) all finish, through whichever gateway.
        async def streams() -> list[str]:
            async with openai.AsyncOpenAI(
                base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0
            ) as client:

                async def one(i: int) -> str:
                    stream = await client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": f"Count from 1 to {i + 3}."}],
                        max_tokens=24,
                        temperature=0,
                        stream=True,
                    )
                    return "".join([c.choices[0].delta.content or "" async for c in stream])

                return await asyncio.gather(*(one(i) for i in range(8)))

        assert all(asyncio.run(streams()))

        # A stored Responses chain, each turn on a new connection: the store is shared.
        previous = None
        for turn in range(4):
            with openai.OpenAI(base_url=f"{srv.url}/v1", api_key=API_KEY, max_retries=0) as c:
                r = c.responses.create(
                    model=MODEL,
                    input=f"Turn {turn}: say hello.",
                    previous_response_id=previous,
                    max_output_tokens=8,
                )
            previous = r.id
        assert r.status in ("completed", "incomplete")  # 8 tokens may cut it: still stored

        # /metrics adds up both gateways' counts.
        text = httpx.get(f"{srv.url}/metrics", headers=srv.headers).text
        ok = sum(float(v) for v in re.findall(r'mlxtg_requests_total\{status="200"\} (\S+)', text))
        assert ok >= 12
    finally:
        code = srv.stop()
    assert code == 0, srv.log.read_text()[-3000:]
    assert not any(psutil.pid_exists(p) for p in info["gateway_pids"])
