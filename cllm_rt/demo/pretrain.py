"""Train a small causal LM from scratch on packed text: the demo's target model.

:mod:`cllm_rt.training.train` trains on Jacobi trajectories (a consistency loss needs a block and its fixed point),
so a plain next-token objective over raw documents lives here: documents (``<s> text </s>``) are packed
back to back into rows of ``seq_len`` tokens (GPT-2 style: attention crosses document boundaries, ``<s>``
marks each start), and each step takes the next ``batch_size`` rows of a fixed, seeded row order.

Everything that decides the math derives from the seed and the step, and ``checkpoint.pt`` (model,
optimizer, scheduler, step; written atomically) is the resume point: a killed run, rerun, continues
where the last checkpoint left it. ``log.jsonl`` holds one line per step.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..atomic_io import atomic_write, truncate_jsonl_log

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


@dataclass(frozen=True)
class PretrainConfig:
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    warmup: int = 30
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 50


def small_llama(vocab_size: int, hidden_size: int = 256, layers: int = 4, heads: int = 4, intermediate: int = 768,
                max_positions: int = 1024, bos: int = 1, eos: int = 2, pad: int = 3, seed: int = 0):
    """A small ``LlamaForCausalLM`` with tied embeddings, its generation config set to stop at ``eos``."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos
    return model


def pack(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token lists and cut the stream into rows of ``seq_len`` (the last partial row is dropped)."""
    stream = torch.tensor([t for doc in documents for t in doc], dtype=torch.int32)
    rows = stream.numel() // seq_len
    return stream[: rows * seq_len].view(rows, seq_len)


def _lr_factor(step: int, config: PretrainConfig) -> float:
    import math

    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain(model, rows: torch.Tensor, work_dir: str, config: PretrainConfig, *, progress: bool = True,
             desc: str = "pretrain", stop_after: int | None = None) -> dict:
    """Train ``model`` in place on ``rows`` [N, seq_len] (cycled in a seeded order); resume from ``work_dir``.

    ``stop_after`` returns early once that many steps are done (a checkpoint is written there), to run a
    long job in pieces; the next call continues it. Returns the last log entry (``{}`` when the run was
    already complete).
    """
    if rows.ndim != 2 or rows.shape[1] != config.seq_len or rows.shape[0] == 0:
        raise ValueError(f"rows must be [N >= 1, {config.seq_len}], got {tuple(rows.shape)}")
    os.makedirs(work_dir, exist_ok=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    identity = {**asdict(config), "rows": list(rows.shape), "rows_sum": int(rows.long().sum())}
    identity.pop("save_every")
    step = 0
    path = os.path.join(work_dir, CHECKPOINT)
    if os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["identity"] != identity:
            raise ValueError(f"{path} belongs to another pretraining run ({state['identity']} vs {identity}); "
                             "use another output directory")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        truncate_jsonl_log(os.path.join(work_dir, LOG), step)
    elif os.path.exists(os.path.join(work_dir, LOG)):
        os.remove(os.path.join(work_dir, LOG))

    order = _row_order(rows.shape[0], config)
    model.train()
    bar = tqdm(total=config.steps, initial=step, unit="step", desc=desc, disable=not progress)
    entry: dict = {}
    last_step = config.steps if stop_after is None else min(config.steps, stop_after)
    while step < last_step:
        start = time.perf_counter()
        batch = rows[order[step * config.batch_size:(step + 1) * config.batch_size]].long()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - start
        entry = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm,
                 "tokens_per_second": batch.numel() / seconds, "seconds": seconds}
        with open(os.path.join(work_dir, LOG), "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{entry['tokens_per_second']:.0f}")
        if step % config.save_every == 0 or step == last_step:
            state = {"step": step, "identity": identity, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
            atomic_write(path, lambda tmp: torch.save(state, tmp))
    bar.close()
    model.eval()
    if not entry and step > 0:
        entry = read_log(work_dir)[-1]
    return entry


def _row_order(num_rows: int, config: PretrainConfig) -> torch.Tensor:
    """Row indices for every step: seeded permutations of all rows, one epoch after another."""
    needed = config.steps * config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    epochs = [torch.randperm(num_rows, generator=generator) for _ in range(-(-needed // num_rows))]
    return torch.cat(epochs)[:needed]


def read_log(work_dir: str) -> list[dict]:
    path = os.path.join(work_dir, LOG)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
