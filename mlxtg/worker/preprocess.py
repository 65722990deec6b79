"""Generate message -> validated, tokenised Request (runs on the worker's I/O thread, so
chat templating, tokenisation and constraint compilation overlap the forward pass).

Everything a request can get wrong is found here and raised as RequestError (-> HTTP 400),
before the request is queued: nothing past this point fails because of user input.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from ..protocol import Accepted, Generate
from .loader import LoadedModel
from .params import RequestError, SamplingParams, resolve_max_tokens
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

    def __call__(self, msg: Generate) -> Request:
        if msg.n < 1:
            raise RequestError("n must be at least 1", param="n")
        try:
            params = SamplingParams.from_wire(msg.params)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"invalid sampling parameters: {exc}") from exc
        params.validate_against(self.loaded.vocab_size)

        tools_active = bool(msg.tools) and msg.tool_choice != "none"
        if msg.tools:
            try:
                validate_tools(msg.tools)
            except ValueError as exc:
                raise RequestError(str(exc), param="tools") from exc
        prompt, param = self._prompt(msg, tools_active)
        if not prompt:
            raise RequestError("the prompt is empty", param=param)
        max_tokens = resolve_max_tokens(params, len(prompt), self.loaded.context_length)

        guide_spec = self._guide(msg, tools_active)
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
            parser_factory=parser_factory,
            cache_key=msg.cache_key,
            continues_prompt=msg.messages is None,
            echo_text=(
                str(self.tokenizer.decode(prompt))
                if msg.echo and msg.prompt_token_ids is not None
                else None
            ),
        )
        return Request(request_id=msg.request_id, prompt=prompt, n=msg.n, payload=payload)

    def tokenize(self, msg: Generate) -> Accepted:
        """The answer to a tokenize_only GENERATE: the prompt exactly as a generation would
        prefill it (chat template and tools included), or the text of token ids."""
        tools_active = bool(msg.tools) and msg.tool_choice != "none"
        prompt, _ = self._prompt(msg, tools_active)
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

    def _prompt(self, msg: Generate, tools_active: bool) -> tuple[list[int], str]:
        if msg.messages is not None:
            return self._chat_prompt(msg, tools_active), "messages"
        if msg.prompt_token_ids is not None:
            vocab = self.loaded.vocab_size
            bad = [t for t in msg.prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise RequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                    param="prompt",
                )
            return list(msg.prompt_token_ids), "prompt"
        text = msg.prompt or ""
        return list(
            self.tokenizer.encode(text, add_special_tokens=msg.add_special_tokens)
        ), "prompt"

    def _chat_prompt(self, msg: Generate, tools_active: bool) -> list[int]:
        if not msg.messages:
            raise RequestError("messages must not be empty", param="messages")
        if self.tokenizer.chat_template is None:
            raise RequestError(
                f"model {self.loaded.spec.name!r} has no chat template; use /v1/completions",
                param="messages",
            )
        kwargs = dict(msg.chat_template_kwargs or {})
        try:
            text = self.tokenizer.apply_chat_template(
                msg.messages,
                tools=msg.tools if tools_active else None,
                add_generation_prompt=True,
                tokenize=False,
                **kwargs,
            )
        except Exception as exc:  # jinja raises arbitrary errors for unsupported input
            raise RequestError(
                f"the chat template could not render these messages: {exc}", param="messages"
            ) from exc
        return list(self.tokenizer.encode(text, add_special_tokens=False))

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

    def _guide(self, msg: Generate, tools_active: bool) -> Any:
        spec = None
        if tools_active and forces_call(msg.tool_choice):
            from .guided import GuidedSpec

            try:
                lark = self._tool_grammar(msg, msg.tool_choice)
            except ValueError as exc:
                raise RequestError(str(exc), param="tool_choice") from exc
            spec = GuidedSpec(kind="grammar", value=lark, param="tool_choice")
        elif tools_active and msg.guided is None and self.guided is not None:
            # tool_choice "auto": free text, but a call the model opens is held to the
            # declared names and schemas (a lazy grammar). A strict tool must be enforceable;
            # for the others an unsupported schema only means the calls go unconstrained.
            from .guided import GuidedSpec

            try:
                lark = self._tool_grammar(msg, "auto")
            except ValueError as exc:
                if any_strict(msg.tools or []):
                    raise RequestError(str(exc), param="tools") from exc
                log.info("tool calls left unconstrained: %s", exc)
            else:
                spec = GuidedSpec(kind="grammar", value=lark, param="tools")
        elif msg.guided is not None:
            from .guided import GuidedSpec

            spec = GuidedSpec.from_wire(msg.guided)
        if spec is None:
            return None
        if self.guided is None:
            raise RequestError("guided decoding is not available in this worker", param=spec.param)
        from .guided import GuidedError

        try:
            self.guided.validate(spec)
        except GuidedError as exc:
            raise RequestError(str(exc), param=exc.param) from exc
        return spec


def _detect_tool_format(tokenizer: Any) -> str:
    return str(detect_format(tokenizer.chat_template, tokenizer.get_vocab()))
