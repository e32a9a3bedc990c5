"""The distillation term (issue #20 item 3): KL(frozen source model || model) at the AR positions, for both
objective families; the teacher stays the source model across steps and resumes; batch splits; bad values;
and the evaluation's drift measures (the target's perplexity on an output, greedy agreement)."""

import copy
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cllm_rt.cli import main as cli_main
from cllm_rt.demo import data
from cllm_rt.demo.evaluate import answer_nll
from cllm_rt.training import train as train_module
from cllm_rt.training.collect import decode_trajectories
from cllm_rt.training.storage import PromptTrajectories
from cllm_rt.training.train import ScoredLogits, TrainConfig, cllm_batch_loss, jacobi_forcing_batch_loss, train
from test_train import (BASE, OBJECTIVES, _assert_same_updates, _log, _weights, plain_sgd, setup,  # noqa: F401
                        train_killed_at)
from tiny_models import random_prompts, tiny_model

DISTILL = {"distill_weight": 1.0, "ar_weight": 0.0}


def _answers(model) -> list[PromptTrajectories]:
    ids, mask = random_prompts(3, [5, 9, 4], seed=1)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    builders = decode_trajectories(model, prompts, [1, 2, 3], block_size=4, max_new_tokens=13, eos=set())
    return [PromptTrajectories(i, p, b.answer, b.blocks) for i, (p, b) in enumerate(zip(prompts, builders))]


def _batch_loss(objective: str, student, teacher, answers):
    """One micro-batch of ``objective`` with the distillation term only (AR weight 0)."""
    config = TrainConfig(objective=objective, noise_window=3, **DISTILL)
    student, teacher = ScoredLogits(student), ScoredLogits(teacher)
    if objective == "jacobi-forcing":
        return jacobi_forcing_batch_loss(student, answers, config, "cpu", teacher)
    samples = [(p, b) for p in answers for b in p.blocks if len(b.states) > 1][:4]
    return cllm_batch_loss(student, samples, [0] * len(samples), config, "cpu", teacher)


def _kl_by_hand(student, teacher, answers, objective) -> float:
    """Mean over rows of the mean KL(teacher || student) over each row's answer positions, from full causal
    forwards over prompt + answer (for cllm-*, the rows are the batch's samples: one per block)."""
    rows = [p for p in answers for b in p.blocks if len(b.states) > 1][:4] if objective != "jacobi-forcing" else answers
    per_row = []
    for p in rows:
        ids = torch.tensor([p.prompt + p.answer])
        s = F.log_softmax(student(ids).logits[0, len(p.prompt) - 1:-1], -1)
        t = F.log_softmax(teacher(ids).logits[0, len(p.prompt) - 1:-1], -1)
        per_row.append((t.exp() * (t - s)).sum(-1).mean().item())
    return sum(per_row) / len(per_row)


@pytest.mark.parametrize("objective", ["cllm-global", "jacobi-forcing"])
def test_distillation_is_zero_with_zero_gradient_at_the_teacher_and_the_kl_elsewhere(objective, monkeypatch):
    """float64: a student equal to the teacher scores exactly 0 with no gradient; a perturbed one the KL a full
    causal forward gives at the answer positions (a misaligned position would score a wrong distribution)."""
    # the consistency term is never 0 at step 0: leave it out so the gradient is the distillation term's
    monkeypatch.setattr(train_module, "consistency_loss", lambda *args: torch.zeros((), dtype=torch.float64))
    student = tiny_model()
    teacher = copy.deepcopy(student).requires_grad_(False)
    answers = _answers(student)
    loss, terms = _batch_loss(objective, student, teacher, answers)
    assert abs(terms.distill) < 1e-12 and terms.ar > 0  # the AR term is computed, weighted 0
    loss.backward()  # = the distillation term alone
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-12
    assert all(p.grad is None for p in teacher.parameters())

    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student.zero_grad()
    loss, terms = _batch_loss(objective, student, teacher, answers)
    with torch.no_grad():
        expected = _kl_by_hand(student, teacher, answers, objective)
    assert terms.distill > 1e-3 and terms.distill == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert student.lm_head.weight.grad.abs().max() > 1e-6


def test_teacher_is_the_frozen_source_model_at_every_step(setup, tmp_path, monkeypatch):
    source = _weights(setup["model"])
    seen = []
    original = train_module._distillation

    def spy(teacher, *args):
        state = teacher.lm.state_dict()
        seen.append((all(not p.requires_grad and p.grad is None for p in teacher.parameters()),
                     all(torch.equal(state[k], source[k]) for k in source), teacher.training))
        return original(teacher, *args)

    monkeypatch.setattr(train_module, "_distillation", spy)
    for objective, options in OBJECTIVES.items():
        seen.clear()
        out = tmp_path / objective
        config = dataclasses.replace(BASE, max_steps=3, warmup=0, **options, **DISTILL)
        train(setup["model"], setup["trajectories"], str(out), config, progress=False)
        assert seen == [(True, True, False)] * 3, objective  # frozen, the source's weights, eval mode
        log = _log(out)
        # step 1 sees the source model itself (0 up to float32 rounding), later steps a moved student
        assert abs(log[0]["distill"]) < 1e-6 and all(e["distill"] > 1e-5 for e in log[1:])
        assert any(not torch.equal(v, source[k]) for k, v in _weights(out).items())  # the student did move


