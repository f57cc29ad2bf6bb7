"""Summed completion log-probabilities without a full-vocabulary fp32 log-softmax.

A naive `logits.float().log_softmax(-1).gather(...)` materialises (batch, length, vocab)
floats in fp32, twice with its gradient: 6.3 GB for 16 x 512 tokens of a 49k vocabulary.
Here the softmax normaliser (logsumexp) is computed chunk by chunk in fp32 and only the
label's logit is gathered; the backward recomputes each chunk's softmax from the saved
logsumexp. Only positions inside the loss mask are scored at all (prompt tokens cost
nothing), and the `_from_hidden` variant fuses the LM head so that no logits tensor
exists outside one chunk, in the forward or the backward pass.

Conventions: `logits[b, t]` (or `hidden[b, t]`) scores `labels[b, t]`; the caller shifts
once (see `completion_logps`). Results are fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK = 1024  # token rows per chunk: 1024 x 49k vocab x 4 B = 200 MB of fp32


def _masked_rows(labels: torch.Tensor, loss_mask: torch.Tensor, seq_ids: torch.Tensor | None = None):
    """Flat indices of the scored positions, their labels, and the sequence of each: the
    batch row, or `seq_ids` at that position for packed sequences."""
    if labels.shape != loss_mask.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    flat = loss_mask.reshape(-1).to(torch.bool).nonzero().squeeze(-1)
    if seq_ids is None:
        row_of = torch.div(flat, labels.shape[-1], rounding_mode="floor")
    else:
        row_of = seq_ids.reshape(-1).index_select(0, flat).long()
    return flat, labels.reshape(-1).index_select(0, flat).long(), row_of


def _softmax_grad(chunk_logits32: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor,
                  grad_out: torch.Tensor) -> torch.Tensor:
    """d(logit[label] - logsumexp) / d logits, scaled by grad_out: g * (onehot - softmax).

    Works in place on `chunk_logits32`, a scratch copy owned by the caller.
    """
    g = chunk_logits32.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad_out.unsqueeze(-1))
    g.scatter_add_(-1, labels.unsqueeze(-1), grad_out.unsqueeze(-1))
    return g


class _TokenLogpsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, rows, labels, chunk):
        # Flattened here, not by the caller: a reshape inside the autograd graph made the
        # engine hold a second full-size copy of the gradient at its peak.
        logits2d = logits.reshape(-1, logits.shape[-1])
        n = rows.numel()
        out = torch.empty(n, dtype=torch.float32, device=logits2d.device)
        lse = torch.empty_like(out)
        for s in range(0, n, chunk):
            c = logits2d.index_select(0, rows[s:s + chunk]).float()
            lse[s:s + chunk] = torch.logsumexp(c, dim=-1)
            out[s:s + chunk] = c.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, rows, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, rows, labels, lse = ctx.saved_tensors
        logits2d = logits.reshape(-1, logits.shape[-1])
        grad_full = torch.zeros_like(logits)
        grad = grad_full.view(-1, logits.shape[-1])
        grad_out = grad_out.float()
        for s in range(0, rows.numel(), ctx.chunk):
            r = rows[s:s + ctx.chunk]
            c = logits2d.index_select(0, r).float()
            g = _softmax_grad(c, lse[s:s + ctx.chunk], labels[s:s + ctx.chunk], grad_out[s:s + ctx.chunk])
            grad.index_copy_(0, r, g.to(grad.dtype))
        return grad_full, None, None, None


def _head_chunk_forward(h, weight, labels):
    """(logp of each label, logsumexp) for one chunk of rows of the fused head."""
    c = (h @ weight.t()).float()
    lse = torch.logsumexp(c, dim=-1)
    return c.gather(-1, labels[:, None]).squeeze(-1) - lse, lse


def _head_chunk_backward(h, weight, labels, lse, grad_out):
    """(grad wrt h, grad wrt weight in fp32) for one chunk; recomputes the chunk's logits."""
    c = (h @ weight.t()).float()
    g = _softmax_grad(c, lse, labels, grad_out).to(h.dtype)
    # The chunk's product is in the input dtype (as plain autograd would give); the caller
    # accumulates the chunks in fp32 so the sum does not drift in bf16.
    return g @ weight, (g.t() @ h).float()


_COMPILED: dict = {}


def _head_fns(compiled: bool):
    """Eager chunk functions, or torch.compile'd ones: Inductor fuses the fp32 cast, the
    logsumexp and the softmax-gradient passes into few kernels (matmuls stay on cuBLAS)."""
    if not compiled:
        return _head_chunk_forward, _head_chunk_backward
    if not _COMPILED:
        _COMPILED["fns"] = (torch.compile(_head_chunk_forward, dynamic=True),
                            torch.compile(_head_chunk_backward, dynamic=True))
    return _COMPILED["fns"]


