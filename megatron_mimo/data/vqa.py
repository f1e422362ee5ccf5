"""Instruction samples: Energon's ``VQASample`` (an image, a question, its answers) as one chat
turn whose loss covers only the answer.

Stage 2 of a LLaVA recipe tunes on questions and answers: the model must learn to answer, not
to ask, so the question and the template around it are context, never a target. One sample::

    [BOS, <image> x N, prompt tokens ..., answer tokens ..., EOS, PAD ...]

- **Template**: the chat template stored with ``--tokenizer-model``
  (:func:`megatron_mimo.data.hf_tokenizer.read_chat_template`), rendered with ``jinja2`` as
  transformers renders it (``messages`` with string contents, ``add_generation_prompt``,
  ``bos_token``/``eos_token``/``pad_token``); without one, the built-in default: the question's
  words, then the answer's (:data:`DEFAULT_TEMPLATE`; the word list has no chat tokens).
- **Answer span**, without ``{% generation %}`` markers: the prompt (user turn + generation
  prompt) and the whole conversation are rendered and tokenized; the prompt's ids must be a
  prefix of the conversation's (else the template tokenizes differently across the boundary:
  an error naming the sample). The rest, up to the tokenizer's EOS (the layout appends its
  own), are the answer tokens. Markup the template puts after the answer that is not EOS
  (ChatML's ``<|im_end|>`` when EOS is another token) stays in them: the model must learn to
  end its turn. A leading BOS the template prints is dropped (the layout starts with one).
- A sample with several answers (VQAv2's annotators) trains on the first; ``answer_weights``
  are not used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from megatron_mimo.data.tokenizer import CaptionTokenizer
from megatron_mimo.errors import DataError

DEFAULT_TEMPLATE = "{question} {answer}"
"""The built-in template (``str.format``); the prompt is the question alone."""


def first_answer(answers: list[str] | str | None, key: str) -> str:
    """The answer trained on: a string as it is, of a list the first (module docstring)."""
    if isinstance(answers, str):
        return answers
    if not answers:
        raise DataError(f"sample {key}: the VQA sample has no answer to train on")
    if not isinstance(answers[0], str):
        raise DataError(f"sample {key}: answer {answers[0]!r} is not a string")
    return answers[0]


@dataclass(frozen=True)
class TurnFormat:
    """How a question and its answer become a prompt and an answer span (plain strings only:
    the format travels to Energon's worker processes)."""

    template: str | None = None
    """Jinja source of the tokenizer's chat template; None: :data:`DEFAULT_TEMPLATE`."""
    tokens: tuple[tuple[str, str], ...] = ()
    """Special tokens the template may print (``bos_token`` ...)."""
    where: str = "the built-in template"
    """What errors name."""

    @classmethod
    def for_tokenizer(cls, tokenizer: CaptionTokenizer) -> TurnFormat:
        """The tokenizer's chat template if it has one (compiled now: a broken template fails
        at start-up, not at the first sample), else the built-in default."""
        template = getattr(tokenizer, "chat_template", None)
        if template is None:
            return cls()
        where = f"the chat template of {tokenizer.path.parent}"
        compile_template(template, where)
        return cls(template, tuple(tokenizer.template_tokens().items()), where)

    def render(self, question: str, answer: str | None, key: str) -> str:
        """The prompt (``answer`` None: user turn + generation prompt) or the whole turn."""
        if self.template is None:
            return question if answer is None else DEFAULT_TEMPLATE.format(question=question,
                                                                           answer=answer)
        messages = [{"role": "user", "content": question}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        template = compile_template(self.template, self.where)
        jinja2 = import_jinja2(self.where)
        try:
            return template.render(messages=messages, add_generation_prompt=answer is None,
                                   **dict(self.tokens))
        except jinja2.TemplateError as error:
            raise DataError(f"sample {key}: {self.where} failed: {one_line(error)}") from None

    def split(self, tokenizer: CaptionTokenizer, question: str, answer: str,
              key: str) -> tuple[list[int], list[int]]:
        """The prompt's ids and the answer's ids (module docstring, "Answer span")."""
        prompt = _without_bos(tokenizer.encode(self.render(question, None, key), key), tokenizer)
        full = _without_bos(tokenizer.encode(self.render(question, answer, key), key), tokenizer)
        if full[:len(prompt)] != prompt:
            raise DataError(f"sample {key}: {self.where} tokenizes differently across the "
                            f"question/answer boundary (the prompt's {len(prompt)} ids are not a "
                            f"prefix of the conversation's {len(full)}): the answer span is "
                            f"unknown")
        answer_ids = full[len(prompt):]
        if tokenizer.eos_id in answer_ids:
            answer_ids = answer_ids[:answer_ids.index(tokenizer.eos_id)]
        return prompt, answer_ids


def _without_bos(ids: list[int], tokenizer: CaptionTokenizer) -> list[int]:
    """``ids`` less a leading BOS (a template's ``{{ bos_token }}``; the layout has its own)."""
    return ids[1:] if ids[:1] == [tokenizer.bos_id] else ids


def one_line(error: BaseException) -> str:
    """An exception's text on one line."""
    return " ".join(str(error).split())


def import_jinja2(where: str) -> Any:
    """``jinja2`` (installed with transformers), or a one-line DataError."""
    try:
        import jinja2
    except ImportError:
        raise DataError(f"{where} needs jinja2: pip install jinja2") from None
    return jinja2


@functools.lru_cache(maxsize=8)
def compile_template(source: str, where: str) -> Any:
    """The template compiled as transformers compiles chat templates (sandboxed, trimmed blocks,
    ``raise_exception``, JSON ``tojson``, ``{% generation %}`` accepted and ignored); no
    ``strftime_now``: a prompt that changes with the date would break exact resumes."""
    jinja2 = import_jinja2(where)
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise DataError(f"{where}: cannot compile it ({one_line(error)})") from None


def _generation_extension() -> type:
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask tags) rendered
    as their body: the answer span is found without them."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):  # noqa: D102 - Jinja's hook
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation
