"""The BCO / KTO / DPO losses against hand-computed values and gradients."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bco_ray.train.objectives import as_bool_labels, bco_loss, dpo_loss, kto_kl_estimate, kto_loss


def softplus(x: float) -> float:  # -log sigmoid(-x), written out by hand
    return math.log1p(math.exp(x))


def nls(x: float) -> float:  # -log sigmoid(x)
    return softplus(-x)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


POL = [-10.0, -12.0, -8.0, -20.0]
REF = [-11.0, -11.0, -9.0, -15.0]
LAB = [True, False, True, False]
# r = 0.1 * (pol - ref) = [0.1, -0.1, 0.1, -0.5]


def test_bco_loss_hand_computed():
    pol = torch.tensor(POL, requires_grad=True)
    loss, rewards = bco_loss(pol, torch.tensor(REF), LAB, delta=0.05, beta=0.1)
    assert rewards.tolist() == pytest.approx([0.1, -0.1, 0.1, -0.5], abs=1e-6)
    expected = (nls(0.05) + nls(0.15) + nls(0.05) + nls(0.55)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert not rewards.requires_grad


def test_bco_gradient_hand_computed():
    pol = torch.tensor(POL, requires_grad=True)
    w = [7.0, 2.0, 9.0, 0.5]  # weights of thumbs-up rows must be ignored
    loss, _ = bco_loss(pol, torch.tensor(REF), LAB, delta=0.05, beta=0.1, weights=w)
    loss.backward()
    m = [0.05, -0.15, 0.05, -0.55]  # r - delta
    # d/dm of -log s(m) is s(m) - 1; of -w log s(-m) is w s(m); chain: beta / B.
    expected = [(sig(m[0]) - 1) * 0.1 / 4, 2.0 * sig(m[1]) * 0.1 / 4,
                (sig(m[2]) - 1) * 0.1 / 4, 0.5 * sig(m[3]) * 0.1 / 4]
    assert pol.grad.tolist() == pytest.approx(expected, rel=1e-5)
    expected_loss = (nls(0.05) + 2.0 * nls(0.15) + nls(0.05) + 0.5 * nls(0.55)) / 4
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)


def test_delta_gets_no_gradient_and_reference_none():
    pol = torch.tensor(POL, requires_grad=True)
    ref = torch.tensor(REF, requires_grad=True)
    delta = torch.tensor(0.3, requires_grad=True)
    loss, _ = bco_loss(pol, ref, LAB, delta=delta)
    loss.backward()
    assert delta.grad is None
    assert torch.allclose(ref.grad, -pol.grad)  # r depends on pol - ref only


def test_sum_reduction_supports_accumulation():
    pol, ref = torch.tensor(POL), torch.tensor(REF)
    full, _ = bco_loss(pol, ref, LAB, delta=0.02)
    a, _ = bco_loss(pol[:1], ref[:1], LAB[:1], delta=0.02, reduction="sum")
    b, _ = bco_loss(pol[1:], ref[1:], LAB[1:], delta=0.02, reduction="sum")
    assert ((a + b) / 4).item() == pytest.approx(full.item(), rel=1e-6)


@pytest.mark.parametrize("labels", [
    [True, False, True, False], [1, 0, 1, 0], np.array([True, False, True, False]),
    np.array([1, 0, 1, 0], dtype=np.int8), [np.bool_(True), np.bool_(False), np.bool_(True), np.bool_(False)],
    torch.tensor([True, False, True, False]), torch.tensor([1, 0, 1, 0]), torch.tensor([1.0, 0.0, 1.0, 0.0]),
])
def test_label_spellings_give_identical_losses(labels):
    ref_loss, _ = bco_loss(torch.tensor(POL), torch.tensor(REF), LAB, delta=0.05)
    loss, _ = bco_loss(torch.tensor(POL), torch.tensor(REF), labels, delta=0.05)
    assert torch.isfinite(loss)
    assert loss.item() == ref_loss.item()


@pytest.mark.parametrize("labels", [[2, 0, 1, 0], [-1, 1, 1, 1], ["up", "down", "up", "up"],
                                    [0.5, 0, 1, 1], [None, True, True, True]])
def test_bad_labels_are_errors(labels):
    with pytest.raises(ValueError, match="labels"):
        bco_loss(torch.tensor(POL), torch.tensor(REF), labels, delta=0.0)


def test_label_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        bco_loss(torch.tensor(POL), torch.tensor(REF), [True, False], delta=0.0)


@pytest.mark.parametrize("label", [True, False])
def test_one_label_batches_and_extreme_rewards_are_finite(label):
    pol = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    loss, _ = bco_loss(pol, torch.zeros(3), [label] * 3, delta=0.0, beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pol.grad).all()


def test_empty_batch_is_zero_not_nan():
    pol = torch.zeros(0, requires_grad=True)
    loss, rewards = bco_loss(pol, torch.zeros(0), [], delta=0.0)
    assert loss.item() == 0.0 and rewards.numel() == 0
    loss.backward()


def test_bad_weights_are_errors():
    with pytest.raises(ValueError, match="weights"):
        bco_loss(torch.tensor(POL), torch.tensor(REF), LAB, delta=0.0, weights=[1, 1, float("nan"), 1])
    with pytest.raises(ValueError, match="weights"):
        bco_loss(torch.tensor(POL), torch.tensor(REF), LAB, delta=0.0, weights=[1, -1, 1, 1])


def test_as_bool_labels_roundtrip():
    assert as_bool_labels([1, 0, True]).tolist() == [True, False, True]
    assert as_bool_labels(np.array([0.0, 1.0])).dtype == torch.bool


@settings(max_examples=200, deadline=None)
@given(st.floats(-20, 20), st.floats(-20, 20), st.floats(-20, 20))
def test_bco_pair_upper_bounds_dpo_for_any_delta(r_w, r_l, delta):
    """The paper's Theorem: BCO's pair loss bounds DPO's, tightest at delta = (r_w + r_l)/2."""
    up = torch.tensor([r_w], dtype=torch.float64)
    dn = torch.tensor([r_l], dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.float64)
    bco_w, _ = bco_loss(up, z, [True], delta=delta, beta=1.0, reduction="sum")
    bco_l, _ = bco_loss(dn, z, [False], delta=delta, beta=1.0, reduction="sum")
    dpo, _, _ = dpo_loss(up, dn, z, z, beta=1.0)
    assert (bco_w + bco_l).item() >= dpo.item() - 1e-9
    mid = (r_w + r_l) / 2
    best_w, _ = bco_loss(up, z, [True], delta=mid, beta=1.0, reduction="sum")
    best_l, _ = bco_loss(dn, z, [False], delta=mid, beta=1.0, reduction="sum")
    assert (best_w + best_l).item() <= (bco_w + bco_l).item() + 1e-9


def test_dpo_hand_computed_and_gradient():
    pw = torch.tensor([-10.0, -5.0], requires_grad=True)
    pl = torch.tensor([-12.0, -4.0], requires_grad=True)
    rw, rl = torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -6.0])
    loss, cr, rr = dpo_loss(pw, pl, rw, rl, beta=0.1)
    # margins: 0.1*[(1) - (-1)] = 0.2 ; 0.1*[(0) - (2)] = -0.2
    assert loss.item() == pytest.approx((nls(0.2) + nls(-0.2)) / 2, rel=1e-6)
    assert cr.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert rr.tolist() == pytest.approx([-0.1, 0.2], abs=1e-6)
    loss.backward()
    assert pw.grad.tolist() == pytest.approx([(sig(0.2) - 1) * 0.05, (sig(-0.2) - 1) * 0.05], rel=1e-5)
    assert torch.allclose(pl.grad, -pw.grad)


def test_kto_hand_computed():
    pol = torch.tensor([-10.0, -12.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0])
    kl = kto_kl_estimate(torch.tensor([-5.0, -7.0, -6.0]), torch.tensor([-6.0, -6.0, -6.5]))
    assert kl.item() == pytest.approx(0.5 / 3, rel=1e-6)  # mean of [1, -1, 0.5]
    loss, rewards = kto_loss(pol, ref, [True, False], kl, beta=0.1, desirable_weight=1.0,
                             undesirable_weight=2.0)
    z = 0.5 / 3
    expected = ((1 - sig(0.1 * (1 - z))) + 2.0 * (1 - sig(0.1 * (z + 1)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert rewards.tolist() == pytest.approx([0.1, -0.1], abs=1e-6)
    loss.backward()
    # d/dx (1 - s(b(x - z))) = -b s(1-s); for the thumbs-down row d/dx (1 - s(b(z - x))) = +b s(1-s) * 2.
    s0, s1 = sig(0.1 * (1 - z)), sig(0.1 * (z + 1))
    assert pol.grad.tolist() == pytest.approx([-0.1 * s0 * (1 - s0) / 2, 2 * 0.1 * s1 * (1 - s1) / 2], rel=1e-5)


def test_kto_kl_is_clamped_at_zero():
    assert kto_kl_estimate(torch.tensor([-9.0]), torch.tensor([-5.0])).item() == 0.0
    assert kto_kl_estimate(torch.zeros(0), torch.zeros(0)).item() == 0.0
