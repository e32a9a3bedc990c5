"""Consistency training of a CLLM from collected Jacobi trajectories (Kou et al. 2024, Algorithm 1), or with
Jacobi Forcing's packed objective (arXiv 2512.14681).

Objectives (``TrainConfig.objective``):
  * ``cllm-global`` / ``cllm-local``: each training sample is one block of one prompt
    (:class:`cllm_rt.training.storage.BlockTrajectory`); a step draws a point ``y^(j)`` (j uniform over all
    but the fixed point) and minimises ``consistency + ar_weight * AR`` (:mod:`cllm_rt.training.losses`)
    with the trained model itself as the stop-gradient target, as in the paper. One micro-batch costs two
    forwards: a no-grad one over the targets (``context + y*`` for global consistency, ``context + y^(j+1)``
    for local) and one with gradients over the points and the AR sequences (``prompt + answer``) batched
    together.
  * ``jacobi-forcing``: each sample is one answer with all its blocks, packed into one sequence
    (:mod:`cllm_rt.training.packing`); one forward with gradients gives the noisy copies (student), the
    clean copies (detached teacher, and the AR loss on the greedy answer): ``consistency + ar_weight * AR``.
Logits are computed only at the positions a loss reads, not over the whole sequence.

Distillation (``distill_weight`` > 0) adds ``distill_weight * KL(teacher || student)`` at the AR term's
positions (the clean answer: ``prompt + answer`` for cllm-*, the clean copies for jacobi-forcing), the
teacher a frozen copy of the source model taken when the run starts (before a resume loads trained weights,
so it is always the run's ``--model``), in eval mode and without gradients, run over ``prompt + answer``
with logits at those positions only. Every process holds its own copy (under FSDP too: it is not sharded).
The AR label keeps the target's argmax only; the KL its whole next-token distribution (issue #20:
"keep the answers"). ``ar_weight`` may then be 0.

Everything that decides the math derives from (seed, step): the data order is a seeded permutation per
epoch and the point of each sample a seeded choice from its position in that stream (Jacobi Forcing's noisy
states come from its schedule), so a run resumed from a checkpoint (model, optimizer, scheduler, RNG
states, step) continues exactly as the uninterrupted run, and a global batch gives the same update whatever
its split into processes (each takes a contiguous slice of every micro-step) and micro-steps.

Guard rail: with ``heldout`` > 0, that many trajectory prompts (a seeded choice) are kept out of training;
at every checkpoint the model decodes them greedily (cllm_rt's plain Jacobi decoding, in the collection's
dtype, on the main process) and their agreement with the target's recorded answers is logged with the
tokens per forward. Agreement is the mean over prompts of ``2 M / (len(a) + len(b))``, M the tokens of the
longest matching blocks (difflib): one changed token costs about one token, where a per-position comparison
would count everything after it (after 2 steps on SmolLM2-135M: per position 0.52). Below
``min_agreement`` the run stops: the model written is the one of the last checkpoint (each passed the
check; the source model if none), ``log.jsonl`` says why, and ``stopped.json`` makes a rerun report the
stop instead of training on (a rerun with another ``min_agreement`` resumes from that checkpoint). The
untrained model is checked first (logged as step 0): a threshold it misses already is refused before any
step.

Outputs in ``out_dir``: the trained model as a plain Hugging Face directory (``save_pretrained`` in the
source checkpoint's dtype, plus the tokenizer when the source has one), ``checkpoint.pt`` (the resume
point, rewritten atomically every ``save_every`` steps and at the end; with ``keep_models`` each checkpoint's
weights also stay as a model directory ``step-N/``, to evaluate points along training), and ``log.jsonl`` (one line per
step: loss terms, lr, grad norm, tokens/s and blocks/s, where tokens are those of all forwards of the step
and blocks those with a consistency term; the held-out check's numbers on checkpoint steps; a last line
with ``event: stopped`` and its ``reason`` when the guard rail stopped the run).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..atomic_io import (atomic_write, atomic_write_json, read_jsonl_log, remove_stale_temporaries,
                         truncate_jsonl_log)
from ..models import resolve_model
from .distributed import Processes, torchrun_processes
from .losses import autoregressive_loss, consistency_loss, distillation_loss
from .packing import pack_batch
from .storage import BlockTrajectory, PromptTrajectories, load_trajectories, model_fingerprint, tokenizer_fingerprint

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
STOPPED = "stopped.json"
RUN = "run.json"  # the run's identity, written first: a directory holding this run's is the run's to resume
OBJECTIVES = ("cllm-global", "cllm-local", "jacobi-forcing")
_LOSS_ALIASES = {"global": "cllm-global", "local": "cllm-local"}  # TrainConfig.loss, before objectives


@dataclass(frozen=True)
class TrainConfig:
    objective: str = "cllm-global"  # one of OBJECTIVES
    max_steps: int | None = None  # default: one pass over the samples
    lr: float = 2e-5
    batch_size: int = 8  # samples per process per micro-step: blocks (cllm-*) or answers (jacobi-forcing)
    grad_accum: int = 1
    warmup: int = 0  # steps of linear warmup before the cosine decay
    seed: int = 0
    save_every: int = 100  # also the interval of the held-out check
    keep_models: bool = False  # also write each checkpoint's weights as a loadable model, out_dir/step-N/
    grad_checkpointing: bool = False
    ar_weight: float = 10.0
    distill_weight: float = 0.0  # KL to the frozen source model at the AR positions (0: off, no teacher loaded)
    ar_target: str = "greedy"  # "greedy": the target's own answer; "reference": the dataset's answer (cllm-*)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    fsdp: bool = False
    noise_window: int = 16  # jacobi-forcing: W of the noise schedule linspace(0, 1, W)[k mod W]
    heldout: int = 0  # trajectory prompts kept out of training for the agreement check (0: no check)
    min_agreement: float = 0.75  # stop when the held-out agreement falls below this
    train_layers: int = 0  # train only the top N decoder layers and the final norm (0: every parameter)
    loss: str | None = None  # deprecated alias of objective: "global" / "local" mean "cllm-global" / "cllm-local"

    def __post_init__(self):
        if self.loss is None:
            return
        if self.loss not in _LOSS_ALIASES:
            raise ValueError(f"loss must be 'global' or 'local' (a deprecated alias of objective="
                             f"'cllm-global'/'cllm-local'), got {self.loss!r}")
        objective = _LOSS_ALIASES[self.loss]
        if self.objective not in (TrainConfig.objective, objective):
            raise ValueError(f"loss={self.loss!r} (a deprecated alias of objective={objective!r}) contradicts "
                             f"objective={self.objective!r}: give only objective")
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "loss", None)  # one spelling from here on (identity, dataclasses.replace)

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}")
        if self.ar_target not in ("greedy", "reference"):
            raise ValueError(f"ar_target must be 'greedy' or 'reference', got {self.ar_target!r}")
        if self.objective == "jacobi-forcing" and self.ar_target != "greedy":
            raise ValueError("jacobi-forcing's AR loss is on its clean blocks, the target's own greedy answer: "
                             "ar_target must be 'greedy'")
        for name in ("batch_size", "grad_accum", "save_every", "noise_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0 or self.warmup < 0 or self.ar_weight < 0 or self.max_grad_norm <= 0:
            raise ValueError("lr and max_grad_norm must be > 0; warmup and ar_weight must be >= 0")
        if not self.distill_weight >= 0:  # also NaN
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        if self.train_layers < 0:
            raise ValueError(f"train_layers must be >= 0 (0: train every parameter), got {self.train_layers}")
        if self.heldout < 0 or not 0 <= self.min_agreement <= 1:
            raise ValueError(f"heldout must be >= 0 and min_agreement within [0, 1]; got {self.heldout}, "
                             f"{self.min_agreement}")


Sample = tuple[PromptTrajectories, BlockTrajectory]


class DataOrder:
    """Which blocks, and which point of each, a process trains on at a given step (a pure function of the seed)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._permutations: dict[int, list[int]] = {}

    def sample(self, position: int) -> int:
        """The sample at ``position`` of the endless stream of seeded per-epoch permutations."""
        epoch, offset = divmod(position, self.num_samples)
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._permutations = {epoch: torch.randperm(self.num_samples, generator=generator).tolist()}
        return self._permutations[epoch][offset]

    def point(self, position: int, num_states: int) -> int:
        """The trajectory point trained on at ``position``: uniform over all states but the fixed point."""
        return random.Random(f"{self.seed}:{position}").randrange(num_states - 1)

    @staticmethod
    def positions(step: int, micro: int, rank: int, batch_size: int, grad_accum: int, world_size: int) -> range:
        per_micro = batch_size * world_size
        first = step * per_micro * grad_accum + micro * per_micro + rank * batch_size
        return range(first, first + batch_size)


