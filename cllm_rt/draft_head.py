"""A draft head: a small block over the frozen target's last hidden state that guesses the tokens after its next one.

EAGLE's idea (Li et al. 2024) at its smallest: one residual block, shared over ``depth`` steps, maps the
hidden state that predicts token t+1 and the embedding of that token to a state that predicts token t+2,
and so on, each step conditioned on the guess before it, read out through the target's own LM head. It
adds ``6 d² + 3 d`` parameters whatever the depth, and no vocabulary-sized matrix. Why it replaced
Medusa-1's heads (one independent block per depth, format 1): a Medusa head guessing token t+3 cannot know
which token t+2 it bets on, and measured on the same features the token-conditioned head gets far more
leading guesses right on held-out prompts (README "Draft head"). It guesses among the tokens it was trained
to predict (``vocab``, the LM head's rows for them gathered once): reading the whole LM head for a few
guesses per step cost SmolLM2 more than the guesses saved. Its labels are the target's own greedy tokens
(:mod:`cllm_rt.training.draft_head`). The head only proposes: its guesses enter the token tree as the
``head`` draft source and the unchanged target verifies them, so the output stays exactly the target's.

Saved beside the model as ``HEAD_FILE`` with the target's fingerprint; :func:`cllm_rt.models.load_model`
attaches it (:func:`attach`), so every entry point that decodes that model uses it with no new argument, and
refuses, in one line, a head trained for other weights or saved in another format.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.nn.functional as F


HEAD_FILE = "cllm_draft_head.safetensors"
ATTRIBUTE = "cllm_draft_head"  # where attach() keeps the head on the model
_FORMAT = "2"  # 1: Medusa-1 heads, one per depth, blind to the tokens guessed before


def model_fingerprint(model, dtype: torch.dtype | None = None) -> dict:
    """Identify a model's weights without reading all of them: every parameter's (and int8 weight's) name, shape
    and first 64 values (any fine-tune changes those), hashed after rounding to ``dtype`` (default: the
    parameters' own), so a float32 copy of a model collected in bfloat16 is recognised as the same model."""
    digest = hashlib.sha256()
    first = next(model.parameters())
    dtype = dtype or first.dtype
    int8 = [(name, b) for name, b in model.named_buffers() if b.dtype == torch.int8]  # cllm_rt.quantize's weights
    for name, param in [*model.named_parameters(), *int8]:
        digest.update(f"{name}:{tuple(param.shape)};".encode())
        digest.update(param.detach().flatten()[:64].to("cpu", dtype).to(torch.float64).numpy().tobytes())
    return {"model_type": model.config.model_type, "vocab_size": model.config.vocab_size,
            "dtype": str(dtype).removeprefix("torch."), "sha256": digest.hexdigest()}


def target_fingerprint(model) -> str:
    """The fingerprint a head is bound to, rounded to bfloat16 so the head follows its target into any dtype."""
    return model_fingerprint(model, torch.bfloat16)["sha256"]


class DraftHead(torch.nn.Module):
    """One residual block shared over ``depth`` steps, each conditioned on the token the previous step chose:
    step k maps (the hidden state that predicts token t+k, that token) to the hidden state that predicts
    token t+k+1, and the readout guesses among the token ids ``vocab`` (default: the whole vocabulary)."""

    def __init__(self, hidden_size: int, depth: int, vocab: torch.Tensor | None = None):
        super().__init__()
        if depth < 1 or hidden_size < 1:
            raise ValueError(f"a draft head needs depth >= 1 and hidden_size >= 1, got {depth}, {hidden_size}")
        self.depth = depth
        self.mix = torch.nn.Linear(2 * hidden_size, 2 * hidden_size)
        self.out = torch.nn.Linear(2 * hidden_size, hidden_size)
        self.register_buffer("vocab", torch.zeros(0, dtype=torch.long) if vocab is None else vocab.long())
        self._readout = None  # (which LM head weight it was gathered from, its rows for vocab, their bias)
        self.branches = 1  # first guesses proposed (a run-time choice, not saved: the weights serve any)
        torch.nn.init.zeros_(self.out.weight)  # the identity at first: every guess repeats the token it follows
        torch.nn.init.zeros_(self.out.bias)

    @property
    def hidden_size(self) -> int:
        return self.out.out_features

    def step(self, hidden: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """[.., d] x [.., d] -> [.., d]. Both inputs are RMS-normalised without weights, so a model's own
        embedding scale (Gemma multiplies by sqrt(d)) or a late layer's large norm does not swamp the other."""
        size = (self.hidden_size,)
        mixed = torch.cat([F.rms_norm(hidden, size), F.rms_norm(token_embedding, size)], -1)
        return hidden + self.out(F.silu(self.mix(mixed)))

    def forward(self, hidden: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: [N, d] and the embeddings [N, depth, d] of the token each step follows (the
        target's next token, then the labels) -> [N, depth, d], the hidden states the LM head reads."""
        states = []
        for k in range(self.depth):
            hidden = self.step(hidden, token_embeddings[:, k])
            states.append(hidden)
        return torch.stack(states, 1)

    def propose(self, hidden: torch.Tensor, roots: torch.Tensor, lm_head: torch.nn.Module,
                embedding: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Guesses from the target's hidden states [N, d] at the rows' last verified nodes and the tokens [N]
        those nodes predict (the next roots): tokens [N, branches, depth] and the head's probability of each
        given the ones before it. Branch j starts with the head's j-th likeliest token, then follows its
        likeliest each time, each step conditioned on the guess before it. The branches share one matmul per
        step (EAGLE-2's tree at its smallest; on a CPU, where each verified node costs, one branch measured
        best: README "Draft head")."""
        n = len(roots)
        hidden = self.step(hidden.to(self.out.weight.dtype), embedding(roots).to(self.out.weight.dtype))
        probabilities, ids = self._readout_probabilities(hidden, lm_head)
        top, index = probabilities.topk(min(self.branches, probabilities.shape[-1]), -1)  # [N, k]
        branches = top.shape[1]
        tokens, chances = [ids[index].flatten()], [top.flatten()]
        hidden = hidden.repeat_interleave(branches, 0)  # [N * k, d]
        for _ in range(self.depth - 1):
            hidden = self.step(hidden, embedding(tokens[-1]).to(hidden.dtype))
            probabilities, ids = self._readout_probabilities(hidden, lm_head)
            chance, index = probabilities.max(-1)
            tokens.append(ids[index])
            chances.append(chance)
        return (torch.stack(tokens, 1).view(n, branches, self.depth),
                torch.stack(chances, 1).view(n, branches, self.depth))

    def _readout_probabilities(self, states: torch.Tensor, lm_head: torch.nn.Module):
        """The head's distribution [.., V'] over the tokens it guesses among, and those tokens' ids [V']."""
        weight, bias, ids = lm_head.weight, lm_head.bias, self.vocab
        if len(self.vocab):
            source = (id(lm_head.weight), lm_head.weight.data_ptr(), lm_head.weight.dtype)  # gathered once
            if self._readout is None or self._readout[0] != source:
                gathered_bias = None if bias is None else bias.detach()[self.vocab]
                self._readout = (source, weight.detach()[self.vocab], gathered_bias)
            weight, bias = self._readout[1], self._readout[2]
        else:
            ids = torch.arange(weight.shape[0], device=weight.device)
        logits = F.linear(states.to(weight.dtype), weight, bias)
        return logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)), ids


def save(head: DraftHead, directory: str, target) -> str:
    """Write ``head`` into ``directory`` bound to ``target``'s weights; returns the file's path."""
    from safetensors.torch import save_file

    path = os.path.join(directory, HEAD_FILE)
    meta = {"format": _FORMAT, "depth": str(head.depth), "hidden_size": str(head.hidden_size),
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
        raise ValueError(f"{path} is not a draft head of format {_FORMAT} (found {meta.get('format')!r}): "
                         f"retrain it with `cllm-rt train-head` or remove it")
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
    return (f"draft head: {head.depth} steps, {params:,} parameters, {size / 2**20:.1f} MiB; guesses read {rows}")


__all__ = ["HEAD_FILE", "DraftHead", "attach", "attached", "describe", "load", "model_fingerprint", "save",
           "target_fingerprint"]
