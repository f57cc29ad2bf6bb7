"""Judges for the eval stage: a score in [0, 1] per (prompt, answer), higher is better.

    feedback      a logistic regression on sentence embeddings of the completions in the
                  prepared train split, thumbs-up vs thumbs-down: "would our users have liked
                  this answer?", learnt from their own feedback (its held-out AUC is reported:
                  below ~0.6 it can barely tell, and the report says so)
    reward-model  an HF sequence-classification model directory (one logit: sigmoid; more:
                  the last class's probability)
    openai        any OpenAI-compatible chat endpoint as an LLM judge; the prompt is config
                  (eval.judge_prompt, with {prompt} and {answer}); the first number 1-10 in
                  its reply, mapped to [0, 1]; an unparsable reply scores NaN (counted)

A judge sees answers of the candidate and the reference in one call, so both are scored
by the same judge state.
"""

from __future__ import annotations

import os
import re

import numpy as np

from bco_ray.data.udm import PromptEmbedder, fit_logistic_regression, roc_auc


class FeedbackJudge:
    name = "feedback"

    def __init__(self, embedder_dir: str, train: tuple[list[str], np.ndarray], heldout: tuple[list[str], np.ndarray],
                 max_length: int = 256):
        texts, y = train
        if len(set(y.tolist())) < 2:
            raise ValueError("the feedback judge needs thumbs-up and thumbs-down completions in the train split")
        self.embedder = PromptEmbedder(embedder_dir, max_length=max_length)
        self.w, self.b = fit_logistic_regression(self.embedder.embed(texts), y.astype(bool), c=1.0)
        ht, hy = heldout
        self.heldout_auc = (roc_auc(self.embedder.embed(ht) @ self.w + self.b, hy.astype(bool))
                            if len(set(hy.tolist())) == 2 else None)
        self.info = {"kind": self.name, "train_rows": len(texts), "heldout_rows": len(ht),
                     "heldout_auc": self.heldout_auc}

    def score(self, prompts: list[str], answers: list[str]) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.embedder.embed(answers) @ self.w + self.b)))


class RewardModelJudge:
    name = "reward-model"

    def __init__(self, model_dir: str, trust_remote_code: bool = False, max_length: int = 1024):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model.config.pad_token_id = self.tok.pad_token_id
        self.max_length = max_length
        self.info = {"kind": self.name, "model": model_dir}

    def _text(self, prompt: str, answer: str) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template([{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": answer}], tokenize=False)
        return f"{prompt}\n\n{answer}"

    def score(self, prompts: list[str], answers: list[str], batch: int = 16) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(prompts), batch):
                texts = [self._text(p, a) for p, a in zip(prompts[s:s + batch], answers[s:s + batch], strict=True)]
                enc = self.tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
                logits = self.model(**enc).logits.float()
                p = torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, -1)[:, -1]
                out.append(p.numpy())
        return np.concatenate(out) if out else np.zeros(0)


SCORE = re.compile(r"\b(10|[1-9])\b")


class OpenAIJudge:
    name = "openai"

    def __init__(self, base_url: str, model: str, prompt: str, api_key_env: str, timeout_s: float = 60.0):
        import openai

        if "{prompt}" not in prompt or "{answer}" not in prompt:
            raise ValueError("eval.judge_prompt must contain {prompt} and {answer}")
        # The key comes from the environment only: it never enters a config, manifest or report.
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout_s, max_retries=2)
        self.model, self.prompt = model, prompt
        self.unparsable = 0
        self.info = {"kind": self.name, "url": base_url, "model": model}

    def _one(self, prompt: str, answer: str) -> float:
        r = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": self.prompt.replace("{prompt}", prompt).replace("{answer}", answer)}])
        m = SCORE.search(r.choices[0].message.content or "")
        if m is None:
            self.unparsable += 1
            return float("nan")
        return (int(m.group(1)) - 1) / 9

    def score(self, prompts: list[str], answers: list[str]) -> np.ndarray:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            out = np.array(list(pool.map(self._one, prompts, answers)), float)
        self.info["unparsable"] = self.unparsable
        return out
