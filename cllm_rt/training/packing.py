"""Jacobi Forcing's packed training sequence (hao-ai-lab/JacobiForcing, arXiv 2512.14681): every block of an
answer trained in one forward.

One sequence per answer: ``[prompt | noisy 0 | clean 0 | noisy 1 | clean 1 | …]``. With the conventions of
:mod:`cllm_rt.training.collect` (block k covers answer tokens ``a_{1+kn} … a_{(k+1)n}``; its context is the
prompt and ``a_0 … a_{kn}``):

* clean copy of block k: ``[a_{kn}, y*_1 … y*_{n-1}]`` — the last final token, then the fixed point but its
  last token; so the prompt followed by the clean copies in order is the greedy answer, teacher-forced.
* noisy copy of block k: ``[a_{kn}, y_1 … y_{n-1}]`` for one trajectory state ``y`` of the block: the n
  inputs of a CLLM step on that state (:func:`cllm_rt.training.train.cllm_batch_loss` feeds the same).
* both copies take the positions ``P + kn … P + kn + n - 1`` (P: prompt length), the positions they have in
  decoding.

The attention mask (:func:`block_mask`) lets the prompt see itself causally; clean copy k the prompt, the
clean copies of earlier blocks and itself causally; noisy copy k the prompt, the clean copies of earlier
blocks and itself causally. Hence a clean copy's logits are those of an ordinary causal forward over prompt
+ answer (the AR loss, and the teacher), and a noisy copy's logits are those of a Jacobi step of block k in
its decoding context — the committed fixed points before it, which is what cllm_rt's decoding conditions
on. (JF's trainer lets noisy block k see the earlier *noisy* blocks, for its multi-block decoding that
drafts several blocks at once; cllm_rt decodes one block at a time, so the noisy copies see clean context.)
Both copies' logit at block position i predict ``y_{i+1}`` from the same context; the teacher is the clean
copy's, detached. That is global consistency (:mod:`cllm_rt.training.losses`) for every block of an answer
in one forward, instead of two forwards over the whole context per block.

Noise: block k's state is the one whose unconverged fraction ``(n - first position differing from the
fixed point) / n`` is nearest to the progressive schedule ``linspace(0, 1, W)[k mod W]`` (JF's default
W = 16); ties go to the earlier, noisier state, as JF's ``numpy.argmin`` does. A block whose chosen state
agrees with the fixed point on ``y_1 … y_{n-1}`` — the fixed point itself (block 0 always: the schedule
starts at 0), or a state differing only in ``y_n``, which no position of the block reads — gets no noisy
copy: its inputs would be the clean copy's, adding exactly 0 to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .storage import BlockTrajectory, PromptTrajectories

PAD_SEGMENT = -1  # right padding of a batch: sees only padding, is seen by nothing real


def schedule(block_index: int, window: int) -> float:
    """The unconverged fraction wanted for block ``block_index``: ``linspace(0, 1, window)[block_index % window]``."""
    return (block_index % window) / (window - 1) if window > 1 else 0.0


def unconverged_fraction(state: list[int], fixed_point: list[int]) -> float:
    """``(n - first position where state and fixed point differ) / n``: 0 at the fixed point, 1 if y_1 differs."""
    first = next((i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b), len(state))
    return (len(state) - first) / len(state)


def noisy_state(block: BlockTrajectory, window: int) -> int:
    """Index of the state of ``block`` whose unconverged fraction is nearest to the schedule (earliest on ties)."""
    wanted = schedule(block.index, window)
    distances = [abs(unconverged_fraction(s, block.states[-1]) - wanted) for s in block.states]
    return distances.index(min(distances))


@dataclass
class NoisyCopy:
    block: BlockTrajectory
    state: int  # index into block.states
    noisy_start: int  # packed index of the noisy copy's first token
    clean_start: int  # packed index of the clean copy's first token


@dataclass
class PackedAnswer:
    tokens: list[int]
    positions: list[int]  # position ids: shared by the two copies of a block
    segments: list[int]  # 0 the prompt, 2k + 1 the noisy copy of block k, 2k + 2 its clean copy
    prompt_length: int
    ar_labels: list[int]  # the greedy answer a_0 …; a_t is predicted at packed index ar_columns[t]
    ar_columns: list[int]
    noisy: list[NoisyCopy]
    num_blocks: int


def pack_answer(p: PromptTrajectories, window: int) -> PackedAnswer:
    """The packed sequence of one answer (module docstring); every block of ``p`` gets a clean copy."""
    n = len(p.blocks[0].states[0])
    prompt_length = len(p.prompt)
    tokens, positions, segments = list(p.prompt), list(range(prompt_length)), [0] * prompt_length
    ar_columns = [prompt_length - 1]  # the prompt's last token predicts a_0
    noisy = []

    def add(block_tokens: list[int], start: int, segment: int) -> int:
        first = len(tokens)
        tokens.extend(block_tokens)
        positions.extend(range(start, start + n))
        segments.extend([segment] * n)
        return first

    for block in p.blocks:
        last_final = p.answer[block.index * n]
        start = prompt_length + block.index * n  # where a_{kn} sits in prompt + answer
        state = noisy_state(block, window)
        noisy_start = None
        if block.states[state][:-1] != block.states[-1][:-1]:
            noisy_start = add([last_final] + block.states[state][:-1], start, 2 * block.index + 1)
        clean_start = add([last_final] + block.states[-1][:-1], start, 2 * block.index + 2)
        if noisy_start is not None:
            noisy.append(NoisyCopy(block, state, noisy_start, clean_start))
        # clean position i predicts y*_{i+1} = a_{kn+1+i}; positions past the stored answer are not AR targets
        ar_columns += [clean_start + i for i in range(n) if block.index * n + 1 + i < len(p.answer)]
    return PackedAnswer(tokens, positions, segments, prompt_length, list(p.answer), ar_columns, noisy, len(p.blocks))


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, T]`` (True: query may attend to key) of packed ``segments`` [B, T].

    A query sees the keys of its own segment up to itself, and the prompt and clean copies of every earlier
    block; padding (:data:`PAD_SEGMENT`) sees earlier padding only, so no softmax row is empty (an all-False
    row would give NaN outputs, and NaN gradients through the matmuls even where no loss reads them).
    """
    # block of each position: -1 for the prompt (context of every block), -2 for padding (sees no context)
    block = torch.where(segments > 0, (segments - 1) // 2, torch.where(segments == 0, -1, -2))
    is_context = (segments >= 0) & (segments % 2 == 0)  # the prompt and the clean copies
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    same_segment = (segments[:, :, None] == segments[:, None, :]) & causal
    earlier_context = is_context[:, None, :] & (block[:, None, :] < block[:, :, None])
    return (same_segment | earlier_context)[:, None]


@dataclass
class PackedBatch:
    """A right-padded batch of packed answers and the indices each loss reads.

    Logits are computed at the flat list of ``(rows, cols)`` positions: each answer's last prompt token and
    everything after it. ``ar_index`` [B, A] / ``ar_mask`` index that list for the AR labels ``ar_labels``;
    ``noisy_index`` / ``clean_index`` [NB, n] for the noisy copies and their teachers.
    """
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, 1, T, T] bool
    rows: torch.Tensor  # [K]
    cols: torch.Tensor  # [K]
    ar_index: torch.Tensor  # [B, A] into the K scored positions; A: the longest answer
    ar_labels: torch.Tensor  # [B, A]
    ar_mask: torch.Tensor  # [B, A] bool: False on padding
    noisy_index: torch.Tensor  # [NB, n] into the K scored positions
    clean_index: torch.Tensor  # [NB, n]
    states: torch.Tensor  # [NB, n] the noisy copies' states
    fixed_points: torch.Tensor  # [NB, n]
    valid: torch.Tensor  # [NB]
    block_weights: torch.Tensor  # [NB]: 1 / (answers x blocks of the copy's answer)
    tokens: int  # real (unpadded) tokens of the forward


