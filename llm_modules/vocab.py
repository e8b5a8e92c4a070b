"""Tokenizers: the large model's own (hub id / local dir / GGUF), or a byte-level one built offline."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import UserError

BYTE_LEVEL = "byte-level"
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_tokenizer(name_or_path: str, gguf_file: Optional[str] = None):
    """The tokenizer named by `name_or_path`, with a pad token set.

    "byte-level" builds a 259-entry tokenizer offline (ids 0-255 are the bytes, then `<|endoftext|>` (pad),
    `<|im_start|>`, `<|im_end|>` (eos)) with a ChatML chat template; anything else goes to
    `AutoTokenizer.from_pretrained` (hub id or local directory; `gguf_file` names a GGUF file inside it).
    """
    tok = byte_level_tokenizer() if name_or_path == BYTE_LEVEL else _from_pretrained(name_or_path, gguf_file)
    if tok.eos_token is None:
        raise UserError(f"tokenizer {name_or_path}: has no eos token, which training needs as the end of each "
                        "answer; choose the tokenizer of a causal LM")
    if tok.pad_token is None:
        # Safe: labels are masked by position, never by comparing ids with pad.
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(name_or_path: str, gguf_file: Optional[str]):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        where = f"{name_or_path}/{gguf_file}" if gguf_file else name_or_path
        raise UserError(f"tokenizer {where}: could not be loaded ({str(e).splitlines()[0]}); give a local "
                        f"directory with tokenizer files, a reachable hub id, or `byte-level`") from None


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, which the ByteLevel decoder inverts.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_level_tokenizer():
    """The offline byte-level tokenizer (see `load_tokenizer`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}  # token id == byte value
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens([PAD, IM_START, IM_END])  # ids 256, 257, 258
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=IM_END,
                                  additional_special_tokens=[IM_START], clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def pad(rows: list[list[int]], pad_id: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, longest row): rows padded with `pad_id` on the left (prompts: every row's next
    token comes at the same step) or on the right."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[b, sl], mask[b, sl] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask
