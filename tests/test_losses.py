"""The CLLM losses on cases small enough to compute by hand."""

import math

import pytest
import torch

from cllm_rt.training.losses import autoregressive_loss, consistency_loss, counted_positions


def test_counted_positions_skip_the_converged_prefix_and_past_eos():
    student = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    target = torch.tensor([[5, 9, 7, 8], [5, 9, 7, 8], [1, 2, 3, 4]])
    valid = torch.tensor([4, 3, 4])
    # row 0: y_1 agrees, y_2 differs -> positions 3 and 4 (0-based 2, 3) see different prefixes
    # row 1: same, but the fixed point has EOS at position 3 (valid = 3): position 4 is past it
    # row 2: the point is the target: every prefix agrees, nothing counts
    expected = torch.tensor([[False, False, True, True], [False, False, True, False], [False] * 4])
    assert torch.equal(counted_positions(student, target, valid), expected)


def test_first_position_never_counts():
    student, target = torch.tensor([[1, 2]]), torch.tensor([[3, 4]])
    assert counted_positions(student, target, torch.tensor([2])).tolist() == [[False, True]]


def _logits(*probabilities):
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_consistency_loss_is_forward_kl_averaged_per_row_then_over_rows():
    # one block of n = 3 per row, V = 2; only the positions counted_positions selects contribute
    student = torch.stack([_logits([.5, .5], [.5, .5], [.5, .5]), _logits([.5, .5], [.9, .1], [.2, .8])])
    target = torch.stack([_logits([.5, .5], [.75, .25], [.5, .5]), _logits([.1, .9], [.9, .1], [.6, .4])])
    student_block = torch.tensor([[1, 2, 3], [1, 2, 3]])
    target_block = torch.tensor([[7, 2, 3], [1, 5, 3]])  # row 0: positions 1, 2 count; row 1: position 2 only
    kl_row0_pos1 = .75 * math.log(.75 / .5) + .25 * math.log(.25 / .5)
    kl_row0_pos2 = 0.0
    kl_row1_pos2 = .6 * math.log(.6 / .2) + .4 * math.log(.4 / .8)
    expected = ((kl_row0_pos1 + kl_row0_pos2) / 2 + kl_row1_pos2) / 2
    loss = consistency_loss(student, target, student_block, target_block, torch.tensor([3, 3]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_consistency_loss_is_zero_at_a_match_and_only_the_student_gets_gradients():
    student = torch.randn(2, 4, 11, dtype=torch.float64, requires_grad=True)
    target = student.detach().clone().requires_grad_(True)
    blocks = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    loss = consistency_loss(student, target, blocks, blocks.flip(1), torch.tensor([4, 4]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss = consistency_loss(student, torch.randn_like(target), blocks, blocks.flip(1), torch.tensor([4, 4]))
    loss.backward()
    assert student.grad is not None and target.grad is None


def test_consistency_gradient_is_softmax_difference_over_counted_positions():
    # d KL(p_t || softmax(s)) / d s = softmax(s) - p_t: one counted position of one row, B = 1
    student = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[5.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    loss = consistency_loss(student, target, torch.tensor([[1, 2]]), torch.tensor([[3, 2]]), torch.tensor([2]))
    loss.backward()
    expected = student[0, 1].detach().softmax(-1) - target[0, 1].softmax(-1)
    torch.testing.assert_close(student.grad[0, 1], expected)
    assert student.grad[0, 0].abs().max() == 0  # the first position never counts


def test_row_without_counted_positions_weighs_zero_but_counts_in_the_mean():
    student = _logits([.5, .5], [.5, .5])[None].repeat(2, 1, 1)
    target = _logits([.5, .5], [.75, .25])[None].repeat(2, 1, 1)
    kl = .75 * math.log(1.5) + .25 * math.log(.5)
    loss = consistency_loss(student, target, torch.tensor([[1, 2], [1, 2]]), torch.tensor([[3, 2], [1, 2]]),
                            torch.tensor([2, 2]))
    assert loss.item() == pytest.approx(kl / 2)


def test_autoregressive_loss_is_cross_entropy_per_row_then_over_rows():
    logits = torch.zeros(2, 3, 4, dtype=torch.float64)  # uniform over 4 tokens: -log p = log 4
    logits[0, 0] = torch.tensor([0.0, math.log(3), 0.0, 0.0])  # p(token 1) = 3 / 6
    labels = torch.tensor([[1, 0, 0], [2, 3, 1]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    expected = (math.log(2) + math.log(4)) / 2
    assert autoregressive_loss(logits, labels, mask).item() == pytest.approx(expected)