class ScoredLogits(torch.nn.Module):
    """The causal LM, returning logits only at the ``(rows, cols)`` positions a loss reads.

    Wrapping the whole computation in one module lets DDP/FSDP see a single forward per pass.
    """

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Without a mask, right padding needs none: causal attention keeps every real token before the pads.
        # A 4D boolean mask [R, 1, T, T] (packed sequences) reaches SDPA unchanged, with the position ids given.
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # [R, T, d]
        return self.lm.get_output_embeddings()(hidden[rows, cols])  # [len(rows), V]


def _right_pad(rows: list[list[int]], device) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out.to(device)


def _spans(starts: list[int], lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row/column indices of ``lengths[r]`` positions from ``starts[r]`` in each row, padded to the longest
    span (pad entries repeat a real position and are False in the returned mask): [R, W] each."""
    width = max(max(lengths), 1)
    offsets = torch.arange(width)
    mask = offsets[None, :] < torch.tensor(lengths)[:, None]
    cols = torch.tensor(starts)[:, None] + torch.minimum(offsets[None, :], torch.tensor(lengths)[:, None] - 1)
    rows = torch.arange(len(starts))[:, None].expand(-1, width)
    return rows.to(device), cols.to(device), mask.to(device)


@dataclass
class StepLosses:
    total: float
    consistency: float
    ar: float
    distill: float  # 0 when distillation is off
    tokens: int
    blocks: int  # blocks with a consistency term


def cllm_batch_loss(model, samples: list[Sample], points: list[int], config: TrainConfig, device, teacher=None):
    """Loss of one CLLM micro-batch (a tensor to backpropagate) and its terms for the log; ``teacher`` (a
    frozen :class:`ScoredLogits`, with ``config.distill_weight`` > 0) adds the distillation term."""
    n = len(samples[0][1].states[0])
    contexts = [p.context(b) for p, b in samples]
    student = [b.states[j] for (_, b), j in zip(samples, points)]
    target = [b.states[-1] if config.objective == "cllm-global" else b.states[j + 1]
              for (_, b), j in zip(samples, points)]
    answers = [p.answer if config.ar_target == "greedy" else p.reference for p, _ in samples]
    ar_rows = [p.prompt + a for (p, _), a in zip(samples, answers)]

    # block position i is scored at the input position of y_{i-1} (the context's last token for i = 1)
    block_starts = [len(c) - 1 for c in contexts]
    block = _spans(block_starts, [n] * len(samples), device)
    with torch.no_grad():
        target_ids = _right_pad([c + t[:-1] for c, t in zip(contexts, target)], device)
        target_logits = model(target_ids, block[0].flatten(), block[1].flatten())

    ar = _spans([len(p.prompt) - 1 for p, _ in samples], [len(a) for a in answers], device)
    student_ids = _right_pad([c + s[:-1] for c, s in zip(contexts, student)] + ar_rows, device)
    rows = torch.cat([block[0].flatten(), ar[0].flatten() + len(samples)])
    logits = model(student_ids, rows, torch.cat([block[1].flatten(), ar[1].flatten()]))
    split = block[0].numel()

    def as_tensor(rows_of_tokens):
        return torch.tensor(rows_of_tokens, device=device)

    consistency = consistency_loss(logits[:split].view(len(samples), n, -1), target_logits.view(len(samples), n, -1),
                                   as_tensor(student), as_tensor(target), as_tensor([b.valid for _, b in samples]))
    labels = student_ids[ar[0] + len(samples), ar[1] + 1]  # [B, W]: the token after each scored position
    ar_logits = logits[split:].view(*labels.shape, -1)
    ar_loss = autoregressive_loss(ar_logits, labels, ar[2])
    distill, teacher_tokens = _distillation(teacher, [p.prompt for p, _ in samples], answers, ar_logits)
    total = consistency + config.ar_weight * ar_loss + config.distill_weight * distill
    tokens = sum(len(c) + n - 1 for c in contexts) * 2 + sum(len(r) for r in ar_rows) + teacher_tokens
    return total, StepLosses(total.item(), consistency.item(), ar_loss.item(), distill.item(), tokens, len(samples))


def _distillation(teacher, prompts: list[list[int]], answers: list[list[int]], student_logits: torch.Tensor):
    """KL(teacher || student) at the answer positions of ``prompt + answer`` rows, where the AR term took the
    student's logits ``student_logits`` [B, W, V] (W the longest answer); and the tokens of the teacher's
    forward. (0, 0) without a teacher."""
    device = student_logits.device
    if teacher is None:
        return torch.zeros((), device=device), 0
    rows = [p + a for p, a in zip(prompts, answers)]
    # answer token t is predicted at position len(prompt) - 1 + t, as for the AR labels
    span_rows, span_cols, mask = _spans([len(p) - 1 for p in prompts], [len(a) for a in answers], device)
    with torch.no_grad():  # the teacher is frozen: its forward keeps no graph
        teacher_logits = teacher(_right_pad(rows, device), span_rows.flatten(), span_cols.flatten())
    return distillation_loss(student_logits, teacher_logits.view_as(student_logits), mask), sum(map(len, rows))


def jacobi_forcing_batch_loss(model, answers: list[PromptTrajectories], config: TrainConfig, device, teacher=None):
    """Loss of one Jacobi Forcing micro-batch: one packed forward over every block of every answer (and, with a
    ``teacher``, its no-grad forward over each prompt + answer for the distillation term)."""
    batch = pack_batch(answers, config.noise_window, device)
    logits = model(batch.input_ids, batch.rows, batch.cols, batch.attention_mask, batch.position_ids)  # [K, V]
    if len(batch.noisy_index):
        consistency = consistency_loss(logits[batch.noisy_index], logits[batch.clean_index], batch.states,
                                       batch.fixed_points, batch.valid, batch.block_weights)
    else:  # every block of these answers sits at its schedule's fixed point: nothing to pull
        consistency = torch.zeros((), device=logits.device)
    ar_logits = logits[batch.ar_index]  # [B, A, V]: the clean copies, a causal forward over prompt + answer
    ar_loss = autoregressive_loss(ar_logits, batch.ar_labels, batch.ar_mask)
    # the clean positions are those of an ordinary causal forward over prompt + answer (packing.py), so the
    # teacher runs that forward, not the packed one: no noisy copies to compute
    distill, teacher_tokens = _distillation(teacher, [p.prompt for p in answers], [p.answer for p in answers],
                                            ar_logits)
    total = consistency + config.ar_weight * ar_loss + config.distill_weight * distill
    return total, StepLosses(total.item(), consistency.item(), ar_loss.item(), distill.item(),
                             batch.tokens + teacher_tokens, len(batch.noisy_index))


def sequence_agreement(candidate: list[int], target: list[int]) -> float:
    """``2 M / (len(candidate) + len(target))``, M the tokens of difflib's longest matching blocks: one changed
    token costs about one token, where a per-position comparison counts everything after it (module
    docstring). The held-out guard rail's measure, and the evaluation's "greedy agreement"."""
    return difflib.SequenceMatcher(None, candidate, target, autojunk=False).ratio()


# ---------------------------------------------------------------- the run

def train(model: str, trajectories_dir: str, out_dir: str, config: TrainConfig = TrainConfig(), *,
          progress: bool = True, device: str | None = None) -> dict:
    """Consistency-train ``model`` (a Hugging Face directory or a short name, :func:`cllm_rt.models.resolve_model`)
    on ``trajectories_dir`` into ``out_dir``; resumes a run found there.

    Under torchrun every process runs this with the same arguments (DDP, or FSDP with ``config.fsdp``).
    Returns the last log entry (on the main process; {} on the others).
    """
    config.validate()
    with torchrun_processes(device) as processes:
        return _Run(model, trajectories_dir, out_dir, config, processes, progress).run()


class _Run:
    def __init__(self, model_dir, trajectories_dir, out_dir, config: TrainConfig, processes: Processes, progress):
        from transformers import AutoConfig, AutoModelForCausalLM

        model_dir = str(resolve_model(model_dir))
        source, out = os.path.realpath(model_dir), os.path.realpath(out_dir)
        if out == source or out.startswith(source + os.sep):
            raise ValueError(f"--out {out_dir} is the model directory {model_dir} or inside it: training would write "
                             "over the source model; train into another directory")
        self.config, self.processes, self.out_dir, self.model_dir = config, processes, out_dir, model_dir
        self.progress = progress and processes.is_main
        trajectories = load_trajectories(trajectories_dir)
        self.trajectories = trajectories
        answers = [p for p in trajectories.prompts if p.blocks]
        if config.heldout >= len(answers):
            raise ValueError(f"heldout={config.heldout} leaves nothing to train on: {trajectories_dir} holds "
                             f"{len(answers)} answers with blocks")
        held = set(random.Random(f"heldout:{config.seed}").sample(range(len(answers)), config.heldout))
        self.heldout = [p for i, p in enumerate(answers) if i in held]
        training = [p for i, p in enumerate(answers) if i not in held]
        blocks = [(p, b) for p in training for b in p.blocks if len(b.states) > 1]
        if not blocks:
            raise ValueError(f"{trajectories_dir} holds no block with a trajectory to learn from (every block "
                             "started at its fixed point, or no prompt was kept)")
        # a Jacobi Forcing sample is a whole answer: every block of it is packed into one forward
        self.samples = training if config.objective == "jacobi-forcing" else blocks
        if config.ar_target == "reference" and not trajectories.manifest["settings"]["keep_reference"]:
            raise ValueError(f"ar_target='reference' needs reference answers, but {trajectories_dir} was "
                             "collected without --keep-reference")
        source_dtype = AutoConfig.from_pretrained(model_dir).dtype
        self.save_dtype = getattr(torch, source_dtype) if isinstance(source_dtype, str) else source_dtype or torch.float32
        # train in float32; SDPA takes the packed objective's boolean 4D mask as it is (eager would add it)
        self.lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
        self._check_compatible(trajectories, trajectories_dir)
        self.world_batch = config.batch_size * processes.world_size
        self.max_steps = config.max_steps or -(-len(self.samples) // (self.world_batch * config.grad_accum))
        self.identity = {
            "trajectories": trajectories.manifest["identity"], "block_size": trajectories.block_size,
            "source_model": model_fingerprint(self.lm)["sha256"], "global_batch": self.world_batch * config.grad_accum,
            "micro_batch": self.world_batch, "max_steps": self.max_steps,
            **{k: v for k, v in dataclasses.asdict(config).items()
               if k not in ("batch_size", "save_every", "keep_models", "grad_checkpointing", "fsdp", "max_steps",
                            "loss", "min_agreement")}}
        for name in ("distill_weight", "train_layers"):  # absent when off: runs begun before they existed resume
            if not getattr(config, name):
                del self.identity[name]
        layers = len(self.lm.base_model.layers)
        if config.train_layers > layers:
            raise ValueError(f"train_layers={config.train_layers} but {model_dir} has {layers} decoder layers")
        # the distillation teacher: the source model as loaded, before any step or resume changes self.lm
        self.teacher = copy.deepcopy(self.lm).eval().requires_grad_(False) if config.distill_weight else None
        self._check_out_dir()
        self.order = DataOrder(len(self.samples), config.seed)
        self._checker = None  # the held-out check's model, on the main process, built at the first check

    def _check_out_dir(self) -> None:
        """Refuse an out_dir that holds anything but this run's own files: training writes a model, a log and a
        checkpoint there, over whatever has those names."""
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise ValueError(f"--out {self.out_dir} is a file, not a directory")
        if not os.path.isdir(self.out_dir) or all(name.startswith(".") for name in os.listdir(self.out_dir)):
            return  # hidden names are leftovers of a killed run of ours (removed when it starts)
        run = os.path.join(self.out_dir, RUN)
        if os.path.exists(run):
            with open(run, encoding="utf-8") as f:
                self._check_same_run(run, json.load(f))
        elif not os.path.exists(os.path.join(self.out_dir, CHECKPOINT)):  # a checkpoint checks its own identity
            raise FileExistsError(f"{self.out_dir} is not empty and holds no training run of cllm_rt ({RUN}): "
                                  "train into a new or empty directory")

    def _check_same_run(self, path: str, identity: dict) -> None:
        """Refuse to resume a run of other settings (``identity`` as recorded in ``path``)."""
        current = json.loads(json.dumps(self.identity))  # as JSON stores it (tuples become lists)
        differences = [f"{k}: {identity.get(k)!r} there, {v!r} now" for k, v in current.items() if identity.get(k) != v]
        if differences:
            raise ValueError(f"{path} belongs to another training run ({'; '.join(differences)}); resume with the "
                             "same model, trajectories and settings, or train into another --out directory")

    def _check_compatible(self, trajectories, trajectories_dir) -> None:
        collected = trajectories.manifest["model"]
        if collected["vocab_size"] != self.lm.config.vocab_size:
            raise ValueError(f"{trajectories_dir} was collected with a vocabulary of {collected['vocab_size']} "
                             f"tokens but {self.model_dir} has {self.lm.config.vocab_size}: trajectories of another model")
        # compared at the collection's precision: training loads the same weights in float32
        fingerprint = model_fingerprint(self.lm, getattr(torch, collected.get("dtype", "float32")))
        if fingerprint["sha256"] != collected["sha256"]:
            raise ValueError(f"{trajectories_dir} was collected with another model (fingerprint "
                             f"{collected['sha256'][:16]}) than {self.model_dir} ({fingerprint['sha256'][:16]}): "
                             "train the model that collected them")
        recorded = trajectories.manifest.get("tokenizer")
        tokenizer = _load_tokenizer(self.model_dir)
        if recorded is not None and tokenizer is not None and tokenizer_fingerprint(tokenizer) != recorded:
            raise ValueError(f"{trajectories_dir} was tokenized by another tokenizer ({recorded}) than "
                             f"{self.model_dir}'s ({tokenizer_fingerprint(tokenizer)})")

    def run(self) -> dict:
        config, processes = self.config, self.processes
        stopped = self._read_stopped()
        if stopped is not None:
            return stopped if processes.is_main else {}
        torch.manual_seed(config.seed + processes.rank)  # only dropout, if the model has any, draws from it
        if config.grad_checkpointing:
            self.lm.activation_checkpointing_enable({"use_reentrant": False})
        self.lm.train()
        if config.train_layers:
            _train_top_layers(self.lm, config.train_layers)
        module = ScoredLogits(self.lm).to(processes.device)
        model = self._parallelize(module)
        self.teacher_module = None if self.teacher is None else ScoredLogits(self.teacher).eval().to(processes.device)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                      weight_decay=config.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup, self.max_steps)
        step = self._resume(module, optimizer, scheduler)
        if step == 0 and self.heldout:
            self._check_baseline(module)
        autocast = torch.autocast(processes.device.type, dtype=torch.bfloat16, enabled=processes.device.type == "cuda")
        bar = tqdm(total=self.max_steps, initial=step, unit="step", desc="train", disable=not self.progress)
        entry = self._last_logged()
        final_state = None  # the last step's gathered weights (it is always a checkpoint), reused for the model
        while step < self.max_steps:
            start = time.perf_counter()
            terms = []
            for micro in range(config.grad_accum):
                positions = DataOrder.positions(step, micro, processes.rank, config.batch_size, config.grad_accum,
                                                processes.world_size)
                with self._gradient_sync(model, micro == config.grad_accum - 1):
                    with autocast:
                        loss, losses = self._micro_batch_loss(model, positions)
                    (loss / config.grad_accum).backward()
                terms.append(losses)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - start
            checkpoint = step % config.save_every == 0 or step == self.max_steps
            check = self._heldout_check(module) if checkpoint and self.heldout else {}
            entry = self._log(step, terms, lr, grad_norm, seconds, check)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_second']:.0f}")
            if check and check["heldout_agreement"] < config.min_agreement:
                bar.close()
                return self._stop(step, check["heldout_agreement"])
            if checkpoint:
                weights = self._save_checkpoint(step, module, optimizer, scheduler)
                final_state = weights if step == self.max_steps else None  # no model copy held between checkpoints
        bar.close()
        self._save_model(final_state if final_state is not None else self._full_state(module))
        self.processes.barrier()
        return entry

    def _micro_batch_loss(self, model, positions: range):
        samples = [self.samples[self.order.sample(p)] for p in positions]
        if self.config.objective == "jacobi-forcing":
            return jacobi_forcing_batch_loss(model, samples, self.config, self.processes.device, self.teacher_module)
        points = [self.order.point(p, len(b.states)) for p, (_, b) in zip(positions, samples)]
        return cllm_batch_loss(model, samples, points, self.config, self.processes.device, self.teacher_module)

    def _parallelize(self, module):
        processes = self.processes
        if self.config.fsdp:
            if not processes.distributed:
                raise ValueError("--fsdp shards the model across processes: launch with torchrun and 2+ processes")
            from torch.distributed.fsdp import fully_shard

            for layer in self.lm.base_model.layers:
                fully_shard(layer)
            fully_shard(module)
            return module
        if processes.distributed:
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(module, device_ids=[processes.device.index]
                                           if processes.device.type == "cuda" else None)
        return module

    def _gradient_sync(self, model, last_micro_step: bool):
        """Reduce gradients across processes only on the last micro-step of an accumulation."""
        if last_micro_step or not self.processes.distributed:
            return contextlib.nullcontext()
        if self.config.fsdp:
            model.set_requires_gradient_sync(False)
            return _restore_gradient_sync(model)
        return model.no_sync()

    def _last_logged(self) -> dict:
        """The log's last entry (what a rerun of a finished run reports), or {} before the first step."""
        path = os.path.join(self.out_dir, LOG)
        if not self.processes.is_main or not os.path.exists(path):
            return {}
        entries = read_jsonl_log(path)
        return entries[-1] if entries else {}

    def _log(self, step, terms: list[StepLosses], lr, grad_norm, seconds, check: dict) -> dict:
        local = [sum(getattr(t, k) for t in terms) / len(terms) for k in ("total", "consistency", "ar", "distill")]
        total, consistency, ar, distill = self.processes.mean(local)
        tokens = self.processes.sum(sum(t.tokens for t in terms))
        blocks = self.processes.sum(sum(t.blocks for t in terms))
        distilled = {"distill": distill} if self.teacher is not None else {}  # absent when off
        return self._append_log({
            "step": step, "loss": total, "consistency": consistency, "ar": ar, **distilled, "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens), "tokens_per_second": tokens / seconds, "blocks": int(blocks),
            "blocks_per_second": blocks / seconds, "seconds": seconds, **check})

    def _append_log(self, entry: dict) -> dict:
        if self.processes.is_main:
            with open(os.path.join(self.out_dir, LOG), "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    # ------------------------------------------------------------ the held-out check (guard rail)

    def _heldout_check(self, module) -> dict:
        """Decode the held-out prompts with the current weights: their agreement with the target's answers."""
        start = time.perf_counter()
        state = self._full_state(module)  # every process takes part (FSDP gathers the shards)
        agreement = tokens_per_forward = 0.0
        if self.processes.is_main:
            agreement, tokens_per_forward = self._decode_heldout(state)
        # only the main process decodes; the sum over processes hands its numbers to all of them
        return {"heldout_agreement": self.processes.sum(agreement),
                "heldout_tokens_per_forward": self.processes.sum(tokens_per_forward),
                "heldout_seconds": time.perf_counter() - start}

    def _decode_heldout(self, state: dict) -> tuple[float, float]:
        """Agreement of greedy answers with the recorded ones (module docstring), and tokens per forward,
        decoded in the collection's dtype, where the untrained model reproduces its own answers."""
        from transformers import AutoModelForCausalLM

        from ..runtime.decoding import generate
        from ..runtime.inputs import greedy_generation_config

        settings = self.trajectories.manifest["settings"]
        if self._checker is None:
            dtype = getattr(torch, self.trajectories.manifest["model"]["dtype"])
            self._checker = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype).eval()
        self._checker.load_state_dict({k.removeprefix("lm."): v for k, v in state.items()})
        width = max(len(p.prompt) for p in self.heldout)
        ids = torch.zeros(len(self.heldout), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(self.heldout):  # left-padded, as for model.generate
            ids[row, width - len(p.prompt):] = torch.tensor(p.prompt)
            mask[row, width - len(p.prompt):] = 1
        eos = settings["eos_token_ids"]
        with torch.no_grad():
            out = generate(self._checker, ids, mask, max_new_tokens=settings["max_new_tokens"],
                           block_size=settings["block_size"], drafts=None, eos_token_id=eos or None, pad_token_id=0,
                           generation_config=greedy_generation_config(self._checker.generation_config))
        agreement = 0.0
        for p, row in zip(self.heldout, out.sequences[:, width:].tolist()):
            row = row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))]  # padding is no answer
            agreement += sequence_agreement(row, p.answer)
        return agreement / len(self.heldout), out.stats.tokens_per_forward

    def _check_baseline(self, module) -> None:
        """Log the untrained model's check as step 0; refuse a threshold it already misses (it could only stop
        the run at once)."""
        check = self._append_log({"step": 0, "event": "baseline", **self._heldout_check(module)})
        if check["heldout_agreement"] < self.config.min_agreement:
            raise ValueError(f"the untrained model's held-out answers agree with its own recorded ones only "
                             f"{check['heldout_agreement']:.3f}, below min_agreement="
                             f"{self.config.min_agreement}: lower min_agreement (the answers were recorded in "
                             f"{self.trajectories.manifest['model']['dtype']}, where batch shapes change rounding)")

    def _stop(self, step: int, agreement: float) -> dict:
        """Write the model of the last checkpoint (it passed the check) and say in the log why training stopped."""
        entry = {}
        if self.processes.is_main:
            state, rolled_back_to = self._rollback_state()
            source = " (the source model)" if rolled_back_to == 0 else ""
            entry = {"step": step, "event": "stopped", "heldout_agreement": agreement,
                     "rolled_back_to": rolled_back_to,
                     "reason": f"held-out answer agreement {agreement:.3f} fell below min_agreement "
                               f"{self.config.min_agreement} at step {step}: training stopped and the model rolled "
                               f"back to step {rolled_back_to}{source}"}
            self._append_log(entry)
            self._save_model(state)
            atomic_write_json(os.path.join(self.out_dir, STOPPED), {"identity": self.identity, "entry": entry,
                                                                    "min_agreement": self.config.min_agreement})
        self.processes.barrier()
        return entry

    def _rollback_state(self) -> tuple[dict, int]:
        """The weights of the last checkpoint and its step; the source model's and 0 before the first one."""
        path = os.path.join(self.out_dir, CHECKPOINT)
        if os.path.exists(path):
            checkpoint = _load_checkpoint(path)
            return checkpoint["model"], checkpoint["step"]
        from transformers import AutoModelForCausalLM

        source = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        return {f"lm.{k}": v for k, v in source.state_dict().items()}, 0

    def _read_stopped(self) -> dict | None:
        """The stop entry of an earlier run of this configuration that the guard rail stopped (None if none).
        Under another threshold the stop no longer holds: it is forgotten and the run resumes."""
        path = os.path.join(self.out_dir, STOPPED)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            stopped = json.load(f)
        if stopped["identity"] != self.identity:
            raise ValueError(f"{path}: another training run stopped here; train into another --out directory")
        if stopped["min_agreement"] == self.config.min_agreement:
            return stopped["entry"]
        self.processes.barrier()  # every process has read it before it goes
        if self.processes.is_main:
            os.remove(path)
        return None

    # ------------------------------------------------------------ checkpoints

    def _state_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _save_checkpoint(self, step, module, optimizer, scheduler) -> dict:
        """Write the resumable checkpoint (and ``step-N/`` with ``keep_models``); return the gathered weights."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        model_state = self._full_state(module)
        optimizer_state = get_optimizer_state_dict(module, optimizer, options=self._state_options())
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state(self.processes.device) if self.processes.device.type == "cuda" else None}
        rngs = [None] * self.processes.world_size
        if self.processes.distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if self.config.keep_models:
            self._save_model(model_state, os.path.join(self.out_dir, f"step-{step}"))
        if self.processes.is_main:
            state = {"step": step, "identity": self.identity, "model": model_state, "optimizer": optimizer_state,
                     "scheduler": scheduler.state_dict(), "rng": rngs}
            atomic_write(os.path.join(self.out_dir, CHECKPOINT), lambda tmp: torch.save(state, tmp))
        self.processes.barrier()
        return model_state

    def _resume(self, module, optimizer, scheduler) -> int:
        """Load the checkpoint in out_dir if there is one; return the step to continue from."""
        path = os.path.join(self.out_dir, CHECKPOINT)
        if self.processes.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            self._remove_leftovers()
            atomic_write_json(os.path.join(self.out_dir, RUN), self.identity)
        if not os.path.exists(path):
            if self.processes.is_main and os.path.exists(os.path.join(self.out_dir, LOG)):
                os.remove(os.path.join(self.out_dir, LOG))  # this run's log without a checkpoint: nothing to resume
            self.processes.barrier()
            return 0
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state = _load_checkpoint(path)
        self._check_same_run(path, state["identity"])
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(module, state["model"], options=options)
        set_optimizer_state_dict(module, optimizer, state["optimizer"], options=options)
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if len(rngs) == self.processes.world_size:
            rng = rngs[self.processes.rank]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng["cuda"] is not None and self.processes.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.processes.device)
        if self.processes.is_main:
            truncate_jsonl_log(os.path.join(self.out_dir, LOG), state["step"])
        self.processes.barrier()
        return state["step"]

    def _remove_leftovers(self) -> None:
        """Delete what killed runs left half-written: temporary files and ``.model-*`` directories (a checkpoint's
        temporary is as large as the model plus the optimizer: repeated kills would fill the disk)."""
        folders = [self.out_dir] + [os.path.join(self.out_dir, name) for name in os.listdir(self.out_dir)
                                    if name.startswith("step-") and os.path.isdir(os.path.join(self.out_dir, name))]
        for folder in folders:
            remove_stale_temporaries(folder)
            for name in os.listdir(folder):
                if name.startswith(".model-"):
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

    def _full_state(self, module) -> dict:
        """The whole model's weights on the main process (on CPU; FSDP gathers them: every process calls this)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module, options=self._state_options())

    def _save_model(self, state: dict, out_dir: str | None = None) -> None:
        """Write ``state`` (``lm.``-prefixed, as the module's) as a plain Hugging Face directory in the source
        dtype, plus the tokenizer, into ``out_dir`` (default: the run's; on the main process)."""
        out_dir = out_dir or self.out_dir
        if self.processes.is_main:
            os.makedirs(out_dir, exist_ok=True)
            weights = {k.removeprefix("lm."): v.to(self.save_dtype) for k, v in state.items()}
            self.lm.config.dtype = self.save_dtype
            with tempfile.TemporaryDirectory(dir=out_dir, prefix=".model-") as tmp:
                self.lm.save_pretrained(tmp, state_dict=weights)
                tokenizer = _load_tokenizer(self.model_dir)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                for name in os.listdir(tmp):  # each file lands whole; a rerun rewrites any it missed
                    os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))


def _train_top_layers(lm, count: int) -> None:
    """Freeze all of ``lm`` but its top ``count`` decoder layers and its final norm. The frozen layers below
    take no backward at all (their outputs need no gradient), so a step costs the forward and the top layers'
    backward; the embeddings, and so a tied LM head, stay the source's."""
    lm.requires_grad_(False)
    base = lm.base_model
    for layer in list(base.layers)[-count:]:
        layer.requires_grad_(True)
    base.norm.requires_grad_(True)


@contextlib.contextmanager
def _restore_gradient_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _load_checkpoint(path: str) -> dict:
    """A checkpoint this module wrote: tensors and plain containers only, so ``weights_only`` loading suffices
    and a file that would run code when unpickled is refused instead."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"{path} is not a checkpoint of cllm_rt (it holds more than tensors: {reason}); "
                         "train into another --out directory") from None


def _load_tokenizer(model_dir: str):
    """The tokenizer saved with a model, or None when the directory has none."""
    from transformers import AutoTokenizer

    if not os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(model_dir)
