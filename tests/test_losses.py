import math

import pytest
import torch

from deepnoise import losses


def test_sigmoid_rampup():
    assert losses.sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert losses.sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert losses.sigmoid_rampup(10, 10) == 1.0
    assert losses.sigmoid_rampup(50, 10) == 1.0
    assert losses.sigmoid_rampup(3, 0) == 1.0


def test_consistency_loss_value_and_gradient():
    torch.manual_seed(0)
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    loss = losses.consistency_loss(s, t)
    p, q = s.softmax(1), t.softmax(1)
    assert loss.item() == pytest.approx(((p - q) ** 2).sum(1).mean().item(), rel=1e-6)
    loss.backward()
    assert s.grad is not None and t.grad is None
    assert losses.consistency_loss(t.detach(), t.detach()).item() == 0.0


def test_pseudo_label_loss():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
    targets = torch.tensor([0, -1, 1])
    expect = torch.nn.functional.cross_entropy(logits[[0, 2]], targets[[0, 2]])
    assert losses.pseudo_label_loss(logits, targets).item() == pytest.approx(expect.item())
    none = losses.pseudo_label_loss(logits, torch.tensor([-1, -1, -1]))
    assert none.item() == 0.0
    none.backward()  # keeps a graph


def test_ema_decay_warmup():
    assert losses.ema_decay(0, 0.999, True) == 0.0
    assert losses.ema_decay(1, 0.999, True) == pytest.approx(0.5)
    assert losses.ema_decay(9, 0.999, True) == pytest.approx(0.9)
    assert losses.ema_decay(100000, 0.999, True) == 0.999
    assert losses.ema_decay(0, 0.99, False) == 0.99


def test_ema_update_math():
    teacher, student = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(2.0)
        student.num_batches_tracked.fill_(7)
    losses.ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher.weight, torch.full((3,), 0.75 * 1 + 0.25 * 3))
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 0.5))
    assert int(teacher.num_batches_tracked) == 7
    losses.ema_update(teacher, student, 0.0)
    torch.testing.assert_close(teacher.weight, student.weight)


def test_ema_decay_capped_by_the_run_length():
    # 100-step run, window 10%: at most 1 - 1/10 whatever ema_decay says; long runs are unaffected
    assert losses.ema_decay(50, 0.99, True, total_steps=100, max_window=0.1) == pytest.approx(0.9)
    assert losses.ema_decay(5, 0.99, True, total_steps=100, max_window=0.1) == pytest.approx(1 - 1 / 6)
    assert losses.ema_decay(10**6, 0.999, True, total_steps=10**6, max_window=0.1) == pytest.approx(0.999)
    assert losses.ema_decay(500, 0.99, True, total_steps=100, max_window=0.0) == pytest.approx(0.99)


def test_soft_pseudo_label_loss():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]], requires_grad=True)
    table = torch.tensor([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    rows = torch.tensor([0, -1, 1])
    got = losses.soft_pseudo_label_loss(logits, rows, table)
    logp = torch.log_softmax(logits.detach(), dim=1)
    want = -((table[0] * logp[0]).sum() + (table[1] * logp[2]).sum()) / 2
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.all(logits.grad[1] == 0)
    assert float(losses.soft_pseudo_label_loss(logits.detach(), torch.tensor([-1, -1, -1]), table)) == 0.0
