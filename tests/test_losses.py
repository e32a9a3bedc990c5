"""The CLLM and Jacobi Forcing losses, the noise schedule, the packed layout and its attention mask, on cases
small enough to compute by hand."""

import math

import pytest
import torch

from cllm_rt.training.losses import autoregressive_loss, consistency_loss, counted_positions
from cllm_rt.training.packing import block_mask, noisy_state, pack_answer, schedule, unconverged_fraction
from cllm_rt.training.storage import BlockTrajectory, PromptTrajectories
from cllm_rt.training.train import TrainConfig, jacobi_forcing_batch_loss


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


# ---------------------------------------------------------------- Jacobi Forcing: schedule, packing, mask, loss

def test_consistency_loss_row_weights_replace_the_mean_over_rows():
    student = torch.stack([_logits([.5, .5], [.5, .5]), _logits([.5, .5], [.2, .8])])
    target = torch.stack([_logits([.5, .5], [.75, .25]), _logits([.5, .5], [.6, .4])])
    blocks, other = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[3, 2], [3, 2]])  # position 2 counts in both rows
    kl0 = .75 * math.log(.75 / .5) + .25 * math.log(.25 / .5)
    kl1 = .6 * math.log(.6 / .2) + .4 * math.log(.4 / .8)
    weights = torch.tensor([.25, .5], dtype=torch.float64)
    loss = consistency_loss(student, target, blocks, other, torch.tensor([2, 2]), weights)
    assert loss.item() == pytest.approx(.25 * kl0 + .5 * kl1, rel=1e-6)  # the loss computes in float32


def _block(index, *states, valid=None):
    return BlockTrajectory(index, [list(s) for s in states], valid or len(states[0]))


def test_noisy_state_is_the_state_nearest_to_the_progressive_schedule():
    fixed = [1, 2, 3, 4]
    # unconverged fractions 1, .75, .5, .5 (a tie: the earlier state wins), .25, 0
    states = [[9, 9, 9, 9], [1, 9, 9, 9], [1, 2, 9, 9], [1, 2, 9, 8], [1, 2, 3, 9], fixed]
    assert [unconverged_fraction(s, fixed) for s in states] == [1, .75, .5, .5, .25, 0]
    # window 5: linspace(0, 1, 5) = 0, .25, .5, .75, 1, then again from 0
    assert [noisy_state(_block(k, *states), 5) for k in range(7)] == [5, 4, 2, 1, 0, 5, 4]
    assert schedule(7, 16) == pytest.approx(7 / 15) and schedule(16, 16) == 0 and schedule(3, 1) == 0
    # the nearest state, whichever side: window 6 wants .4 of block 2 (the fixed point is nearer than the
    # guess) and .6 of block 3 (the guess is nearer)
    assert noisy_state(_block(2, [9, 9, 9, 9], fixed), 6) == 1 and noisy_state(_block(3, [9, 9, 9, 9], fixed), 6) == 0


def _answer():
    """Prompt [10, 11, 12]; n = 2; answer a_0 … a_4 = 20 … 24 (block 0: a_1 a_2, block 1: a_3 a_4)."""
    blocks = [_block(0, [50, 51], [21, 51], [21, 22]), _block(1, [60, 61], [23, 24])]
    return PromptTrajectories(0, [10, 11, 12], [20, 21, 22, 23, 24], blocks)


def test_pack_answer_layout_positions_and_ar_targets():
    # window 2: block 0 wants fraction 0 (its fixed point: no noisy copy), block 1 wants 1 (the guess [60, 61])
    pack = pack_answer(_answer(), window=2)
    assert pack.tokens == [10, 11, 12, 20, 21, 22, 60, 22, 23]
    assert pack.positions == [0, 1, 2, 3, 4, 5, 6, 5, 6]  # both copies of block 1 at a_2's and a_3's positions
    assert pack.segments == [0, 0, 0, 2, 2, 3, 3, 4, 4]
    assert pack.ar_labels == [20, 21, 22, 23, 24] and pack.ar_columns == [2, 3, 4, 7, 8]
    assert [(c.block.index, c.state, c.noisy_start, c.clean_start) for c in pack.noisy] == [(1, 0, 5, 7)]
    cut = _answer()
    cut.answer = cut.answer[:4]  # max_new_tokens cut the answer inside block 1: a_4 is no AR target
    assert pack_answer(cut, window=2).ar_columns == [2, 3, 4, 7]


def test_block_mask_sees_the_prompt_earlier_clean_blocks_and_itself_causally():
    segments = torch.tensor([[0, 0, 2, 2, 3, 3, 4, 4, -1],  # block 0 clean only; block 1 noisy + clean; padding
                             [0, 1, 1, 2, 2, 3, 3, 4, 4]])  # blocks 0 and 1 noisy + clean
    expected = [
        ["100000000", "110000000", "111000000", "111100000", "111110000", "111111000", "111100100", "111100110",
         "000000001"],
        # noisy block 1 (rows 5, 6) sees the clean block 0, not the noisy one; clean block 1 neither noisy copy
        ["100000000", "110000000", "111000000", "100100000", "100110000", "100111000", "100111100", "100110010",
         "100110011"],
    ]
    mask = block_mask(segments)
    assert mask.shape == (2, 1, 9, 9) and mask.dtype == torch.bool
    assert [["".join(str(int(v)) for v in row) for row in m[0].tolist()] for m in mask] == expected


def test_jacobi_forcing_loss_on_a_hand_computed_case():
    # V = 2, n = 2. Prompt [1, 0]; answer a_0 … a_4 = 1 0 1 1 0; block 1's guess [0, 0] is its noisy copy
    blocks = [_block(0, [1, 1], [0, 1]), _block(1, [0, 0], [1, 0])]
    answer = PromptTrajectories(0, [1, 0], [1, 0, 1, 1, 0], blocks)
    # packed: prompt 1 0 | clean 0: 1 0 | noisy 1: 1 0 | clean 1: 1 1; logits at every packed index from the
    # prompt's last one: flat k = packed index - 1
    probabilities = [[.5, .5], [.25, .75], [.5, .5], [.5, .5], [.9, .1], [.5, .5], [.6, .4]]

    def model(input_ids, rows, cols, attention_mask, position_ids):
        assert input_ids.tolist() == [[1, 0, 1, 0, 1, 0, 1, 1]] and position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 5]]
        assert cols.tolist() == list(range(1, 8))
        return torch.tensor(probabilities, dtype=torch.float64).log()

    total, terms = jacobi_forcing_batch_loss(model, [answer], TrainConfig(objective="jacobi-forcing", noise_window=2),
                                             "cpu")
    # AR: a_0 … a_4 predicted at flat 0, 1, 2 (prompt, clean 0) and 5, 6 (clean 1)
    ar = (math.log(2) + math.log(4) + math.log(2) + math.log(2) - math.log(.6)) / 5
    # consistency: block 1, position 2 only (position 1 reads the same a_2 in both copies); mean over 2 blocks
    kl = .6 * math.log(.6 / .9) + .4 * math.log(.4 / .1)
    assert terms.ar == pytest.approx(ar) and terms.consistency == pytest.approx(kl / 2)
    assert total.item() == pytest.approx(kl / 2 + 10 * ar) and (terms.blocks, terms.tokens) == (1, 8)
