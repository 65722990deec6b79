import random

from mlxtg.worker.text import TextStream


class FakeDetok:
    """Emits each token's text immediately (mlx-lm's detokenizers hold back partial UTF-8)."""

    def __init__(self, pieces):
        self.pieces = pieces
        self.text = ""
        self.offset = 0

    def add_token(self, t):
        self.text += self.pieces[t]

    def finalize(self):
        pass

    @property
    def last_segment(self):
        seg = self.text[self.offset :]
        self.offset = len(self.text)
        return seg


def stream(pieces, stops):
    ts = TextStream(FakeDetok(pieces), stops)
    out = []
    for t in range(len(pieces)):
        out.append(ts.push(t))
        if ts.stopped:
            return "".join(out), True
    out.append(ts.finish())
    return "".join(out), False


def test_stop_string_is_never_emitted():
    text, stopped = stream(["Hel", "lo wo", "rld", "!"], ["o w"])
    assert (text, stopped) == ("Hell", True)


def test_stop_string_split_over_many_tokens():
    text, stopped = stream(list("abcSTOPdef"), ["STOP"])
    assert (text, stopped) == ("abc", True)


def test_partial_stop_prefix_is_released_at_the_end():
    text, stopped = stream(["abc", "ST"], ["STOP"])
    assert (text, stopped) == ("abcST", False)


def test_random_splits_match_reference():
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("ab c\n") for _ in range(30))
        stop = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 3)))
        cuts = sorted(rng.sample(range(1, len(s)), 8))
        pieces = [s[i:j] for i, j in zip([0, *cuts], [*cuts, len(s)], strict=True)]
        text, stopped = stream(pieces, [stop])
        i = s.find(stop)
        assert text == (s[:i] if i >= 0 else s)
        assert stopped == (i >= 0)


def test_real_detokenizer_never_splits_a_multibyte_character(tmp_path):
    from mlx_lm.utils import load_tokenizer
    from tiny_model import build_tokenizer

    build_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tok = load_tokenizer(tmp_path)
    text = "naïve café — 日本 €5 🙂 end"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # byte-level pieces split characters across tokens
    ts = TextStream(tok.detokenizer, [])
    pieces = [ts.push(t) for t in ids] + [ts.finish()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_a_continuation_keeps_its_leading_space(tmp_path):
    """Completions continue the prompt: " ready" after "life is" keeps its space (mlx-lm's
    streaming detokenizer drops it), and the tokens' bytes join to exactly the text."""
    from mlx_lm.utils import load_tokenizer
    from tiny_model import build_tokenizer

    from mlxtg.worker.text import TokenBytes

    build_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    tok = load_tokenizer(tmp_path)
    token_bytes = TokenBytes(tok._tokenizer)
    for text in [" ready.", "  two spaces", " café 🙂", "no space"]:
        ids = tok.encode(text, add_special_tokens=False)
        ts = TextStream(tok.detokenizer, [], token_bytes)
        out = "".join([ts.push(t) for t in ids] + [ts.finish()])
        assert out == text
        assert b"".join(bytes(token_bytes(t)[1]) for t in ids).decode() == text
        chat = TextStream(tok.detokenizer, [])  # a chat reply starts without the space
        assert "".join([chat.push(t) for t in ids] + [chat.finish()]) == text.removeprefix(" ")
