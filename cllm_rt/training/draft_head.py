"""Training a draft head (:mod:`cllm_rt.draft_head`) on the frozen target's own greedy tokens.

The target never changes, so its hidden states are computed once, without gradients (one forward per sequence,
teacher-forced over prompt + answer), and the head trains for many epochs on them in seconds. Labels: at
answer position t (its hidden state predicts token t+1, the root), step k's label is the target's greedy token
at t+k, valid only where tokens t+1..t+k are the target's own greedy tokens too, so that every label is what
greedy decoding would produce after that prefix (on the target's own answers every label is valid; on a
dataset's reference answers only the stretches the target agrees with are). The loss reads logits over the
labels' vocabulary only (the frozen LM head's rows for tokens that occur as labels): a few thousand rows
instead of the whole vocabulary, the same argmax where it matters, far less CPU.
"""

from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F

from ..draft_head import DraftHead

IGNORE = -1


def _float_lm_head(model) -> torch.nn.Linear:
    """The LM head a draft head reads its guesses through; an int8 one (cllm_rt.quantize) is refused in one line."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"a draft head trains on a float LM head (an nn.Linear), got {type(head).__name__}: "
                         "train it on the float model, then load that with weights='int8'")
    return head


@torch.inference_mode()
def head_examples(model, sequences: list[tuple[list[int], int]],
                  depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [N, d] (float32), roots [N] (the target's greedy next token at each, the token the head's
    first step follows) and labels [N, depth] (``IGNORE`` where invalid) of every answer position whose next
    token is the target's greedy one; ``sequences``: (tokens, index of the first answer token)."""
    lm_head = _float_lm_head(model)
    hidden_rows, root_rows, label_rows = [], [], []
    for tokens, start in sequences:
        ids = torch.tensor([tokens], device=lm_head.weight.device)
        hidden = model.base_model(input_ids=ids).last_hidden_state[0]  # [L, d]
        greedy = lm_head(hidden).argmax(-1)  # [L]: greedy[t] is the target's token t+1
        agrees = torch.cat([ids[0, 1:] == greedy[:-1], torch.zeros(1, dtype=torch.bool, device=ids.device)])
        positions = torch.arange(max(start - 1, 0), len(tokens) - 1, device=ids.device)
        labels = torch.full((len(positions), depth), IGNORE, dtype=torch.long, device=ids.device)
        valid = agrees[positions]
        for k in range(1, depth + 1):
            ahead = positions + k
            inside = ahead < len(tokens)
            valid = valid & inside & agrees[(ahead - 1).clamp(max=len(tokens) - 1)]
            labels[:, k - 1] = torch.where(valid, greedy[ahead.clamp(max=len(tokens) - 1)], IGNORE)
        keep = labels[:, 0] != IGNORE
        hidden_rows.append(hidden[positions[keep]].float().cpu())
        root_rows.append(greedy[positions[keep]].cpu())
        label_rows.append(labels[keep].cpu())
    return torch.cat(hidden_rows), torch.cat(root_rows), torch.cat(label_rows)


def fit_head(model, hidden: torch.Tensor, roots: torch.Tensor, labels: torch.Tensor, *, epochs: int = 4,
             lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0, log=None) -> DraftHead:
    """A float32 head trained with AdamW on (hidden, roots, labels) through the frozen target's LM head rows
    for the labels and its input embeddings; ``log(message, head)`` after each epoch (e.g. to watch held-out
    accuracy). Teacher-forced: step k follows label k-1 (the root at step 1), the token it follows when the
    guesses before it are right, which is the only case where its own guess can be accepted."""
    torch.manual_seed(seed)
    lm_head, embedding = _float_lm_head(model), model.get_input_embeddings()
    vocab = labels[labels != IGNORE].unique()  # [V']: what the head learns to guess, and guesses among
    head = DraftHead(hidden.shape[1], labels.shape[1], vocab)
    to_sub = torch.full((int(lm_head.weight.shape[0]),), IGNORE, dtype=torch.long)
    to_sub[vocab] = torch.arange(len(vocab))
    targets = torch.where(labels == IGNORE, IGNORE, to_sub[labels.clamp(min=0)])
    follows = torch.cat([roots[:, None], labels[:, :-1].clamp(min=0)], 1)  # [N, depth]; IGNORE'd steps' loss is masked
    weight = lm_head.weight.detach()[vocab].float()  # [V', d]
    bias = None if lm_head.bias is None else lm_head.bias.detach()[vocab].float()
    table = embedding.weight.detach().float()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    order = list(range(len(hidden)))
    rng = random.Random(seed)
    for epoch in range(epochs):
        rng.shuffle(order)
        total, batches = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = torch.tensor(order[i:i + batch_size])
            logits = F.linear(head(hidden[batch], table[follows[batch]]), weight, bias)  # [b, depth, V']
            loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: loss {total / max(batches, 1):.3f}", head)
    return head.eval().requires_grad_(False)


