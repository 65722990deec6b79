"""End-to-end: chat logprobs entries join to exactly the reply, also when the reply's first
token starts with a space that the reply drops (found by the soak: " air" vs "air")."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
ASK = [{"role": "user", "content": "Say something about bread?"}]


def test_chat_logprobs_join_to_the_content_streamed_and_not(client):
    for seed in range(6):
        kw = dict(model=MODEL, messages=ASK, max_tokens=4, temperature=1.0, seed=seed, logprobs=True, top_logprobs=2)
        r = client.chat.completions.create(**kw)
        entries = r.choices[0].logprobs.content
        assert "".join(e.token for e in entries) == r.choices[0].message.content
        assert bytes(b for e in entries for b in e.bytes).decode() == r.choices[0].message.content
        chunks = list(client.chat.completions.create(**kw, stream=True))
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "".join(e.token for e in streamed) == text == r.choices[0].message.content
