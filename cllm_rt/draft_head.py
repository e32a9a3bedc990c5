"""A draft head: small layers over the frozen target's last hidden state that guess the tokens after its next one.

Medusa-1's heads (Cai et al. 2024), trained as a consistency head: head k maps the hidden state that predicts
token t+1 to one that predicts token t+1+k, ``h + SiLU(W_k h + b_k)`` (zero-initialised: at first every head
repeats the target's own next token), read out through the target's own LM head, so the head adds
``depth * (d² + d)`` parameters and no vocabulary-sized matrix. It guesses among the tokens it was trained
to predict (``vocab``, the LM head's rows for them gathered once): reading the whole LM head for a few
guesses per step cost SmolLM2 more than the guesses saved (measured: 25.3 → 19.1 tokens/s at 2.23 → 2.54
tokens per forward). Its labels are the target's own greedy tokens
(:mod:`cllm_rt.training.draft_head`). The head only proposes: its guesses enter the token tree as the
``head`` draft source and the unchanged target verifies them, so the output stays exactly the target's.

Saved beside the model as ``HEAD_FILE`` with the target's fingerprint; :func:`cllm_rt.models.load_model`
attaches it (:func:`attach`), so every entry point that decodes that model uses it with no new argument, and
refuses, in one line, a head trained for other weights.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F

from . import ops

HEAD_FILE = "cllm_draft_head.safetensors"
ATTRIBUTE = "cllm_draft_head"  # where attach() keeps the head on the model
_FORMAT = "1"


def model_fingerprint(model, dtype: torch.dtype | None = None) -> dict:
    """Identify a model's weights without reading all of them: every parameter's name, shape and first 64
    values (any fine-tune changes those), hashed after rounding to ``dtype`` (default: the parameters' own),
    so a float32 copy of a model collected in bfloat16 is recognised as the same model."""
    digest = hashlib.sha256()
    first = next(model.parameters())
    dtype = dtype or first.dtype
    for name, param in model.named_parameters():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(param.detach().flatten()[:64].to("cpu", dtype).to(torch.float64).numpy().tobytes())
    return {"model_type": model.config.model_type, "vocab_size": model.config.vocab_size,
            "dtype": str(dtype).removeprefix("torch."), "sha256": digest.hexdigest()}


def target_fingerprint(model) -> str:
    """The fingerprint a head is bound to, rounded to bfloat16 so the head follows its target into any dtype."""
    return model_fingerprint(model, torch.bfloat16)["sha256"]


class DraftHead(torch.nn.Module):
    """``depth`` residual blocks over a hidden state [.., d]; block k-1 guesses the token k+1 places ahead,
    among the token ids ``vocab`` (default: the whole vocabulary)."""

    def __init__(self, hidden_size: int, depth: int, vocab: torch.Tensor | None = None):
        super().__init__()
        if depth < 1 or hidden_size < 1:
            raise ValueError(f"a draft head needs depth >= 1 and hidden_size >= 1, got {depth}, {hidden_size}")
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(depth))
        self.register_buffer("vocab", torch.zeros(0, dtype=torch.long) if vocab is None else vocab.long())
        self._readout = None  # (which LM head weight it was gathered from, its rows for vocab, their bias)
        for block in self.blocks:  # Medusa's start: the identity, i.e. the target's own next token
            torch.nn.init.zeros_(block.weight)
            torch.nn.init.zeros_(block.bias)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[.., d] -> [.., depth, d]: the hidden states the LM head reads for each guess."""
        return torch.stack([hidden + F.silu(block(hidden)) for block in self.blocks], -2)

    def propose(self, hidden: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """Greedy guesses [N, depth] from the target's hidden states [N, d] at the rows' last verified nodes."""
        states = self(hidden.to(self.blocks[0].weight.dtype)).to(lm_head.weight.dtype)  # [N, depth, d]
        if not len(self.vocab):
            if lm_head.bias is None:  # the fused op streams the vocabulary once for every guess
                return ops.lm_head_argmax(states, lm_head.weight)
            return F.linear(states, lm_head.weight, lm_head.bias).argmax(-1)
        source = (id(lm_head.weight), lm_head.weight.data_ptr(), lm_head.weight.dtype)  # gathered once per weight
        if self._readout is None or self._readout[0] != source:
            bias = None if lm_head.bias is None else lm_head.bias.detach()[self.vocab]
            self._readout = (source, lm_head.weight.detach()[self.vocab], bias)
        return self.vocab[F.linear(states, self._readout[1], self._readout[2]).argmax(-1)]


def save(head: DraftHead, directory: str, target) -> str:
    """Write ``head`` into ``directory`` bound to ``target``'s weights; returns the file's path."""
    from safetensors.torch import save_file

    path = os.path.join(directory, HEAD_FILE)
    meta = {"format": _FORMAT, "depth": str(head.depth), "hidden_size": str(head.blocks[0].in_features),
            "target": target_fingerprint(target)}
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, path, metadata=meta)
    return path


def load(directory: str, target) -> DraftHead | None:
    """The head saved in ``directory`` for ``target`` (None when there is none), on its device and dtype.

    Raises ``ValueError`` (one line) for a head saved for other weights or in another format."""
    from safetensors import safe_open

    path = os.path.join(directory, HEAD_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a draft head of format {_FORMAT} (found {meta.get('format')!r})")
    if meta.get("target") != target_fingerprint(target):
        raise ValueError(f"{path} was trained for other weights than the model in {directory} (fingerprint "
                         f"{str(meta.get('target'))[:12]}, the model's {target_fingerprint(target)[:12]}): "
                         f"retrain it or remove it")
    head = DraftHead(int(meta["hidden_size"]), int(meta["depth"]), state["vocab"])
    head.load_state_dict(state)
    weight = target.get_output_embeddings().weight
    return head.to(weight.device, weight.dtype).eval().requires_grad_(False)


def attach(model, head: DraftHead | None) -> None:
    """Make ``head`` the draft head that decoding ``model`` uses (None: detach). Kept outside the module
    tree on purpose, so the model's parameters, state_dict and save_pretrained stay the target's own."""
    object.__setattr__(model, ATTRIBUTE, head)


def attached(model) -> DraftHead | None:
    return model.__dict__.get(ATTRIBUTE)


def describe(head: DraftHead) -> str:
    params = sum(p.numel() for p in head.parameters())
    size = sum(p.numel() * p.element_size() for p in head.parameters())
    rows = f"{len(head.vocab):,} LM-head rows gathered" if len(head.vocab) else "the whole LM head"
    return (f"draft head: depth {head.depth}, {params:,} parameters, {size / 2**20:.1f} MiB; guesses read {rows}")


__all__ = ["HEAD_FILE", "DraftHead", "attach", "attached", "describe", "load", "model_fingerprint", "save",
           "target_fingerprint"]
