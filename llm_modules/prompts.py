"""The only place a system prompt or chat format lives.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Training renders it into
text segments flagged "belongs to an assistant turn" (the tokens that get labels); generation renders the same
format up to where the assistant's answer starts, so prompts at inference look exactly as in training.

Styles:
  "paper"          System:\\n\\n{s}\\n\\nUser:\\n\\n{u}\\n\\nAssistant:\\n\\n{a}<eos>, as the reference trains
                   (plus the eos it never learns);
  "chat_template"  the tokenizer's own chat template; assistant spans are found by rendering prefixes.
A conversation that is a single assistant turn is plain text: rendered verbatim, followed by eos.
"""
from __future__ import annotations

from typing import Optional

from .errors import UserError

STYLES = ("paper", "chat_template")

# The Bespoke-Stratos chain-of-thought prompt as the paper's code uses it (bold markers, typos and the literal
# backslash-n characters included), so that "paper" reproduces its training text.
PAPER_SYSTEM_PROMPT = (
    "**Your role as an assistant involves thoroughly exploring questions through a systematic "
    "long thinking process before providing the final precise and accurate solutions. This requires "
    "engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, reflection, "
    "backtracing, and iteration to develop well-considered thinking process. Please structure your "
    "response into two main sections: Thought and Solution. In the Thought section, detail your reasoning "
    "process using the specified format: <|begin_of_thought|> {thought with steps separated with '\\n\\n'} "
    "<|end_of_thought|> Each step should include detailed considerations such as analisying questions, "
    "summarizing relevant findings, brainstorming new ideas, verifying the accuracy of the current steps, "
    "refining any errors, and revisiting previous steps. In the Solution section, based on various "
    "attempts, explorations, and reflections from the Thought section, systematically present the final "
    "solution that you deem correct. The solution should remain a logical, accurate, concise expression "
    "style and detail necessary step needed to reach the conclusion, formatted as follows: "
    "<|begin_of_solution|> {final formatted, precise, and clear solution} <|end_of_solution|> "
    "Now, try to solve the following question through the above guidelines:**"
)
_PAPER_HEADERS = {"system": "System:\n\n", "user": "User:\n\n", "assistant": "Assistant:\n\n"}
_PAPER_SEPARATOR = "\n\n"

Segments = list[tuple[str, bool]]


class TemplateRejected(ValueError):
    """The tokenizer's chat template raised on a conversation (a problem of that record)."""


def resolve_system_prompt(setting: str) -> Optional[str]:
    """`data.system_prompt` -> text: "paper" = the paper's prompt, "" = no system turn, else verbatim."""
    if setting == "paper":
        return PAPER_SYSTEM_PROMPT
    return setting or None


def is_plain_text(messages: list[dict]) -> bool:
    """True for a single assistant turn: free text, rendered without headers or system prompt."""
    return len(messages) == 1 and messages[0]["role"] == "assistant"


def with_system_prompt(messages: list[dict], setting: str) -> list[dict]:
    """`messages` with the configured system turn in front, unless they have their own or are plain text."""
    system = resolve_system_prompt(setting)
    if system is None or is_plain_text(messages) or any(m["role"] == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system}] + list(messages)


def render_training(messages: list[dict], style: str, tokenizer) -> Segments:
    """Text segments of a whole conversation; flag True = part of an assistant turn (content and its eos)."""
    _check_style(style)
    eos = tokenizer.eos_token
    if is_plain_text(messages):
        return [(messages[0]["content"] + eos, True)]
    if style == "paper":
        return _paper_segments(messages, eos)
    return _template_segments(messages, tokenizer)


def render_prompt(messages: list[dict], style: str, tokenizer) -> str:
    """The conversation so far (ending with a user turn) followed by the opening of the assistant's answer."""
    history = "".join(text for text, _ in render_training(messages, style, tokenizer)) if messages else ""
    return history + _prompt_tail(messages, style, tokenizer)


def add_special_tokens(style: str) -> bool:
    """Whether to let the tokenizer add its BOS etc.: a chat template writes its own special tokens."""
    return style == "paper"


def encode_segments(segments: Segments, style: str, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids and their assistant flags. Each run of equally flagged segments is encoded on its own, so a
    prompt (which ends where an answer starts) encodes to exactly the ids training saw before that answer,
    whatever the tokenizer would merge across that boundary."""
    runs: Segments = []
    for text, flag in segments:
        if runs and runs[-1][1] == flag:
            runs[-1] = (runs[-1][0] + text, flag)
        elif text:
            runs.append((text, flag))
    ids: list[int] = []
    flags: list[bool] = []
    for i, (text, flag) in enumerate(runs):
        part = tokenizer(text, add_special_tokens=i == 0 and add_special_tokens(style))["input_ids"]
        ids, flags = ids + part, flags + [flag] * len(part)
    return ids, flags


def encode_prompt(messages: list[dict], style: str, tokenizer) -> list[int]:
    """Token ids of `render_prompt`, encoded exactly as training encodes the same text."""
    history = render_training(messages, style, tokenizer) if messages else []
    return encode_segments(history + [(_prompt_tail(messages, style, tokenizer), False)], style, tokenizer)[0]


def _prompt_tail(messages: list[dict], style: str, tokenizer) -> str:
    _check_style(style)
    if style == "paper":
        return (_PAPER_SEPARATOR if messages else "") + _PAPER_HEADERS["assistant"]
    return _generation_suffix(messages, tokenizer)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise UserError(f"data.format: {style!r} is not one of {', '.join(map(repr, STYLES))}")


def _paper_segments(messages: list[dict], eos: str) -> Segments:
    out: Segments = []
    for i, m in enumerate(messages):
        head = (_PAPER_SEPARATOR if i else "") + _PAPER_HEADERS[m["role"]]
        out.append((head, False))
        if m["role"] == "assistant":
            out.append((m["content"] + eos, True))
        else:
            out.append((m["content"], False))
    return out


def _apply(tokenizer, messages: list[dict], generation: bool = False) -> str:
    if not messages:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja raises TemplateError and others for conversations a template rejects
        raise TemplateRejected(f"the tokenizer's chat template rejected this conversation: {e}") from None


def _not_prefix_wise() -> UserError:
    return UserError("data.format: chat_template: this tokenizer's chat template does not render conversations "
                     "prefix by prefix, so assistant turns cannot be located; use data.format: paper")


def _template_segments(messages: list[dict], tokenizer) -> Segments:
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("data.format: chat_template: the tokenizer has no chat template; use data.format: paper")
    full, eos = _apply(tokenizer, messages), tokenizer.eos_token
    out: Segments = []
    pos = 0  # characters of `full` emitted so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        opened, upto = _apply(tokenizer, messages[:i], generation=True), _apply(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(opened) and len(opened) >= pos):
            raise _not_prefix_wise()
        start, end = len(opened), len(upto)
        span = full[start:end]
        turn = span.rstrip()  # whitespace after the turn's end marker is formatting, not something to predict
        if not turn.endswith(eos):
            turn += eos  # templates whose turn end is not eos still teach the model to emit eos
        out += [(full[pos:start], False), (turn, True), (span[len(span.rstrip()):], False)]
        pos = end
    out.append((full[pos:], False))
    return [(t, f) for t, f in out if t]


def _generation_suffix(messages: list[dict], tokenizer) -> str:
    plain, opened = _apply(tokenizer, messages), _apply(tokenizer, messages, generation=True)
    if not opened.startswith(plain):
        raise _not_prefix_wise()
    return opened[len(plain):]
