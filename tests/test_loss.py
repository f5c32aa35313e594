"""Each objective equals an independent computation of its formula on fixed log-probs."""

import math

import pytest
import torch

from povid.loss import POVIDLoss, PreferenceLogProbs

# Two examples; the second has no noise answer.
LP = dict(
    chosen=[-10.0, -20.0], rejected=[-14.0, -19.0], ref_chosen=[-11.0, -18.0],
    ref_rejected=[-12.0, -21.0], noise=[-30.0, 0.0], ref_noise=[-25.0, 0.0],
)  # fmt: skip
R_W = [1.0, -2.0]  # chosen - ref_chosen
R_TEXT = [-2.0, 2.0]
R_NOISE = [-5.0, None]


def _logprobs(**extra):
    tensors = {k: torch.tensor(v) for k, v in LP.items()}
    return PreferenceLogProbs(**tensors, noise_mask=torch.tensor([True, False]), **extra)


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid():
    loss, _ = POVIDLoss(objective="dpo", beta=0.1)(_logprobs())
    expected = sum(-_log_sigmoid(0.1 * (w - t)) for w, t in zip(R_W, R_TEXT)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_povid_paper_single_sigmoid_with_weights():
    fn = POVIDLoss(objective="povid", beta=0.5, alpha=2.0, beta1=0.7, beta2=0.3)
    loss, metrics = fn(_logprobs())
    first = -_log_sigmoid(0.5 * (2.0 * R_W[0] - (0.7 * R_TEXT[0] + 0.3 * R_NOISE[0])))
    second = -_log_sigmoid(0.5 * (2.0 * R_W[1] - 0.7 * R_TEXT[1]))  # no noise answer
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert metrics["rewards/noise"].item() == pytest.approx(0.5 * R_NOISE[0])


def test_povid_released_two_sigmoids():
    loss, _ = POVIDLoss(objective="povid_released", beta=0.1)(_logprobs())
    first = 0.5 * -_log_sigmoid(0.1 * (R_W[0] - R_TEXT[0])) + 0.5 * -_log_sigmoid(
        0.1 * (R_W[0] - R_NOISE[0])
    )
    second = -_log_sigmoid(0.1 * (R_W[1] - R_TEXT[1]))
    assert loss.item() == pytest.approx((first + second) / 2, rel=1e-6)


@pytest.mark.parametrize(
    "loss_type, f",
    [
        ("ipo", lambda h, b: (h - 1 / (2 * b)) ** 2),
        ("hinge", lambda h, b: max(0.0, 1 - b * h)),
    ],
)
def test_ipo_and_hinge(loss_type, f):
    loss, _ = POVIDLoss(objective="dpo", beta=0.2, loss_type=loss_type)(_logprobs())
    expected = sum(f(w - t, 0.2) for w, t in zip(R_W, R_TEXT)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_and_chosen_nll():
    fn = POVIDLoss(objective="dpo", beta=0.1, label_smoothing=0.2, chosen_nll_weight=0.5)
    loss, metrics = fn(_logprobs(chosen_tokens=torch.tensor([5, 10])))
    dpo = sum(
        -0.8 * _log_sigmoid(0.1 * (w - t)) - 0.2 * _log_sigmoid(-0.1 * (w - t))
        for w, t in zip(R_W, R_TEXT)
    ) / 2
    nll = (10.0 / 5 + 20.0 / 10) / 2
    assert loss.item() == pytest.approx(dpo + 0.5 * nll, rel=1e-6)
    assert metrics["loss/chosen_nll"].item() == pytest.approx(nll, rel=1e-6)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="objective"):
        POVIDLoss(objective="ppo")
    with pytest.raises(ValueError, match="loss_type"):
        POVIDLoss(loss_type="square")


def test_loss_is_a_module_returning_loss_and_metrics():
    fn = POVIDLoss(objective="povid")
    assert isinstance(fn, torch.nn.Module) and "objective='povid'" in repr(fn)
    loss, metrics = fn(_logprobs())
    assert loss.ndim == 0
    assert metrics["loss"].item() == pytest.approx(loss.item()) and "rewards/accuracy" in metrics
