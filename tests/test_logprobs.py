"""The chunked / fused log-prob kernels equal a plain log_softmax, values and gradients."""

import pytest
import torch

from bco_ray.score.logprobs import completion_logps, sequence_logps, sequence_logps_from_hidden


def plain(logits, labels, mask):
    lp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def make(B=3, T=9, V=61, H=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[1] = False  # a row with nothing to score gets 0
    labels[~mask] = -100  # padding labels outside the mask must be tolerated
    return hidden, weight, labels, mask


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_sequence_logps_matches_log_softmax(chunk):
    hidden, weight, labels, mask = make()
    logits = (hidden @ weight.t()).requires_grad_()
    ours = sequence_logps(logits, labels, mask, chunk_size=chunk)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = plain(ref_logits, labels, mask)
    assert torch.allclose(ours, ref.double(), atol=1e-5, rtol=0)
    assert ours[1].item() == 0.0
    g = torch.randn(3)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_fused_head_matches_log_softmax(chunk):
    hidden, weight, labels, mask = make()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ours = sequence_logps_from_hidden(h, w, labels, mask, chunk_size=chunk)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = plain(h2 @ w2.t(), labels, mask)
    assert torch.allclose(ours, ref.double(), atol=1e-5, rtol=0)
    g = torch.randn(3)
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5, rtol=0)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5, rtol=0)


def test_bf16_inputs_give_float64_sums_close_to_fp32_math():
    hidden, weight, labels, mask = make(dtype=torch.bfloat16)
    logits = hidden @ weight.t()
    ours = sequence_logps(logits, labels, mask)
    assert ours.dtype == torch.float64
    assert torch.allclose(ours, plain(logits.float(), labels, mask).double(), atol=1e-4)
    fused = sequence_logps_from_hidden(hidden, weight, labels, mask)
    assert torch.allclose(fused, ours, atol=0.05)  # bf16 matmul per chunk vs whole


def test_label_outside_vocab_under_mask_is_an_error():
    hidden, weight, labels, mask = make()
    labels[0, mask[0].nonzero()[0, 0]] = -100
    with pytest.raises(ValueError, match="vocabulary"):
        sequence_logps(hidden @ weight.t(), labels, mask)


def test_completion_logps_fused_equals_full_logits(tiny_llama):
    model, tok = tiny_llama
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    comp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
    fused = completion_logps(model, ids, attn, comp, fused_head=True)
    full = completion_logps(model, ids, attn, comp, fused_head=False)
    logits = model(input_ids=ids, attention_mask=attn).logits
    by_hand = plain(logits[:, :-1], ids[:, 1:], (comp[:, 1:] * attn[:, 1:]).bool())
    assert torch.allclose(fused, full, atol=1e-4) and torch.allclose(full, by_hand.to(full.dtype), atol=1e-4)


@pytest.mark.slow
def test_compiled_head_matches_eager():
    hidden, weight, labels, mask = make(B=2, T=16, V=97, H=32)
    out = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp = sequence_logps_from_hidden(h, w, labels, mask, chunk_size=9, compiled=compiled)
        lp.sum().backward()
        out.append((lp.detach(), h.grad, w.grad))
    for a, b in zip(*out, strict=True):
        assert torch.allclose(a.double(), b.double(), atol=1e-5, rtol=1e-5)
