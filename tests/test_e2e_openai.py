"""End-to-end: the real `mlxtg up` driven by the official openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from conftest import API_KEY, Server

pytestmark = pytest.mark.slow

MODEL = "mlxtg-demo"
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]


def test_models_health_ready(server: Server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["state"] == "loaded"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"


def test_models_retrieve_has_context_length_and_created(client):
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.created > 1_600_000_000
    assert model.model_extra["context_length"] == model.model_extra["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found" and MODEL in err.value.body["message"]


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.role == "assistant"
    assert full.usage.prompt_tokens > 0
    assert full.usage.completion_tokens <= 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


async def test_async_client_stream_and_concurrency(aclient):
    async def one(i: int) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    # Concurrent greedy streams carry exactly what each request gives alone, unstreamed.
    for i, text in enumerate(texts):
        alone = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=16,
            temperature=0,
        )
        assert text and text == alone.choices[0].message.content


def test_completions_prompt_list_n_and_token_ids(client):
    r = client.completions.create(
        model=MODEL, prompt=["Once upon", "The weather"], n=2, max_tokens=5, temperature=0.8, seed=3
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    tok = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert tok.usage.prompt_tokens == 4
    echo = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, temperature=0, echo=True
    )
    assert echo.choices[0].text.startswith("Hello")


def test_completions_stream_interleaves_choices_by_index(client):
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=["a", "b"], n=2, max_tokens=4, temperature=1.0, stream=True
        )
    )
    indices = {c.choices[0].index for c in chunks if c.choices}
    assert indices == {0, 1, 2, 3}


def test_stop_strings_are_not_emitted(client):
    base = client.completions.create(model=MODEL, prompt="The", max_tokens=30, temperature=0)
    text = base.choices[0].text
    if len(text) < 6:
        pytest.skip("model produced too little text to pick a stop string")
    stop = text[3:6]
    cut = client.completions.create(
        model=MODEL, prompt="The", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="The", max_tokens=30, temperature=0, stop=[stop], stream=True
        )
    )
    assert streamed == cut.choices[0].text


def test_logprobs_chat_and_completions_including_streams(client):
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    comp = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=2
    )
    assert len(comp.choices[0].logprobs.tokens) == 4
    assert all(len(t) == 2 for t in comp.choices[0].logprobs.top_logprobs)
    cs = client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=4, temperature=0, logprobs=2, stream=True
    )
    assert (
        sum(len(c.choices[0].logprobs.tokens) for c in cs if c.choices and c.choices[0].logprobs)
        == 4
    )


def test_seed_reproducible_and_penalties_bias_accepted(client):
    kw = dict(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"top_k": 50, "min_p": 0.01},
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b
    penalised = dict(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        temperature=0,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        logprobs=True,
        extra_body={"repetition_penalty": 1.2},
    )
    free = client.chat.completions.create(**penalised)
    r = client.chat.completions.create(**penalised, logit_bias={"5": 100})
    # A +100 bias makes token 5 the greedy choice at every step, penalties or not.
    biased = [e.token for e in r.choices[0].logprobs.content]
    assert r.usage.completion_tokens == 8 and len(biased) == 8 and len(set(biased)) == 1
    assert [e.token for e in free.choices[0].logprobs.content] != biased


@pytest.mark.parametrize(
    "kwargs,status,param",
    [
        (dict(temperature=5), 400, "temperature"),
        (dict(max_tokens=10**6), 400, "max_tokens"),
        (dict(logit_bias={"999999": 1}), 400, "logit_bias"),
        (dict(model="nope"), 404, "model"),
        (dict(n=0), 400, "n"),
        (dict(top_logprobs=3), 400, None),
    ],
)
def test_bad_requests_get_openai_errors(client, kwargs, status, param):
    args = dict(model=MODEL, messages=HELLO, max_tokens=4) | kwargs
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(**args)
    assert exc.value.status_code == status
    err = exc.value.body
    assert set(err) >= {"message", "type", "param", "code"}
    if param:
        assert err["param"] == param


def test_context_overflow_names_both_numbers(client, server: Server):
    status = server.status()
    ctx = status["models"][0]["worker"]["facts"]["context_length"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=ctx)
    msg = exc.value.body["message"]
    assert str(ctx) in msg and "prompt" in msg
    assert exc.value.body["code"] == "context_length_exceeded"


def test_auth_required(server: Server):
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_malformed_json_is_400_not_500(server: Server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        headers={**server.headers, "content-type": "application/json"},
    )
    assert r.status_code == 400
    assert "error" in r.json()
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        headers=server.headers,
    )
    assert r.status_code == 400


def test_unknown_fields_are_ignored(server: Server):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "max_tokens": 2, "some_future_field": {"x": 1}},
        headers=server.headers,
        timeout=60,
    )
    assert r.status_code == 200


def test_status_cli_shows_three_roles(server: Server):
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "mlxtg", "status", "--json"],
        env={**server.env(), "MLXTG_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["gateway"]["pid"] and data["supervisor"]["pid"]
    worker = data["models"][0]["worker"]
    assert worker["pid"] and worker["state"] == "ready"
    text = subprocess.run(
        [sys.executable, "-m", "mlxtg", "status", "--api-key", API_KEY],
        env=server.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gateway" in text and "supervisor" in text and "worker" in text


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes lone surrogates as \\udXXX, as a JSON client would send them.
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def test_explicit_nulls_mean_the_defaults(server: Server):
    nulls = dict.fromkeys(
        ("n", "temperature", "top_p", "frequency_penalty", "presence_penalty", "stream", "logprobs")
    )
    chat = _post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 3, **nulls},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["refusal"] is None
    comp = _post(
        server,
        "/v1/completions",
        {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "echo": None, **nulls},
    )
    assert comp.status_code == 200, comp.text


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"seed": 2**70}, "seed"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi", "extra": 2**70}]}, "64-bit"),
        ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "Unicode"),
        ({"stop": ["\udfff"]}, "Unicode"),
    ],
)
def test_out_of_range_numbers_and_bad_unicode_are_400(server: Server, body: dict, needle: str):
    r = _post(
        server, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_tokens": 2, **body}
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] or r.json()["error"]["param"] == needle


def test_negative_seed_means_random(server: Server):
    r = _post(
        server,
        "/v1/chat/completions",
        {"model": MODEL, "messages": HELLO, "max_tokens": 2, "seed": -1},
    )
    assert r.status_code == 200, r.text


def test_stream_chunks_carry_refusal(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=3, stream=True, logprobs=True
        )
    )
    assert chunks[0].choices[0].delta.refusal is None
    assert "refusal" in chunks[0].choices[0].delta.model_fields_set
    with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert with_lp and "refusal" in with_lp[0].choices[0].logprobs.model_fields_set


def test_unknown_route_is_an_openai_404_naming_the_endpoints(server: Server):
    r = _post(server, "/v1/chat/complete", {"model": MODEL})
    assert r.status_code == 404
    err = r.json()["error"]
    assert "/v1/chat/completions" in err["message"] and err["code"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_keeps_its_leading_space_and_matches_its_logprobs(client, stream):
    """Issue 11 item 4: a completion continues the prompt, so " ready" keeps its space (mlx-lm's
    detokenizer trims it), and the logprobs tokens join to exactly the text (no end token)."""
    prompt = "The meaning of life is"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    if stream:
        chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
        text = "".join(c.text for c in chunks)
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        finish = [c.finish_reason for c in chunks if c.finish_reason][-1]
    else:
        choice = client.completions.create(**kw).choices[0]
        text, tokens, finish = choice.text, choice.logprobs.tokens, choice.finish_reason
    assert text.startswith(" ") and text.strip()  # the demo model says " ready." here
    assert "".join(tokens) == text
    assert finish == "stop"  # ended by the end token, which is in neither
    echo = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echo.choices[0].text == prompt + text


def test_tokenize_and_detokenize_match_what_generation_sees(server: Server, client):
    """vLLM's /tokenize and /detokenize: the tokens are the prompt a generation prefills."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.url
    text = "The meaning of life is"
    tok = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": text}, headers=headers).json()
    usage = client.completions.create(model=MODEL, prompt=text, max_tokens=1).usage
    assert tok["count"] == len(tok["tokens"]) == usage.prompt_tokens
    assert tok["max_model_len"] == client.models.retrieve(MODEL).model_extra["max_model_len"]
    back = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}, headers=headers)
    assert back.json() == {"prompt": text}
    chat = httpx.post(f"{url}/tokenize", json={"model": MODEL, "messages": HELLO}, headers=headers).json()
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert chat["count"] == r.usage.prompt_tokens
    # Errors are OpenAI-shaped 400s / 404s naming the field.
    bad = httpx.post(f"{url}/detokenize", json={"model": MODEL, "tokens": [10**6]}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "a", "messages": HELLO}, headers=headers)
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    nope = httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "a"}, headers=headers)
    assert nope.status_code == 404 and nope.json()["error"]["code"] == "model_not_found"
    assert httpx.post(f"{url}/tokenize", json={"model": MODEL, "prompt": "a"}).status_code == 401


def test_tokenizer_info_and_tokenize_without_a_model_as_lm_eval_sends(server: Server):
    """lm-eval-harness's remote tokenizer: GET /tokenizer_info, then /tokenize with no model
    and add_special_tokens false (the first configured model answers)."""
    from mlxtg.models import demo_spec
    from mlxtg.worker.loader import load

    headers = {"Authorization": f"Bearer {API_KEY}"}
    info = httpx.get(f"{server.url}/tokenizer_info", headers=headers).json()
    tokenizer = load(demo_spec()).tokenizer
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"]
    assert info["model_max_length"] > 0
    text = "Hello world"
    plain = httpx.post(
        f"{server.url}/tokenize",
        json={"prompt": text, "add_special_tokens": False},
        headers=headers,
    ).json()
    assert plain["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": plain["tokens"]}, headers=headers)
    assert back.json() == {"prompt": text}
    chat = httpx.post(
        f"{server.url}/tokenize",
        json={"messages": HELLO, "add_special_tokens": False},
        headers=headers,
    )
    assert chat.status_code == 400 and "text prompt" in chat.json()["error"]["message"]


def test_echo_logprobs_score_every_prompt_token_like_lm_eval(client):
    """What lm-eval-harness `local-completions` sends for log-likelihood: token ids, echo,
    logprobs 1, max_tokens 1; it reads entries [ctxlen:-1]. Values match mlx-lm in process."""
    import mlx.core as mx
    import numpy as np

    from mlxtg.models import demo_spec
    from mlxtg.worker.loader import load

    loaded = load(demo_spec())
    tokens = loaded.tokenizer.encode("The capital of France is Paris, and the sky is blue.")
    kw = dict(model=MODEL, prompt=tokens, echo=True, logprobs=1, temperature=0)
    r = client.completions.create(**kw, max_tokens=1)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(tokens) + 1  # every prompt token, then the reply's
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert r.choices[0].text.startswith(loaded.tokenizer.decode(tokens))
    logits = loaded.model(mx.array(tokens)[None])[0].astype(mx.float32)
    ref = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    want = ref[np.arange(len(tokens) - 1), tokens[1:]]
    assert np.abs(np.array(lp.token_logprobs[1 : len(tokens)]) - want).max() <= 1e-4
    for t, top in enumerate(lp.top_logprobs[1 : len(tokens)]):
        assert abs(max(top.values()) - ref[t].max()) <= 1e-4  # lm-eval's is_greedy check

    zero = client.completions.create(**kw, max_tokens=0)
    assert zero.choices[0].finish_reason == "length" and zero.usage.completion_tokens == 0
    assert zero.choices[0].logprobs.token_logprobs == lp.token_logprobs[: len(tokens)]
    streamed = list(client.completions.create(**kw, max_tokens=3, stream=True))
    first = streamed[0].choices[0].logprobs
    assert first.token_logprobs[: len(tokens)] == lp.token_logprobs[: len(tokens)]
    text = client.completions.create(
        model=MODEL, prompt="Paris is", echo=True, logprobs=0, max_tokens=2, temperature=0
    )
    assert text.choices[0].text.startswith("Paris is")
    assert text.choices[0].logprobs.token_logprobs[0] is None
