import subprocess
import sys
from typing import Any

import msgpack
import pytest

from mlxtg.protocol import (
    Abort,
    Accepted,
    Config,
    ConstraintKind,
    Control,
    ControlOp,
    ControlReply,
    Delta,
    EngineSettings,
    Error,
    ErrorKind,
    FinishReason,
    Generate,
    GuidedSpec,
    Hello,
    LogprobEntry,
    ModelLoad,
    MsgType,
    Output,
    ProtocolError,
    Ready,
    ReasoningEffort,
    ReasoningRequest,
    SamplingParams,
    ToolCallFragment,
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
            params=SamplingParams(temperature=0.0, logit_bias={5: -1.0}, stop=["x"]),
            messages=[{"role": "user", "content": "hi"}],
            n=2,
            guided=GuidedSpec(ConstraintKind.REGEX, "a+", "guided_regex"),
        ),
        Generate(request_id="r", model="m", params=SamplingParams(), prompt_token_ids=[1, 2, 3]),
        Generate(
            request_id="r",
            model="m",
            params=SamplingParams(),
            messages=[{"role": "user", "content": "hi"}],
            reasoning=ReasoningRequest(enabled=True, effort=ReasoningEffort.LOW, max_tokens=3),
        ),
        Ready(worker_id="w1", model="m", reasoning="think(<think>,</think>)"),
        Config(
            worker_id="w",
            model=ModelLoad(model_id_or_path="/m", quant="q4", model_config_={"rope": 1}),
            engine=EngineSettings(max_batch=4),
        ),
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
            Delta(request_id="b", index=1, finish_reason=FinishReason.STOP, completion_tokens=3),
            Delta(
                request_id="c",
                finish_reason=FinishReason.ERROR,
                error_kind=ErrorKind.GENERATION_FAILED,
                error_message="generation failed: token 9 violates the json constraint",
            ),
        ]
    )
    back = decode(encode(out))
    assert isinstance(back, Output)
    assert back.deltas[0].logprobs is not None
    assert back.deltas[0].logprobs[0].token == "hi"
    assert back.deltas[0].logprobs[0].top[0][1] == -0.5
    assert back == out  # tuples stay tuples
    assert back.deltas[1].finish_reason is FinishReason.STOP  # enums come back as enums
    assert back.deltas[2].error_kind is ErrorKind.GENERATION_FAILED


def test_enums_are_enums_after_decoding():
    err = decode(encode(Error(request_id="r", kind=ErrorKind.UNAVAILABLE, message="x")))
    ctl = decode(encode(Control(request_id="c", op=ControlOp.EVICT, args={"model": "m"})))
    assert isinstance(err, Error) and err.kind is ErrorKind.UNAVAILABLE
    assert isinstance(ctl, Control) and ctl.op is ControlOp.EVICT


def _body(msg: Any) -> tuple[bytes, Any]:
    frames = encode(msg)
    return frames[0], msgpack.unpackb(frames[1], strict_map_key=False)


def _gen() -> Generate:
    spec = GuidedSpec(ConstraintKind.JSON, "{}", "guided_json")
    return Generate(request_id="r", model="m", params=SamplingParams(), prompt="hi", guided=spec)


def _config() -> Config:
    return Config(worker_id="w", model=ModelLoad(model_id_or_path="/m"), engine=EngineSettings())


def _output() -> Output:
    lp = LogprobEntry(token="a", logprob=-1.0, bytes=[97], top=[("a", -1.0, [97])])
    call = ToolCallFragment(0, "call_1", "get_weather", "{")
    delta = Delta(
        request_id="r",
        token_ids=[1],
        logprobs=[lp],
        tool_calls=[call],
        finish_reason=FinishReason.STOP,
    )
    return Output(deltas=[delta])


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def change(body: Any) -> None:
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _append(path: tuple[Any, ...], value: Any) -> Any:
    def change(body: Any) -> None:
        node = body
        for key in path:
            node = node[key]
        node.append(value)

    return change