def test_resume_keeps_the_source_as_teacher_and_refuses_another_weight(setup, tmp_path, monkeypatch):
    config = dataclasses.replace(BASE, max_steps=4, save_every=2, **DISTILL)
    train(setup["model"], setup["trajectories"], str(tmp_path / "whole"), config, progress=False)
    train_killed_at(monkeypatch, 3, setup["model"], setup["trajectories"], str(tmp_path / "cut"), config,
                    progress=False)
    train(setup["model"], setup["trajectories"], str(tmp_path / "cut"), config, progress=False)  # from step 2
    whole, cut = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [(e["loss"], e["distill"]) for e in whole] == [(e["loss"], e["distill"]) for e in cut]
    with open(tmp_path / "whole" / "run.json") as f:
        assert json.load(f)["distill_weight"] == 1.0
    with pytest.raises(ValueError, match=r"distill_weight: 1.0 there, 2.0 now"):
        train(setup["model"], setup["trajectories"], str(tmp_path / "whole"),
              dataclasses.replace(config, distill_weight=2.0), progress=False)
    # off, it is not part of a run's identity: runs begun before the term existed resume unchanged
    train(setup["model"], setup["trajectories"], str(tmp_path / "plain"), dataclasses.replace(BASE, max_steps=1),
          progress=False)
    with open(tmp_path / "plain" / "run.json") as f:
        assert "distill_weight" not in json.load(f)
    assert "distill" not in _log(tmp_path / "plain")[0]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_distillation_with_accumulation_equals_one_large_batch(setup, tmp_path, plain_sgd, objective):
    common = dict(**OBJECTIVES[objective], **DISTILL, lr=0.05, max_steps=2, max_grad_norm=1e9)
    train(setup["model"], setup["trajectories"], str(tmp_path / "large"),
          TrainConfig(batch_size=4, grad_accum=1, **common), progress=False)
    train(setup["model"], setup["trajectories"], str(tmp_path / "split"),
          TrainConfig(batch_size=2, grad_accum=2, **common), progress=False)
    _assert_same_updates(tmp_path / "large", tmp_path / "split", setup["model"])
    # float32 values of other batch shapes: equal up to rounding
    large, split = _log(tmp_path / "large"), _log(tmp_path / "split")
    assert [e["distill"] for e in large] == pytest.approx([e["distill"] for e in split], rel=1e-4, abs=1e-8)


def test_negative_or_nan_distill_weight_is_refused_in_one_line(setup, tmp_path, capsys):
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match=r"^distill_weight must be >= 0, got"):
            TrainConfig(distill_weight=bad).validate()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--model", setup["model"], "--trajectories", setup["trajectories"], "--out",
                  str(tmp_path / "out"), "--distill-weight", "-0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "cllm-rt train: error: distill_weight must be >= 0, got -0.5\n"
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- drift measures of the evaluation

def test_answer_nll_is_hf_cross_entropy_over_the_answer_and_favours_the_greedy_answer():
    model = tiny_model()
    prompt = [5, 17, 33, 8]
    greedy = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):].tolist()
    ids = torch.tensor([prompt + greedy])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100  # HF's mean cross-entropy over the answer tokens only
    with torch.no_grad():
        mean_nll = model(ids, labels=labels).loss.item()
    # HF's loss casts the logits to float32: equal to float32 precision
    assert answer_nll(model, prompt, greedy) == pytest.approx(mean_nll * len(greedy), rel=1e-6)
    other = [(t * 7 + 3) % 101 for t in greedy]  # same length, other tokens
    assert answer_nll(model, prompt, other) > answer_nll(model, prompt, greedy) + 1.0
    assert answer_nll(model, prompt, []) == 0.0


def test_greedy_agreement_is_the_guard_rails_difflib_ratio():
    q = data.quality("chat", "", "", "", [4, 5, 6], [4, 5, 7, 8])
    assert q["greedy_agreement"] == pytest.approx(2 * 2 / 7)  # M = 2 matching tokens of 3 + 4
    assert data.quality("chat", "", "", "", [1, 4, 5, 6, 7], [4, 5, 6, 7])["greedy_agreement"] == pytest.approx(8 / 9)
