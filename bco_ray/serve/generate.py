"""Text generation with transformers for machines without vLLM: batched, streamed, seeded.

One decoding loop serves both cases: a batch of requests (each with its own temperature,
top_p, max_tokens, stop strings and seed) is left-padded and decoded together with a KV
cache; `generate_iter` yields every step's text deltas, so streaming is the same loop with
one request. No Ray here; `bco_ray.serve.app` calls it from Ray Serve replicas.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from bco_ray.data.tokenization import chat_prompt_ids
from bco_ray.raycluster import torch_threads


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Output:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


Delta = tuple[str, "str | None", int]  # (new text, finish reason once finished, tokens generated so far)


class HFEngine:
    """A causal LM (safetensors only) and its tokenizer, ready to decode."""

    def __init__(self, model_dir: str, dtype: str = "float32", device: str | None = None,
                 trust_remote_code: bool = False, num_threads: float | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if num_threads is not None:  # the CPUs the replica holds; 0 (a GPU replica) still gets one thread
            torch.set_num_threads(torch_threads(num_threads))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), use_safetensors=True,
                                                     trust_remote_code=trust_remote_code).to(device).eval()
        self._setup(model, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code), device)

    @classmethod
    def wrap(cls, model, tok, device: torch.device, config=None, generation_config=None) -> HFEngine:
        """An engine around a model already loaded (a training worker's policy): `model` is any
        callable taking the LM's keyword arguments; `config` / `generation_config` default to its own."""
        self = cls.__new__(cls)
        self._setup(model, tok, device, config, generation_config)
        return self

    def _setup(self, model, tok, device: torch.device, config=None, generation_config=None) -> None:
        self.model, self.tok, self.device = model, tok, device
        config = config or model.config
        generation_config = generation_config or getattr(model, "generation_config", None)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = generation_config.eos_token_id if generation_config else None
        eos = eos if eos is not None else tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.max_context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        # Logits of the last position only: the prompt's would be b x prompt x vocab floats, the
        # vocabulary head's FLOPs on every prompt token (SmolLM2: a fifth of the model's) and 400 MB
        # for one 2k-token prompt. Any transformers LM takes the argument; a custom one may not.
        lm = getattr(model, "module", model)  # DDP
        lm = getattr(lm, "lm", lm)  # the training policy (bco_ray.train.step.PolicyLogps)
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tok, messages)  # content as text, as prepare encodes it

    def encode_text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def _sample(self, logits: torch.Tensor, params: list[Sampling], gens: list[torch.Generator]) -> list[int]:
        out = []
        for i, p in enumerate(params):
            row = logits[i].float()
            if p.temperature <= 0:
                out.append(int(row.argmax()))
                continue
            probs = torch.softmax(row / p.temperature, -1)
            if p.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # always keeps the top token
                probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
            out.append(int(torch.multinomial(probs, 1, generator=gens[i])))
        return out

    @torch.inference_mode()
    def generate_iter(self, prompts: list[list[int]], params: list[Sampling],
                      outputs: list[Output] | None = None) -> Iterator[list[Delta]]:
        """Decode all prompts together; yields, per step, one Delta per row. `outputs`, a
        list, receives each row's Output (its token ids too) as it grows."""
        yield from self.decode(prompts, params, outputs)

    def decode(self, prompts: list[list[int]], params: list[Sampling], outputs: list[Output] | None = None,
               lockstep: bool = False) -> Iterator[list[Delta]]:
        """`generate_iter` without its inference mode (a sharded model in training decodes
        under no_grad: FSDP reuses the buffers it gathers into). `lockstep`: run every
        max_tokens step even when all rows have stopped, so that ranks decoding different
        prompts make the same number of forward passes (their collectives must pair up)."""
        b = len(prompts)
        longest = max(len(p) for p in prompts)
        ids = torch.full((b, longest), self.pad, dtype=torch.long)
        mask = torch.zeros((b, longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        gens = []
        for p in params:
            g = torch.Generator()
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))
            gens.append(g)
        outs = [Output() for _ in range(b)]
        if outputs is not None:
            outputs.extend(outs)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, step_ids = None, ids
        for _ in range(max(p.max_tokens for p in params)):
            res = self.model(input_ids=step_ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                             use_cache=True, **self._last_only)
            cache = res.past_key_values
            chosen = self._sample(res.logits[:, -1].cpu(), params, gens)
            deltas: list[Delta] = []
            for o, p, t in zip(outs, params, chosen, strict=True):
                if o.finish_reason is not None:
                    deltas.append(("", None, len(o.token_ids)))
                    continue
                if t in self.eos:
                    o.finish_reason = "stop"
                    deltas.append(("", "stop", len(o.token_ids)))
                    continue
                o.token_ids.append(t)
                text = self.tok.decode(o.token_ids, skip_special_tokens=True)
                cut = min((text.find(s) for s in p.stop if s and s in text), default=-1)
                if cut >= 0:
                    text, o.finish_reason = text[:cut], "stop"
                elif len(o.token_ids) >= p.max_tokens:
                    o.finish_reason = "length"
                if text.endswith("\ufffd") and o.finish_reason is None:
                    deltas.append(("", None, len(o.token_ids)))  # half a multi-byte character: wait
                    continue
                delta, o.text = text[len(o.text):] if text.startswith(o.text) else text, text
                deltas.append((delta, o.finish_reason, len(o.token_ids)))
            yield deltas
            if all(o.finish_reason is not None for o in outs) and not lockstep:
                return
            step_ids = torch.tensor(chosen, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=self.device)], 1)
            position = position[:, -1:] + 1

    def generate(self, prompts: list[list[int]], params: list[Sampling]) -> list[tuple[str, str, int]]:
        """(text, finish reason, completion tokens) per prompt."""
        text, finish, count = [""] * len(prompts), ["length"] * len(prompts), [0] * len(prompts)
        for step in self.generate_iter(prompts, params):
            for i, (delta, reason, n) in enumerate(step):
                text[i] += delta
                count[i] = n
                if reason:
                    finish[i] = reason
        return list(zip(text, finish, count, strict=True))