@pytest.mark.parametrize(
    ("make", "change"),
    [
        (_gen, _set(("params", "evil"), 1)),  # unknown field in a nested struct
        (_gen, _set(("params", "temperature"), "hot")),  # mistyped
        (_gen, _set(("params", "logit_bias"), {"5": 1.0})),  # keys must be token ids
        (_gen, _set(("params", "stop"), "x")),  # a list, not a string
        (_gen, _set(("guided", "kind"), "yaml")),  # not a ConstraintKind
        (_gen, _set(("guided", "extra"), True)),
        (_config, _set(("model", "quant"), "q5")),
        (_config, _set(("model", "evil"), 1)),
        (_config, _set(("engine", "max_batch"), "32")),
        (_config, _set(("engine", "evil"), 1)),
        (_output, _append(("deltas", 0), None)),  # a delta with one field too many
        (_output, _set(("deltas", 0, 1), "zero")),  # its index mistyped
        (_output, _set(("deltas", 0, 6), "exploded")),  # finish_reason not a FinishReason
        (_output, _set(("deltas", 0, 4, 0, 1), "low")),  # a logprob inside a delta
        (_output, _append(("deltas", 0, 4, 0), [])),  # a logprob entry with a field too many
        (_output, _set(("deltas", 0, 5, 0, 3), 7)),  # tool-call arguments must be text
        (_output, _append(("deltas", 0, 5, 0), "x")),  # a tool-call piece with a field too many
        (
            lambda: Error(request_id="r", kind=ErrorKind.INTERNAL, message="x"),
            _set(("kind",), "oops"),
        ),
        (lambda: Control(request_id="c", op=ControlOp.STATUS), _set(("op",), "reboot")),
    ],
)
def test_nested_unknown_or_mistyped_fields_are_protocol_errors(make, change):
    mtype, body = _body(make())
    assert decode([mtype, msgpack.packb(body)]) == make()  # unchanged, it decodes
    change(body)
    with pytest.raises(ProtocolError):
        decode([mtype, msgpack.packb(body)])


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
    code = "import sys, mlxtg.protocol; print(any(m.startswith(('mlx.', 'mlx_lm', 'numpy')) or m == 'mlx' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gateway_and_supervisor_import_nothing_from_the_worker():
    code = (
        "import sys, mlxtg.gateway.app, mlxtg.gateway.__main__, mlxtg.supervisor.core\n"
        "print(sorted(m for m in sys.modules if m.startswith('mlxtg.worker')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reasoning_fields_are_typed_and_appended_last():
    out = Output(
        deltas=[
            Delta(request_id="a", text="42", reasoning="so", reasoning_tokens=4),
            Delta(request_id="b", text="x"),
        ]
    )
    back = decode(encode(out))
    assert back == out
    _, body = _body(out)
    # Delta is an array: the new fields come last, and a frame without them still decodes.
    assert body["deltas"][0][-2:] == ["so", 4]
    body["deltas"] = [body["deltas"][1][:-2]]
    old = decode([b"OUTPUT", msgpack.packb(body)])
    assert isinstance(old, Output) and old.deltas[0] == Delta(request_id="b", text="x")
    gen = Generate(
        request_id="r",
        model="m",
        params=SamplingParams(),
        messages=[],
        reasoning=ReasoningRequest(effort=ReasoningEffort.XHIGH),
    )
    g = decode(encode(gen))
    assert isinstance(g, Generate) and g.reasoning is not None
    assert g.reasoning.effort is ReasoningEffort.XHIGH and g.reasoning.enabled is None
    _, body = _body(gen)
    body["reasoning"]["effort"] = "extreme"
    with pytest.raises(ProtocolError):
        decode([b"GENERATE", msgpack.packb(body)])
    body["reasoning"] = {"max_tokens": "3"}
    with pytest.raises(ProtocolError):
        decode([b"GENERATE", msgpack.packb(body)])