@torch.inference_mode()
def head_accuracy(head: DraftHead, model, hidden: torch.Tensor, roots: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per depth, the share of valid labels the head gets right decoding on its own (each step follows its own
    previous guess, as at run time); and on positions whose labels are all valid, the mean count of leading
    right guesses (tokens a chain of them adds)."""
    lm_head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    guesses = torch.cat([head.propose(hidden[i:i + 512], roots[i:i + 512], lm_head, embedding)[0][:, 0]
                         for i in range(0, len(hidden), 512)])  # the first branch: the head's likeliest chain
    valid = labels != IGNORE
    right = (guesses == labels) & valid
    accuracy = [float(right[:, k].sum() / valid[:, k].sum().clamp(min=1)) for k in range(labels.shape[1])]
    full = valid.all(1)
    leading = right[full].long().cumprod(1).sum(1).float()
    return {"positions": len(labels), "accuracy_by_depth": accuracy,
            "leading_right": float(leading.mean()) if len(leading) else 0.0}


@torch.inference_mode()
def greedy_answers(model, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                   batch_size: int = 16) -> list[list[int]]:
    """The target's greedy answers (cllm_rt's exact decoding, ``batch_size`` prompts at a time), cut after EOS."""
    from ..runtime.decoding import Decoder

    answers: list[list[int]] = [[] for _ in prompts]
    for first in range(0, len(prompts), batch_size):
        handles = list(range(first, min(first + batch_size, len(prompts))))
        with Decoder(model, eos=eos) as decoder:
            decoder.add([prompts[h] for h in handles], [max_new_tokens] * len(handles), handles)
            while decoder.rows:
                for handle, new, _ in decoder.emit():
                    answers[handle] += new
                decoder.decode()
    return answers


def train_head(model_spec: str, data_path: str, out_dir: str, *, prompt_template: str | None = None,
               use_reference: bool = False, max_new_tokens: int = 256, depth: int = 4, epochs: int = 6,
               lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0, log=print) -> dict:
    """``cllm-rt train-head``: the target's greedy answers to the prompts of a JSON-lines file (and, with
    ``use_reference``, the stretches of their 'answer' fields it agrees with) → a draft head, written with a
    copy of the target into ``out_dir`` so that ``load_model(out_dir)`` attaches it. Returns the head's
    accuracy on (up to 2,048 of) its training positions."""
    from ..models import load_model
    from .prompt_file import read_prompt_file

    texts = read_prompt_file(data_path, prompt_template, use_reference)
    model, tokenizer = load_model(model_spec)
    prompts = [tokenizer(t.prompt)["input_ids"] for t in texts]
    eos = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    log(f"greedy answers to {len(prompts)} prompts (up to {max_new_tokens} tokens each)")
    answers = greedy_answers(model, prompts, max_new_tokens, eos)
    sequences = [(p + a, len(p)) for p, a in zip(prompts, answers)]
    if use_reference:
        sequences += [(p + tokenizer(t.reference, add_special_tokens=False)["input_ids"], len(p))
                      for p, t in zip(prompts, texts)]
    return write_model_with_head(model, tokenizer, sequences, out_dir, depth=depth, epochs=epochs, lr=lr,
                                 weight_decay=weight_decay, seed=seed, log=log)


def write_model_with_head(model, tokenizer, sequences: list[tuple[list[int], int]], out_dir: str, *, depth: int = 4,
                          epochs: int = 6, lr: float = 1e-3, weight_decay: float = 0.0, seed: int = 0,
                          log=print) -> dict:
    """A head fitted on ``sequences`` (the target's own answers: (tokens, index of the first answer token)),
    written with ``model`` and ``tokenizer`` into ``out_dir``; returns its accuracy on (up to 2,048 of) its
    training positions."""
    from ..draft_head import describe, save

    hidden, roots, labels = head_examples(model, sequences, depth)
    log(f"{len(hidden)} positions; training {epochs} epochs")
    head = fit_head(model, hidden, roots, labels, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    seed=seed, log=lambda message, _head: log(message))
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    save(head, out_dir, model)
    log(f"{describe(head)}; saved with the target into {out_dir}")
    sample = torch.randperm(len(hidden), generator=torch.Generator().manual_seed(seed))[:2048]  # all: minutes
    return head_accuracy(head, model, hidden[sample], roots[sample], labels[sample])