class _TokenLogpsFromHidden(torch.autograd.Function):
    """Fused LM head + log-prob: logits exist one chunk at a time, forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, compiled):
        fwd, _ = _head_fns(compiled)
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for s in range(0, n, chunk):
            out[s:s + chunk], lse[s:s + chunk] = fwd(hidden[s:s + chunk], weight, labels[s:s + chunk])
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk, ctx.compiled = chunk, compiled
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        _, bwd = _head_fns(ctx.compiled)
        grad_out = grad_out.float()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            e = s + ctx.chunk
            gh, gw = bwd(hidden[s:e], weight, labels[s:e], lse[s:e], grad_out[s:e])
            grad_h[s:e] = gh
            grad_w += gw
        return grad_h, grad_w.to(weight.dtype), None, None, None


def _sum_per_sequence(token_logps: torch.Tensor, row_of: torch.Tensor, batch: int) -> torch.Tensor:
    # float64: a 1,000-token sum of about -1e3 keeps ~1e-9 instead of fp32's ~1e-4, which is
    # what lets reference (vLLM, hf) and policy sums agree to 1e-4; it costs B numbers.
    return torch.zeros(batch, dtype=torch.float64, device=token_logps.device).index_add(
        0, row_of, token_logps.double())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   chunk_size: int = DEFAULT_CHUNK, seq_ids: torch.Tensor | None = None,
                   n_seqs: int | None = None) -> torch.Tensor:
    """Summed log-prob of `labels` under `logits` over the positions where `loss_mask` is set.

    logits: (B, T, V), any float dtype; labels, loss_mask: (B, T). Returns (B,) float64
    (token log-probs are fp32; their sums accumulate in float64).
    Peak extra memory is one (chunk_size, V) fp32 block, not (B, T, V).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (batch, length, vocab), got {tuple(logits.shape)}")
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    rows, lab, row_of = _masked_rows(labels, loss_mask, seq_ids)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= logits.shape[-1]):
        raise ValueError("a label under loss_mask is outside the vocabulary (padding inside the mask?)")
    tok = _TokenLogpsFromLogits.apply(logits, rows, lab, int(chunk_size))
    return _sum_per_sequence(tok, row_of, labels.shape[0] if seq_ids is None else n_seqs)


def sequence_logps_from_hidden(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                               labels: torch.Tensor, loss_mask: torch.Tensor,
                               chunk_size: int = DEFAULT_CHUNK, compiled: bool = False,
                               seq_ids: torch.Tensor | None = None, n_seqs: int | None = None) -> torch.Tensor:
    """`sequence_logps(hidden @ lm_head_weight.T, ...)` without ever holding the logits.

    hidden: (B, T, H); lm_head_weight: (V, H) (a bias-free head, as in Llama/Qwen/SmolLM).
    compiled: run each chunk's math through torch.compile (worth it on GPUs).
    seq_ids (B, T), n_seqs: packed sequences; the sums are per sequence id, (n_seqs,).
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    rows, lab, row_of = _masked_rows(labels, loss_mask, seq_ids)
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= lm_head_weight.shape[0]):
        raise ValueError("a label under loss_mask is outside the vocabulary (padding inside the mask?)")
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    tok = _TokenLogpsFromHidden.apply(h, lm_head_weight, lab, int(chunk_size), bool(compiled))
    return _sum_per_sequence(tok, row_of, labels.shape[0] if seq_ids is None else n_seqs)


def _plain_head(model) -> torch.Tensor | None:
    """The LM head weight when logits are exactly hidden @ W.T; None for exotic heads."""
    head = model.get_output_embeddings()
    cfg = model.config
    if head is None or getattr(head, "bias", None) is not None:
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head.weight


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     completion_mask: torch.Tensor, chunk_size: int = DEFAULT_CHUNK,
                     fused_head: bool = True, compiled_head: bool = False,
                     position_ids: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                     n_seqs: int | None = None) -> torch.Tensor:
    """Summed log-prob of the completion tokens of each row under a causal LM.

    completion_mask marks the tokens to score (completion and its EOS; not the prompt, not
    padding). Position t's output scores token t+1, hence the shift. With `fused_head` the
    decoder's hidden states go through `sequence_logps_from_hidden`; models whose head is
    not a plain bias-free linear layer fall back to full logits + `sequence_logps`.

    Packed sequences (no padding): one row holding n_seqs sequences back to back, their
    `position_ids` restarting at 0 and `seq_ids` numbering them, attention_mask None.
    transformers then attends within each sequence only (a block-causal mask under SDPA,
    variable-length kernels under flash attention), and the sums are per sequence.
    """
    labels = input_ids[:, 1:]
    if position_ids is None:
        mask = completion_mask[:, 1:].to(torch.bool) & attention_mask[:, 1:].to(torch.bool)
        ids = None
    else:  # a position scores the next token only inside its own sequence
        mask = completion_mask[:, 1:].to(torch.bool) & (seq_ids[:, 1:] == seq_ids[:, :-1])
        ids = seq_ids[:, 1:]
    weight = _plain_head(model) if fused_head else None
    if weight is not None:
        # use_cache=False: a KV cache is useless here, and its per-layer state made
        # torch.compile recompile every layer until it gave up (measured on an H100).
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     use_cache=False).last_hidden_state
        return sequence_logps_from_hidden(hidden[:, :-1], weight, labels, mask, chunk_size, compiled_head, ids, n_seqs)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    return sequence_logps(logits[:, :-1], labels, mask, chunk_size, ids, n_seqs)