def pack_batch(answers: list[PromptTrajectories], window: int, device) -> PackedBatch:
    """Pack each answer (:func:`pack_answer`), right-pad them into one batch and index what the losses read."""
    packs = [pack_answer(p, window) for p in answers]
    n = len(answers[0].blocks[0].states[0])
    length = max(len(p.tokens) for p in packs)
    input_ids = torch.zeros(len(packs), length, dtype=torch.long)
    position_ids = torch.zeros(len(packs), length, dtype=torch.long)
    segments = torch.full((len(packs), length), PAD_SEGMENT, dtype=torch.long)
    rows, cols = [], []
    ar_index, ar_labels = [], []
    noisy_index, clean_index, states, fixed_points, valid, weights = [], [], [], [], [], []
    for row, pack in enumerate(packs):
        width = len(pack.tokens)
        input_ids[row, :width] = torch.tensor(pack.tokens)
        position_ids[row, :width] = torch.tensor(pack.positions)
        segments[row, :width] = torch.tensor(pack.segments)
        offset = len(rows) - (pack.prompt_length - 1)  # flat index of packed index c: offset + c
        scored = range(pack.prompt_length - 1, width)
        rows += [row] * len(scored)
        cols += scored
        ar_index.append([offset + c for c in pack.ar_columns])
        ar_labels.append(pack.ar_labels)
        for copy in pack.noisy:
            noisy_index.append([offset + copy.noisy_start + i for i in range(n)])
            clean_index.append([offset + copy.clean_start + i for i in range(n)])
            states.append(copy.block.states[copy.state])
            fixed_points.append(copy.block.states[-1])
            valid.append(copy.block.valid)
            weights.append(1.0 / (len(packs) * pack.num_blocks))
    ar_width = max(len(labels) for labels in ar_labels)
    ar_mask = torch.tensor([[t < len(labels) for t in range(ar_width)] for labels in ar_labels])

    def padded(lists):  # pad entries repeat index/label 0 and are False in ar_mask
        return torch.tensor([values + [0] * (ar_width - len(values)) for values in lists])

    def blocks(lists):  # [NB, n], also when there is no noisy copy
        return torch.tensor(lists, dtype=torch.long).view(-1, n)

    return PackedBatch(
        input_ids.to(device), position_ids.to(device), block_mask(segments).to(device), torch.tensor(rows).to(device),
        torch.tensor(cols).to(device), padded(ar_index).to(device), padded(ar_labels).to(device), ar_mask.to(device),
        blocks(noisy_index).to(device), blocks(clean_index).to(device), blocks(states).to(device),
        blocks(fixed_points).to(device), torch.tensor(valid, dtype=torch.long).to(device),
        torch.tensor(weights, dtype=torch.float64).to(device), sum(len(p.tokens) for p in packs))
