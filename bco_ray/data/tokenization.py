"""Examples -> token ids with the prompt masked out. Pure (a tokenizer in, lists out).

Conventions (docs/concepts.md): the chat template is applied to the prompt with the
generation prompt appended; the completion is tokenized on its own and an EOS token is
appended and scored; a too-long example loses completion tokens from the end (the prompt is
kept whole); a prompt longer than max_prompt_length is rejected, not cut.
"""

from __future__ import annotations

import hashlib
import json
import re

from bco_ray.data.normalise import Reject

# Private-use marks around each message's content while the template renders: what lies
# between them is the caller's text, everything else the template's markup.
_OPEN, _CLOSE = "\ue000", "\ue001"


def control_texts(tok) -> set[str]:
    """The strings the tokenizer turns into control tokens (`<|im_start|>`, EOS, ...)."""
    return {t.content for t in tok.added_tokens_decoder.values() if t.special} | set(tok.all_special_tokens)


def chat_prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The chat template applied to `messages`, with the generation prompt, as token ids.

    A message's content is text: one that spells a control token (`<|im_start|>system ...`)
    gets the tokens of those characters, never the control token, so a caller cannot open a
    turn of another role. Content without such text (nearly all) takes the template's own
    tokenization unchanged. Raises ValueError for a template that rewrites content (trims
    it, say) when content spells a control token: it cannot then be told apart safely."""
    plain = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    controls = control_texts(tok)
    if not any(c in m["content"] for m in messages for c in controls):
        return plain
    if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
        raise ValueError("message content holds both control-token text and U+E000/U+E001")
    marked = [{**m, "content": _OPEN + m["content"] + _CLOSE} for m in messages]
    text = tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
    same = text.replace(_OPEN, "").replace(_CLOSE, "") == tok.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    parts = re.split(f"([{_OPEN}{_CLOSE}])", text)
    if not same or parts[1::2] != [_OPEN, _CLOSE] * len(messages):
        raise ValueError("this chat template rewrites message content, so content that spells a control token "
                         "cannot be encoded as text")
    ids: list[int] = []
    for i, part in enumerate(parts[::2]):  # markup, content, markup, content, ..., markup
        if part:
            ids += tok(part, add_special_tokens=False, split_special_tokens=i % 2 == 1)["input_ids"]
    return ids


class FeedbackTokenizer:
    def __init__(self, tokenizer, max_length: int, max_prompt_length: int, chat_template: bool):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; BCO scores an EOS after each completion")
        if max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length})")
        self.tok = tokenizer
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))

    def _messages(self, prompt: str, prompt_messages: str | None) -> list[dict] | None:
        """The chat to template, or None for a plain prompt."""
        if prompt_messages is None and not self.chat:
            return None
        if not getattr(self.tok, "chat_template", None):
            raise ValueError("chat-message prompts need a tokenizer with a chat template")
        return json.loads(prompt_messages) if prompt_messages else [{"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str, prompt_messages: str | None) -> list[int]:
        messages = self._messages(prompt, prompt_messages)
        if messages is None:
            return self.tok(prompt, add_special_tokens=True)["input_ids"]
        try:
            return chat_prompt_ids(self.tok, messages)
        except ValueError:
            raise Reject("control_token_in_content") from None

    def encode(self, prompt: str, prompt_messages: str | None, completion: str) -> dict:
        out = self.encode_many([prompt], [prompt_messages], [completion])[0]
        if isinstance(out, Reject):
            raise out
        return out

    def encode_many(self, prompts: list[str], prompt_messages: list[str | None],
                    completions: list[str]) -> list[dict | Reject]:
        """`encode` for many rows, the same ids, a Reject in place of a rejected row.

        One tokenizer call per kind of text (chat prompts, plain prompts, completions) instead
        of three per row: the Rust tokenizer's per-call overhead was most of `prepare`'s
        tokenize time on short feedback rows."""
        n = len(prompts)
        if n == 0:  # a batch whose rows were all deduplicated: the tokenizer fails on []
            return []
        prompt_ids: list[list[int] | Reject | None] = [None] * n
        chats, plain = [], []
        controls = control_texts(self.tok)
        for i, (prompt, messages) in enumerate(zip(prompts, prompt_messages, strict=True)):
            chat = self._messages(prompt, messages)
            if chat is None:
                plain.append(i)
            elif any(c in m["content"] for m in chat for c in controls):  # rare: the careful path
                try:
                    prompt_ids[i] = chat_prompt_ids(self.tok, chat)
                except ValueError:
                    prompt_ids[i] = Reject("control_token_in_content")
            else:
                chats.append((i, chat))
        if chats:
            ids = self.tok.apply_chat_template([c for _, c in chats], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
            for (i, _), p in zip(chats, ids, strict=True):
                prompt_ids[i] = list(p)
        if plain:
            ids = self.tok([prompts[i] for i in plain], add_special_tokens=True)["input_ids"]
            for i, p in zip(plain, ids, strict=True):
                prompt_ids[i] = p
        # The completion is text: an EOS spelled inside it is not the end (the appended one is).
        completion_ids = self.tok(list(completions), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [p if isinstance(p, Reject) else self._assemble(p, c)
                for p, c in zip(prompt_ids, completion_ids, strict=True)]

    def _assemble(self, p: list[int], c: list[int]) -> dict | Reject:
        if len(p) > self.max_prompt_length:
            return Reject("prompt_too_long")
        c = c + [self.tok.eos_token_id]
        budget = self.max_length - len(p)
        truncated = len(c) > budget
        c = c[:budget]
        return {"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c),
                "prompt_tokens": len(p), "completion_tokens": len(c), "truncated": truncated}


def split_of(prompt: str, prompt_messages: str | None, eval_fraction: float) -> str:
    """'train' or 'eval' from a hash of the prompt: stable, and one prompt never in both."""
    h = hashlib.blake2b((prompt_messages or prompt).encode("utf-8", "surrogatepass"), digest_size=8)
    return "eval" if int.from_bytes(h.digest(), "big") % 1_000_000 < eval_fraction * 1_000_000 else "train"
