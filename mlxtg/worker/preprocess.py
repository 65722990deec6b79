"""Generate message -> validated, tokenised Request (runs on the worker's preprocess
thread, so chat templating, tokenisation and constraint compilation overlap the forward
pass and never delay the tokens the I/O thread sends).

Everything a request can get wrong is found here and raised as RequestError (-> HTTP 400),
before the request is queued: nothing past this point fails because of user input. A text
provably too long for the context is refused before it is tokenised (`LengthBound`).
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import Any

from ..protocol import Accepted, ConstraintKind, Generate, GuidedSpec, ReasoningEffort
from .length_bound import LengthBound
from .loader import LoadedModel
from .params import RequestError, SamplingParams, check_params, resolve_max_tokens
from .reasoning import Phase, ReasoningPlan, initial_phase, prefix_lark, tail_start
from .scheduler import Request
from .sequence import RequestPayload
from .tool_calls import detect_format, make_parser
from .tool_grammar import any_strict, forces_call, tool_call_grammar, validate_tools

log = logging.getLogger(__name__)


class Preprocessor:
    def __init__(self, loaded: LoadedModel, guided: Any = None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.guided = guided  # GuidedCompiler or None
        self.tool_format = loaded.spec.tool_parser or _detect_tool_format(loaded.tokenizer)
        self.bound = LengthBound.of(loaded.tokenizer._tokenizer)
        if self.bound is None:
            log.info(
                "this tokenizer may drop text: prompts are not length-checked before tokenising"
            )
        names = template_variables(loaded.tokenizer.chat_template)
        # mlx-lm's wrapper renames enable_thinking for templates that call it `thinking`.
        thinking = getattr(loaded.tokenizer, "_thinking_kwarg", "enable_thinking")
        self.thinking_switch = "enable_thinking" in names or thinking in names
        self.takes_effort = "reasoning_effort" in names
        self._ignored: set[str] = set()  # efforts already logged as ignored

    def __call__(self, msg: Generate) -> Request:
        if msg.n < 1:
            raise RequestError("n must be at least 1", param="n")
        params = msg.params
        check_params(params, self.loaded.vocab_size)

        tools_active = bool(msg.tools) and msg.tool_choice != "none"
        if msg.tools:
            try:
                validate_tools(msg.tools)
            except ValueError as exc:
                raise RequestError(str(exc), param="tools") from exc
        prompt, param, text = self._prompt(msg, tools_active, params)
        if not prompt:
            raise RequestError("the prompt is empty", param=param)
        max_tokens = resolve_max_tokens(params, len(prompt), self.loaded.context_length)
        reasoning = self._reasoning(msg, text)

        # A reasoning model thinks first: the constraint holds after its reasoning block.
        prefix = prefix_lark(reasoning.fmt, reasoning.phase) if reasoning is not None else None
        guide_spec = self._guide(msg, tools_active, prefix)
        parser_factory = None
        if tools_active:
            # Non-streamed responses report only complete calls; streams get arguments as
            # they are generated.
            parser_factory = partial(
                make_parser, self.tool_format, msg.tools or [], stream_arguments=msg.stream
            )
        payload = RequestPayload(
            params=params,
            max_tokens=max_tokens,
            guide_spec=guide_spec,
            guide_prefix=prefix if guide_spec is not None else None,
            parser_factory=parser_factory,
            cache_key=msg.cache_key,
            reasoning=reasoning,
            # The template wrote a reasoning opening or an empty block: the next turn
            # shares the prompt only up to it.
            tail_at=(
                tail_start(reasoning.fmt, prompt)
                if reasoning is not None and reasoning.phase is not Phase.MAYBE
                else 0
            ),
            continues_prompt=msg.messages is None,
            echo_text=(
                str(self.tokenizer.decode(prompt))
                if msg.echo and msg.prompt_token_ids is not None
                else None
            ),
        )
        return Request(
            request_id=msg.request_id,
            prompt=prompt,
            n=msg.n,
            max_tokens=max_tokens,
            payload=payload,
        )

    def tokenize(self, msg: Generate) -> Accepted:
        """The answer to a tokenize_only GENERATE: the prompt exactly as a generation would
        prefill it (chat template and tools included), or the text of token ids."""
        tools_active = bool(msg.tools) and msg.tool_choice != "none"
        prompt, _, _ = self._prompt(msg, tools_active)
        text = None
        if msg.prompt_token_ids is not None:
            text = str(self.tokenizer.decode(prompt))
        return Accepted(
            request_id=msg.request_id,
            prompt_tokens=len(prompt),
            prompt_token_ids=prompt,
            prompt_text=text,
            max_model_len=self.loaded.context_length,
            tokenizer_info=self._tokenizer_info() if msg.tokenizer_info else None,
        )

    def _tokenizer_info(self) -> dict[str, Any]:
        """What vLLM's GET /tokenizer_info reports, so clients such as lm-eval-harness can
        tokenise through the server instead of loading the model's tokenizer themselves."""
        hf = self.tokenizer._tokenizer

        def token(name: str) -> str | None:
            value = getattr(hf, name, None)
            return value if isinstance(value, str) else None

        return {
            "tokenizer_class": type(hf).__name__,
            "eos_token": token("eos_token"),
            "bos_token": token("bos_token"),
            "pad_token": token("pad_token"),
            "unk_token": token("unk_token"),
            "chat_template": self.tokenizer.chat_template,
            "model_max_length": self.loaded.context_length,
            "vocab_size": self.loaded.vocab_size,
        }

    # --- prompt ----------------------------------------------------------------------------

    def _prompt(
        self, msg: Generate, tools_active: bool, params: SamplingParams | None = None
    ) -> tuple[list[int], str, str | None]:
        """The prompt's token ids, the request field it came from and, for chat, the
        rendered text. With `params` (a generation, not /tokenize), a prompt that cannot
        fit the context with its max_tokens is refused before tokenising."""
        if msg.messages is not None:
            text = self._chat_text(msg, tools_active, params)
            return list(self.tokenizer.encode(text, add_special_tokens=False)), "messages", text
        if msg.prompt_token_ids is not None:
            if params is not None:  # before looking at every id of a huge list
                resolve_max_tokens(params, len(msg.prompt_token_ids), self.loaded.context_length)
            vocab = self.loaded.vocab_size
            bad = [t for t in msg.prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                    param="prompt",
                )
            return list(msg.prompt_token_ids), "prompt", None
        text = msg.prompt or ""
        self._check_fits(text, params)
        ids = self.tokenizer.encode(text, add_special_tokens=msg.add_special_tokens)
        return list(ids), "prompt", None

    def _chat_text(
        self, msg: Generate, tools_active: bool, params: SamplingParams | None
    ) -> str:
        if not msg.messages:
            raise RequestError("messages must not be empty", param="messages")
        if self.tokenizer.chat_template is None:
            raise RequestError(
                f"model {self.loaded.spec.name!r} has no chat template; use /v1/completions",
                param="messages",
            )
        kwargs = {**self._reasoning_kwargs(msg), **(msg.chat_template_kwargs or {})}
        messages = msg.messages
        if self.loaded.reasoning is not None:
            messages = [_with_reasoning_names(m) for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=msg.tools if tools_active else None,
                add_generation_prompt=True,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja raises arbitrary errors for unsupported input
            raise RequestError(
                f"the chat template could not render these messages: {exc}", param="messages"
            ) from exc
        # Checked on the rendered text, not on the message contents: a template may drop
        # content (earlier reasoning, say), and the render is cheap (0.13 s for 50 MB).
        self._check_fits(text, params)
        return str(text)

    def _reasoning_kwargs(self, msg: Generate) -> dict[str, Any]:
        """Template variables for the request's thinking switch and effort (explicit
        chat_template_kwargs override them). An effort the template cannot take is logged
        once per value and ignored."""
        req = msg.reasoning
        if req is None or self.loaded.reasoning is None:
            return {}
        kwargs: dict[str, Any] = {}
        if req.enabled is not None and self.thinking_switch:
            kwargs["enable_thinking"] = req.enabled
        effort = req.effort
        if effort is None:
            return kwargs
        if effort is ReasoningEffort.NONE and self.thinking_switch:
            kwargs.setdefault("enable_thinking", False)
        elif self.takes_effort:
            if effort is ReasoningEffort.NONE:
                self._log_once(effort, "the template cannot turn thinking off; using low")
                effort = ReasoningEffort.LOW
            kwargs["reasoning_effort"] = effort.value
        else:
            self._log_once(effort, "the chat template takes no reasoning_effort")
        return kwargs

    def _log_once(self, effort: ReasoningEffort, why: str) -> None:
        if effort.value not in self._ignored:
            self._ignored.add(effort.value)
            log.info("reasoning_effort=%s for %s: %s", effort.value, self.loaded.spec.name, why)

    def _reasoning(self, msg: Generate, text: str | None) -> ReasoningPlan | None:
        """A chat request's reasoning plan: where the rendered prompt leaves the model and
        the cap (`max_reasoning_tokens`). Text prompts and models without a format: None."""
        fmt = self.loaded.reasoning
        if fmt is None or text is None:
            return None
        cap = msg.reasoning.max_tokens if msg.reasoning is not None else None
        if cap is not None and cap < 0:
            raise RequestError("max_reasoning_tokens must be >= 0", param="max_reasoning_tokens")
        return ReasoningPlan(fmt, initial_phase(fmt, text), cap)

    def _check_fits(self, text: str, params: SamplingParams | None) -> None:
        """Refuse a text provably too long for the context before tokenising it (seconds
        per megabyte), with the 400 that tokenising would end in."""
        if params is not None and self.bound is not None:
            tokens = self.bound.min_tokens(text)
            resolve_max_tokens(params, tokens, self.loaded.context_length, at_least=True)

    # --- constraints -----------------------------------------------------------------------

    def _tool_grammar(self, msg: Generate, choice: Any) -> str:
        return tool_call_grammar(
            msg.tools or [],
            choice,
            self.tool_format,
            # llguidance treats every added token as special: the grammar must name tags
            # such as <tool_call> by token id when the tokenizer has them.
            added_tokens=self.tokenizer.get_added_vocab(),
            parallel_tool_calls=msg.parallel_tool_calls,
        )

    def _guide(self, msg: Generate, tools_active: bool, prefix: str | None = None) -> Any:
        spec = None
        if tools_active and forces_call(msg.tool_choice):
            try:
                lark = self._tool_grammar(msg, msg.tool_choice)
            except ValueError as exc:
                raise RequestError(str(exc), param="tool_choice") from exc
            spec = GuidedSpec(kind=ConstraintKind.GRAMMAR, value=lark, param="tool_choice")
        elif tools_active and msg.guided is None and self.guided is not None:
            # tool_choice "auto": free text, but a call the model opens is held to the
            # declared names and schemas (a lazy grammar). A strict tool must be enforceable;
            # for the others an unsupported schema only means the calls go unconstrained.
            try:
                lark = self._tool_grammar(msg, "auto")
            except ValueError as exc:
                if any_strict(msg.tools or []):
                    raise RequestError(str(exc), param="tools") from exc
                log.info("tool calls left unconstrained: %s", exc)
            else:
                spec = GuidedSpec(kind=ConstraintKind.GRAMMAR, value=lark, param="tools")
        elif msg.guided is not None:
            spec = msg.guided
        if spec is None:
            return None
        if self.guided is None:
            raise RequestError("guided decoding is not available in this worker", param=spec.param)
        from .guided import GuidedError

        try:
            self.guided.validate(spec, prefix)
        except GuidedError as exc:
            raise RequestError(str(exc), param=exc.param) from exc
        return spec


_SWITCH_NAMES = re.compile(r"\b(enable_thinking|thinking|reasoning_effort)\b")
_REASONING_NAMES = ("reasoning_content", "reasoning", "thinking")


def template_variables(template: Any) -> frozenset[str]:
    """The variables a chat template reads from its caller (named templates: all of them);
    a template Jinja cannot parse here is searched for the reasoning switches' names."""
    if isinstance(template, dict):
        template = "\n".join(str(t) for t in template.values())
    if not isinstance(template, str):
        return frozenset()
    import jinja2
    from jinja2 import meta

    try:
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        return frozenset(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateError:
        return frozenset(_SWITCH_NAMES.findall(template))


def _with_reasoning_names(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's earlier reasoning under all three names templates read
    (Qwen3 and GLM read reasoning_content, gpt-oss thinking), from whichever was sent."""
    if message.get("role") != "assistant":
        return message
    text = next((message[k] for k in _REASONING_NAMES if message.get(k)), None)
    if text is None:
        return message
    return {**message, **dict.fromkeys(_REASONING_NAMES, text)}


def _detect_tool_format(tokenizer: Any) -> str:
    return str(detect_format(tokenizer.chat_template, tokenizer.get_vocab()))
