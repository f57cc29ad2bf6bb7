"""Examples -> token ids with the prompt masked out. Pure (a tokenizer in, lists out).

Conventions (docs/concepts.md): the chat template is applied to the prompt with the
generation prompt appended; the completion is tokenized on its own and an EOS token is
appended and scored; a too-long example loses completion tokens from the end (the prompt is
kept whole); a prompt longer than max_prompt_length is rejected, not cut.
"""

from __future__ import annotations

import hashlib
import json

from bco_ray.data.normalise import Reject


class FeedbackTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, chat_template: bool):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; BCO scores an EOS after each completion")
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tok = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))

    def prompt_ids(self, prompt: str, prompt_messages: str | None) -> list[int]:
        if prompt_messages is not None or self.chat:
            if not getattr(self.tok, "chat_template", None):
                raise ValueError("chat-message prompts need a tokenizer with a chat template")
            messages = json.loads(prompt_messages) if prompt_messages else [{"role": "user", "content": prompt}]
            return list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
        return self.tok(prompt, add_special_tokens=True)["input_ids"]

    def encode(self, prompt: str, prompt_messages: str | None, completion: str) -> dict:
        p = self.prompt_ids(prompt, prompt_messages)
        if len(p) > self.max_prompt_length:
            raise Reject("prompt_too_long")
        c = self.tok(completion, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        budget = self.max_length - len(p)
        truncated = len(c) > budget
        c = c[:budget]
        return {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c),
                "prompt_tokens": len(p), "completion_tokens": len(c), "truncated": truncated}


def split_of(prompt: str, prompt_messages: str | None, eval_fraction: float) -> str:
    """'train' or 'eval' from a hash of the prompt: stable, and one prompt never in both."""
    h = hashlib.blake2b((prompt_messages or prompt).encode("utf-8", "surrogatepass"), digest_size=8)
    return "eval" if int.from_bytes(h.digest(), "big") % 1_000_000 < eval_fraction * 1_000_000 else "train"
