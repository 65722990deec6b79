"""Prompts provably too long for the context are refused before tokenising (a bound from the
vocabulary's longest token), and logit_bias is bounded by the vocabulary and checked cheaply."""

from __future__ import annotations

import pytest
from tiny_model import build_model

from mlxtg.models import demo_spec
from mlxtg.protocol import ErrorKind, Generate
from mlxtg.worker.params import RequestError, SamplingParams


@pytest.fixture(scope="module")
def demo():
    from mlxtg.worker.loader import load
    from mlxtg.worker.preprocess import Preprocessor

    return Preprocessor(load(demo_spec()))


def completion(text: str, max_tokens: int | None = 8, **kw) -> Generate:
    params = SamplingParams(max_tokens=max_tokens)
    return Generate(request_id="r", model="m", params=params, prompt=text, **kw)


def test_demo_bound_is_its_longest_token(demo):
    assert demo.bound is not None
    assert demo.bound.per_token == 16  # "</tool_response>", an added token
    hf = demo.tokenizer._tokenizer
    texts = [
        "Hello, world! " * 50,
        "     \n\n\t  " * 40,
        "</tool_response>" * 30 + "<|im_end|>" * 7,
        "żółć ☃ 日本語 🙂 e\u0301 \x00\x1f" * 20,
        "Photosynthesis photosynthesis " * 30,
    ]
    for text in texts:  # never more than the real count
        assert demo.bound.min_tokens(text) <= len(hf.encode(text, add_special_tokens=False))


def test_a_prompt_at_the_limit_passes_and_one_token_more_is_refused_untokenised(demo, monkeypatch):
    ctx = demo.loaded.context_length
    # The worst case for the bound: every token is the longest one, so it is exact.
    exact = "</tool_response>" * (ctx - 8)
    req = demo(completion(exact, add_special_tokens=False))
    assert len(req.prompt) == ctx - 8 and req.payload.max_tokens == 8
    # An ordinary prompt just under the limit passes too (about 4 characters a token).
    words = "The quick brown fox jumps over the lazy dog. " * 400
    ids = demo.tokenizer.encode(words, add_special_tokens=False)[: ctx - 8]
    under = demo.tokenizer.decode(ids)
    assert len(demo(completion(under, add_special_tokens=False)).prompt) <= ctx - 8

    def no_tokenising(*a, **k):
        raise AssertionError("tokenised a prompt that cannot fit")

    monkeypatch.setattr(demo.tokenizer._tokenizer, "encode", no_tokenising)
    with pytest.raises(RequestError) as exc:
        demo(completion(exact + "</tool_response>", add_special_tokens=False))
    assert exc.value.kind == ErrorKind.CONTEXT_OVERFLOW and exc.value.param == "max_tokens"
    assert f"at least {ctx + 1} tokens" in exc.value.message
    huge = "x" * 5_000_000
    with pytest.raises(RequestError) as exc:
        demo(completion(huge, max_tokens=None))
    assert exc.value.kind == ErrorKind.CONTEXT_OVERFLOW and exc.value.param == "messages"
    chat = Generate(
        request_id="c",
        model="m",
        params=SamplingParams(max_tokens=8),
        messages=[{"role": "user", "content": huge}],
    )
    with pytest.raises(RequestError) as exc:
        demo(chat)
    assert exc.value.kind == ErrorKind.CONTEXT_OVERFLOW


def test_tokenize_only_has_no_context_limit(demo):
    # lm-eval tokenises whole documents to cut them into windows.
    text = "</tool_response>" * (demo.loaded.context_length + 10)
    msg = completion(text, tokenize_only=True, add_special_tokens=False)
    assert demo.tokenize(msg).prompt_tokens == demo.loaded.context_length + 10


def test_token_id_prompts_are_measured_before_their_ids_are_checked(demo):
    too_many = [10**9] * (demo.loaded.context_length + 1)
    msg = Generate(request_id="r", model="m", params=SamplingParams(), prompt_token_ids=too_many)
    with pytest.raises(RequestError) as exc:
        demo(msg)
    assert exc.value.kind == ErrorKind.CONTEXT_OVERFLOW


def fast_tokenizer(model, normalizer=None, pre_tokenizer=None, added=()):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens(list(added))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_the_bound_only_trusts_tokenizers_that_keep_every_character():
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers

    from mlxtg.worker.length_bound import WHITESPACE, LengthBound, _longest_decomposition

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"ĠHello": 256}
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)

    def bpe(**kw):
        return models.BPE(vocab=dict(vocab), merges=[], **kw)

    plain = LengthBound.of(fast_tokenizer(bpe(), pre_tokenizer=byte_level))
    assert plain == LengthBound(per_token=6)
    # NFC may compose up to 4 characters into one.
    nfc = LengthBound.of(fast_tokenizer(bpe(), normalizers.NFC(), byte_level))
    assert _longest_decomposition() == 4 and nfc == LengthBound(per_token=24)
    # An added token that strips whitespace may swallow any run of it.
    mask = AddedToken("<mask>", lstrip=True, special=True)
    strips = LengthBound.of(fast_tokenizer(bpe(), pre_tokenizer=byte_level, added=[mask]))
    assert strips is not None and strips.strips_whitespace
    assert strips.min_tokens(" \n\t\u3000" * 1000 + "abcdef") == 1
    assert "".join(c for c in map(chr, range(0x110000)) if c.isspace()) == WHITESPACE
    # Tokenizers that may drop characters get no bound at all.
    dropping = [
        fast_tokenizer(bpe(), normalizers.Strip(), byte_level),  # strips text
        fast_tokenizer(bpe(), pre_tokenizer=pre_tokenizers.Whitespace()),  # drops spaces
        fast_tokenizer(models.BPE(vocab={"a": 0}, merges=[])),  # drops unknown characters
        fast_tokenizer(models.BPE(vocab={"a": 0, "?": 1}, merges=[], unk_token="?", fuse_unk=True)),
        fast_tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
    ]
    assert [LengthBound.of(t) for t in dropping] == [None] * len(dropping)
    fallback = models.BPE(vocab={"<0x20>": 0, "a": 1}, merges=[], byte_fallback=True)
    assert LengthBound.of(fast_tokenizer(fallback)) == LengthBound(per_token=6)


def test_logit_bias_is_bounded_by_the_vocabulary_and_checked_cheaply(demo):
    vocab = demo.loaded.vocab_size

    def with_bias(bias):
        params = SamplingParams(max_tokens=4, logit_bias=bias)
        return Generate(request_id="r", model="m", params=params, prompt="Hello")

    # Keys that are not token ids never arrive: decoding refuses them (test_protocol).
    full = {i: -1.0 for i in range(vocab)}
    assert len(demo(with_bias(full)).payload.params.logit_bias) == vocab
    with pytest.raises(RequestError) as exc:
        demo(with_bias({i: 1.0 for i in range(1_000_000)}))  # more entries than tokens
    assert exc.value.param == "logit_bias" and f"{vocab} tokens" in exc.value.message
    with pytest.raises(RequestError) as exc:
        demo(with_bias({5: 1.0, vocab: 2.0}))
    assert exc.value.param == "logit_bias" and f"id {vocab} is outside" in exc.value.message


def test_tiny_model_tokenizers_get_a_bound(tmp_path):
    from transformers import AutoTokenizer

    from mlxtg.worker.preprocess import LengthBound

    path = build_model(tmp_path / "m")
    assert LengthBound.of(AutoTokenizer.from_pretrained(path)) is not None
