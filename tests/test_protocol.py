import msgpack
import pytest

from mlxtg.protocol import (
    Abort,
    Accepted,
    Control,
    ControlOp,
    ControlReply,
    Delta,
    Error,
    ErrorKind,
    Generate,
    Hello,
    LogprobEntry,
    MsgType,
    Output,
    ProtocolError,
    Ready,
    decode,
    encode,
)


@pytest.mark.parametrize(
    "msg",
    [
        Hello(worker_id="w1", pid=42),
        Ready(worker_id="w1", model="m", context_length=2048, fingerprint="ab", vocab_size=10),
        Generate(
            request_id="r",
            model="m",
            params={"temperature": 0.0},
            messages=[{"role": "user", "content": "hi"}],
            n=2,
        ),
        Generate(request_id="r", model="m", params={}, prompt_token_ids=[1, 2, 3]),
        Accepted(request_id="r", prompt_tokens=12, cached_tokens=8, cache_source="ram"),
        Error(request_id="r", kind=ErrorKind.QUEUE_FULL, message="full", retry_after=1.0),
        Abort(request_id="r"),
        Control(request_id="c", op=ControlOp.STATUS),
        ControlReply(request_id="c", ok=True, data={"models": []}),
    ],
)
def test_round_trip(msg):
    frames = encode(msg)
    assert frames[0] == msg.TYPE.value.encode()
    assert decode(frames) == msg


def test_output_with_nested_deltas_and_logprobs():
    lp = LogprobEntry(token="hi", logprob=-0.5, bytes=[104, 105], top=[("hi", -0.5, [104, 105])])
    out = Output(
        deltas=[
            Delta(request_id="a", index=0, text="hi", token_ids=[5], logprobs=[lp]),
            Delta(request_id="b", index=1, finish_reason="stop", completion_tokens=3),
        ]
    )
    back = decode(encode(out))
    assert isinstance(back, Output)
    assert back.deltas[0].logprobs is not None
    assert back.deltas[0].logprobs[0].token == "hi"
    assert back.deltas[0].logprobs[0].top[0][1] == -0.5
    assert back.deltas[1].finish_reason == "stop"


@pytest.mark.parametrize(
    "frames",
    [
        [b"NOPE", msgpack.packb({})],
        [MsgType.ABORT.value.encode(), b"\xc1"],
        [MsgType.ABORT.value.encode(), msgpack.packb([1, 2])],
        [MsgType.ABORT.value.encode(), msgpack.packb({"request_id": "r", "evil": 1})],
        [MsgType.ABORT.value.encode(), msgpack.packb({})],
        [MsgType.ABORT.value.encode()],
    ],
)
def test_malformed_frames_are_rejected(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


def test_protocol_imports_nothing_heavy():
    import subprocess
    import sys

    code = "import sys, mlxtg.protocol; print(any(m.startswith(('mlx.', 'mlx_lm', 'numpy')) or m == 'mlx' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
