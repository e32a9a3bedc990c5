"""Consistency training: outputs, exact resume, batch splitting (accumulation, DDP, FSDP) for every objective,
the packed objective's forward against ordinary causal forwards, the held-out guard rail, and clear errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import cllm_rt
from cllm_rt.training import train as train_module
from cllm_rt.cli import main as cli_main
from cllm_rt.training.train import DataOrder, ScoredLogits, TrainConfig, train
from cllm_rt.training.collect import CollectSettings, Prompt, collect, decode_trajectories
from cllm_rt.training.packing import pack_answer, pack_batch
from cllm_rt.training.storage import PromptTrajectories
from tiny_models import CONFIGS, random_prompts, tiny_model
from training_fixtures import EOS, byte_tokenizer, files_in, save_model, tiny_lm

BASE = TrainConfig(lr=1e-3, batch_size=4, max_steps=4, save_every=2, warmup=1)
# the fixtures decode blocks of 4 in 5 blocks: a noise window of 4 spreads Jacobi Forcing's schedule over 0 … 1
OBJECTIVES = {"cllm-global": {}, "jacobi-forcing": {"objective": "jacobi-forcing", "noise_window": 4}}


def _collect(model, out, block_size=4, keep_reference=True, tokenizer=None):
    ids, mask = random_prompts(8, [3 + i % 5 for i in range(8)], seed=3)
    prompts = [Prompt(row[m.bool()].tolist(), [40 + i, 41, EOS]) for i, (row, m) in enumerate(zip(ids, mask))]
    settings = CollectSettings(block_size=block_size, max_new_tokens=17, keep_reference=keep_reference)
    collect(model, prompts, str(out), settings, tokenizer=tokenizer or byte_tokenizer(), progress=False)
    return str(out)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = tiny_lm(eos_token_id=EOS)
    return {"model": save_model(model, root / "model", byte_tokenizer()), "trajectories": _collect(model, root / "t"),
            "root": root}


def _weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def _log(directory):
    with open(os.path.join(directory, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_weights(a, b, atol=0.0):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _updates(directory, source):
    """Each weight's change from the source model (float64)."""
    before = _weights(source)
    return {k: v.double() - before[k].double() for k, v in _weights(directory).items()}


def _assert_same_updates(a, b, source, rel=1e-4):
    """Two runs moved every weight alike: max |Δa - Δb| within ``rel`` of the largest update of that weight.

    Updates, not weights, and relative to their size: float32 rounding differs between CPUs (AVX2 vs AVX-512
    kernels), and what a batch split must preserve is the step, not the last bit of a weight.
    """
    ua, ub = _updates(a, source), _updates(b, source)
    for name in ua:
        scale = ua[name].abs().max().item()
        error = (ua[name] - ub[name]).abs().max().item()
        assert error <= rel * scale + 1e-12, f"{name}: updates differ by {error:.3g} (largest update {scale:.3g})"


@pytest.fixture
def plain_sgd(monkeypatch):
    """Train with SGD instead of AdamW: AdamW normalises each step, so a rounding difference in a near-zero
    gradient moves a weight by ~lr and hides whether two runs computed the same gradient."""
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_output_is_a_plain_hf_model_that_generates(setup, tmp_path, objective):
    out = str(tmp_path / "out")
    last = train(setup["model"], setup["trajectories"], out, dataclasses.replace(BASE, **OBJECTIVES[objective]),
                 progress=False)
    assert last["step"] == 4 and all(torch.isfinite(torch.tensor(last[k])) for k in ("loss", "consistency", "ar"))
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert {"loss", "consistency", "ar", "lr", "grad_norm", "tokens_per_second", "blocks_per_second"} <= log[0].keys()
    # a CLLM step trains batch_size blocks; a Jacobi Forcing step every noisy block of batch_size answers
    assert all(e["blocks"] == 4 if objective == "cllm-global" else e["blocks"] > 4 for e in log)
    assert {"config.json", "model.safetensors", "tokenizer.json", "checkpoint.pt"} <= set(files_in(out))
    # float64: exact tokens in float32 would depend on the CPU's vector width (AVX2 vs AVX-512 kernels)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    source = transformers.AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float64)
    assert not torch.equal(model.lm_head.weight, source.lm_head.weight)
    prompt = torch.tensor([[5, 6, 7]])
    expected = model.generate(prompt, do_sample=False, max_new_tokens=10, pad_token_id=0)
    torch.testing.assert_close(cllm_rt.generate(model, prompt, max_new_tokens=10, block_size=4).sequences, expected)


def train_killed_at(monkeypatch, step: int, *args, **kwargs) -> None:
    """``train(*args, **kwargs)`` killed (KeyboardInterrupt) right after it logs ``step``; later runs go whole."""
    log_step = train_module._Run._log

    def killed(self, logged, *rest):
        entry = log_step(self, logged, *rest)
        if logged == step:
            raise KeyboardInterrupt("simulated kill")
        return entry

    monkeypatch.setattr(train_module._Run, "_log", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(*args, **kwargs)
    finally:
        monkeypatch.setattr(train_module._Run, "_log", log_step)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_killed_run_resumes_exactly(setup, tmp_path, monkeypatch, objective):
    config = TrainConfig(**OBJECTIVES[objective], lr=1e-3, batch_size=4, max_steps=6, save_every=2, warmup=2,
                         keep_models=True)
    train(setup["model"], setup["trajectories"], str(tmp_path / "whole"), config, progress=False)

    train_killed_at(monkeypatch, 5, setup["model"], setup["trajectories"], str(tmp_path / "cut"), config,
                    progress=False)
    assert [e["step"] for e in _log(tmp_path / "cut")] == [1, 2, 3, 4, 5]
    # a power cut tears the log's last append; kills mid-save leave a checkpoint's temporary and model directories
    cut = tmp_path / "cut"
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 0.')
    (cut / ".checkpoint.pt.tmp-4242").write_bytes(b"half a checkpoint")
    for folder in (cut / ".model-x1", cut / "step-4" / ".model-x2"):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a model")
    with pytest.warns(UserWarning, match="torn last line") as warned:
        train(setup["model"], setup["trajectories"], str(cut), config, progress=False)  # from step 4
    assert len([w for w in warned if "torn" in str(w.message)]) == 1
    assert not [name for folder in (cut, cut / "step-2", cut / "step-4") for name in os.listdir(folder)
                if name.startswith(".")]
    whole, resumed = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [e["step"] for e in resumed] == list(range(1, 7))
    assert [(e["loss"], e["lr"]) for e in resumed] == [(e["loss"], e["lr"]) for e in whole]
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")
    # every checkpoint kept its model: the one before the kill, the ones after, the last = the final model
    for step in (2, 4, 6):
        _assert_same_weights(tmp_path / "whole" / f"step-{step}", tmp_path / "cut" / f"step-{step}")
    _assert_same_weights(tmp_path / "whole" / "step-6", tmp_path / "whole")
    with pytest.raises(AssertionError):
        _assert_same_weights(tmp_path / "whole" / "step-4", tmp_path / "whole")


def test_training_the_top_layers_moves_only_them_and_resumes_exactly(setup, tmp_path, monkeypatch):
    config = dataclasses.replace(BASE, train_layers=1, max_steps=4, save_every=2)
    train(setup["model"], setup["trajectories"], str(tmp_path / "whole"), config, progress=False)
    layers = transformers.AutoConfig.from_pretrained(setup["model"]).num_hidden_layers
    moved = {name for name, update in _updates(tmp_path / "whole", setup["model"]).items() if update.abs().max() > 0}
    top = f"model.layers.{layers - 1}."
    assert moved and all(name.startswith(top) or name == "model.norm.weight" for name in moved)
    assert "model.norm.weight" in moved and any(name.startswith(top + "mlp.") for name in moved)
    train_killed_at(monkeypatch, 3, setup["model"], setup["trajectories"], str(tmp_path / "cut"), config,
                    progress=False)
    train(setup["model"], setup["trajectories"], str(tmp_path / "cut"), config, progress=False)
    _assert_same_weights(tmp_path / "whole", tmp_path / "cut")
    with pytest.raises(ValueError, match="belongs to another training run"):  # another layer count: another run
        train(setup["model"], setup["trajectories"], str(tmp_path / "cut"), dataclasses.replace(config, train_layers=2),
              progress=False)
    with pytest.raises(ValueError, match=f"train_layers=99 but .* has {layers} decoder layers"):
        train(setup["model"], setup["trajectories"], str(tmp_path / "other"),
              dataclasses.replace(config, train_layers=99), progress=False)
    with pytest.raises(ValueError, match="train_layers must be >= 0"):
        dataclasses.replace(config, train_layers=-1).validate()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_accumulation_equals_one_large_batch(setup, tmp_path, plain_sgd, objective):
    large = TrainConfig(**OBJECTIVES[objective], lr=0.05, batch_size=4, grad_accum=1, max_steps=3, max_grad_norm=1e9)
    split = TrainConfig(**OBJECTIVES[objective], lr=0.05, batch_size=2, grad_accum=2, max_steps=3, max_grad_norm=1e9)
    train(setup["model"], setup["trajectories"], str(tmp_path / "large"), large, progress=False)
    train(setup["model"], setup["trajectories"], str(tmp_path / "split"), split, progress=False)
    _assert_same_updates(tmp_path / "large", tmp_path / "split", setup["model"])


def test_update_comparison_catches_a_wrong_accumulation(setup, tmp_path, plain_sgd):
    """The check above fails when the split run's step differs (here: twice the learning rate, which is what
    summing instead of averaging the micro-steps' gradients would do)."""
    large = TrainConfig(lr=0.05, batch_size=4, max_steps=1, max_grad_norm=1e9)
    doubled = TrainConfig(lr=0.1, batch_size=2, grad_accum=2, max_steps=1, max_grad_norm=1e9)
    train(setup["model"], setup["trajectories"], str(tmp_path / "large"), large, progress=False)
    train(setup["model"], setup["trajectories"], str(tmp_path / "doubled"), doubled, progress=False)
    with pytest.raises(AssertionError, match="updates differ"):
        _assert_same_updates(tmp_path / "large", tmp_path / "doubled", setup["model"])


def test_gradient_checkpointing_changes_memory_not_math(setup, tmp_path):
    plain = TrainConfig(lr=1e-3, batch_size=4, max_steps=2)
    train(setup["model"], setup["trajectories"], str(tmp_path / "plain"), plain, progress=False)
    checkpointed = TrainConfig(lr=1e-3, batch_size=4, max_steps=2, grad_checkpointing=True)
    train(setup["model"], setup["trajectories"], str(tmp_path / "checkpointed"), checkpointed, progress=False)
    _assert_same_weights(tmp_path / "plain", tmp_path / "checkpointed", atol=1e-6)


def test_data_order_covers_every_sample_once_per_epoch():
    order = DataOrder(10, seed=3)
    epoch = [order.sample(p) for p in range(10)]
    assert sorted(epoch) == list(range(10)) and epoch != [order.sample(p) for p in range(10, 20)]
    # the processes of one micro-step take adjacent slices of the same stream a single process would take
    one = DataOrder.positions(step=2, micro=1, rank=0, batch_size=4, grad_accum=2, world_size=1)
    two = [DataOrder.positions(2, 1, rank, 2, 2, 2) for rank in (0, 1)]
    assert list(one) == [*two[0], *two[1]]
    assert all(0 <= order.point(p, 5) < 4 for p in range(50))


def test_local_loss_and_reference_answers_change_what_is_optimised(setup, tmp_path):
    """Same seed, so step 1 scores the same samples and points on the same model: only the targets differ."""
    def first_step(**options):
        config = TrainConfig(lr=1e-3, batch_size=4, max_steps=1, **options)
        train(setup["model"], setup["trajectories"], str(tmp_path / "-".join(options.values())), config, progress=False)
        return _log(tmp_path / "-".join(options.values()))[0]

    plain = first_step(loss="global", ar_target="greedy")
    local = first_step(loss="local", ar_target="greedy")
    reference = first_step(loss="global", ar_target="reference")
    assert local["ar"] == pytest.approx(plain["ar"]) and local["consistency"] != pytest.approx(plain["consistency"])
    assert reference["consistency"] == pytest.approx(plain["consistency"]) and reference["ar"] != pytest.approx(plain["ar"])


# One torchrun launch trains several configurations, so each process pays torch's start-up once. The group is
# joined once for all of them: gloo hung re-creating a destroyed group in the same processes. SGD as in
# plain_sgd, so the comparison sees the gradients, not AdamW's normalisation of rounding noise.
_DRIVER = """
import json, sys
import torch
import torch.distributed as dist
from cllm_rt.training.train import TrainConfig, train
torch.optim.AdamW = lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr)
dist.init_process_group("gloo")
for out, options in json.loads(sys.argv[3]):
    train(sys.argv[1], sys.argv[2], out, TrainConfig(**options), progress=False)
    print("finished", out, flush=True)
dist.barrier()  # no process destroys the group while the other is still in a collective
dist.destroy_process_group()
"""


def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path, plain_sgd):
    common = dict(lr=0.05, max_steps=3, warmup=1, max_grad_norm=1e9)
    # the held-out check under FSDP: every process gathers the weights, the main one decodes
    # with distillation each process holds its own frozen teacher; under FSDP an unsharded one
    runs = {"ddp-cllm": OBJECTIVES["cllm-global"], "ddp-jacobi-forcing": OBJECTIVES["jacobi-forcing"],
            "fsdp-jacobi-forcing": dict(OBJECTIVES["jacobi-forcing"], fsdp=True, heldout=2, min_agreement=0.0),
            "ddp-cllm-distill": dict(OBJECTIVES["cllm-global"], distill_weight=1.0, ar_weight=0.0),
            "fsdp-jacobi-forcing-distill": dict(OBJECTIVES["jacobi-forcing"], fsdp=True, distill_weight=1.0),
            # FSDP skips the gradient reduction on the first micro-step and restores it for the last
            "fsdp-cllm-accumulated": dict(OBJECTIVES["cllm-global"], fsdp=True, batch_size=1, grad_accum=2)}
    for name, options in runs.items():
        single = {k: v for k, v in options.items() if k not in ("fsdp", "batch_size", "grad_accum")}
        train(setup["model"], setup["trajectories"], str(tmp_path / "one" / name),
              TrainConfig(batch_size=4, **common, **single), progress=False)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    two = [(str(tmp_path / "two" / name), {**common, "batch_size": 2, **options}) for name, options in runs.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", CLLM_RT_ALLOW_FALLBACK="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(driver), setup["model"], setup["trajectories"], json.dumps(two)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    for name in runs:
        _assert_same_updates(tmp_path / "one" / name, tmp_path / "two" / name, setup["model"])
        one, two = _log(tmp_path / "one" / name), _log(tmp_path / "two" / name)
        assert [e["step"] for e in one] == [e["step"] for e in two]
        for a, b in zip(one, two):
            assert a.keys() == b.keys() and a.get("blocks") == b.get("blocks")
            if "loss" in a:  # not in the held-out check's step-0 baseline entry
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a.get("heldout_agreement") == pytest.approx(b.get("heldout_agreement"))
    assert "heldout_agreement" in _log(tmp_path / "two" / "fsdp-jacobi-forcing")[-1]


# ---------------------------------------------------------------- the packed objective's forward

@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_forward_gives_clean_blocks_causal_logits_and_noisy_blocks_their_jacobi_step(arch):
    """In float64, where only a wrong mask or wrong positions can move a logit: the clean copies' logits are an
    ordinary causal forward's over prompt + answer, each noisy copy's those of a Jacobi step on its state."""
    model = tiny_model(arch)
    ids, mask = random_prompts(2, [5, 9])
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    builders = decode_trajectories(model, prompts, [1, 2], block_size=4, max_new_tokens=21, eos=set())
    answers = [PromptTrajectories(i, p, b.answer, b.blocks) for i, (p, b) in enumerate(zip(prompts, builders))]
    # window 3 gives noisy copies of consecutive blocks (1 and 2): each must not see the other's
    batch = pack_batch(answers, 3, "cpu")  # two rows of different lengths: padding included
    scored = ScoredLogits(model)
    with torch.no_grad():
        logits = scored(batch.input_ids, batch.rows, batch.cols, batch.attention_mask, batch.position_ids)
        causal = [model(torch.tensor([p.prompt + p.answer])).logits[0, len(p.prompt) - 1:-1] for p in answers]
        for row in range(len(answers)):
            torch.testing.assert_close(logits[batch.ar_index[row]][batch.ar_mask[row]], causal[row])
        copies = [(p, copy) for p in answers for copy in pack_answer(p, 3).noisy]
        assert len(copies) == len(batch.noisy_index) >= 4
        for index, (p, copy) in zip(batch.noisy_index, copies):
            context = p.context(copy.block)
            step = model(torch.tensor([context + copy.block.states[copy.state][:-1]])).logits[0, len(context) - 1:]
            torch.testing.assert_close(logits[index], step)
        # the comparison has teeth: without the shared position ids the clean logits are another forward's
        unpositioned = scored(batch.input_ids, batch.rows, batch.cols, batch.attention_mask, None)
        with pytest.raises(AssertionError):
            torch.testing.assert_close(unpositioned[batch.ar_index[1]][batch.ar_mask[1]], causal[1])


# ---------------------------------------------------------------- the held-out guard rail

@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    """A model and its trajectories collected in float64, where the check's decoding (in the collection's
    dtype) reproduces the recorded answers exactly: the untrained model agrees 1.0."""
    root = tmp_path_factory.mktemp("exact")
    model = tiny_lm(eos_token_id=EOS)
    return save_model(model, root / "model", byte_tokenizer()), _collect(model.to(torch.float64), root / "t")


def test_heldout_disagreement_stops_training_and_rolls_back(exact, tmp_path):
    model_dir, trajectories = exact
    out = tmp_path / "out"
    config = TrainConfig(**OBJECTIVES["jacobi-forcing"], lr=0.05, batch_size=2, max_steps=8, save_every=2, heldout=2,
                         min_agreement=1.0)  # any changed answer stops it
    last = train(model_dir, trajectories, str(out), config, progress=False)
    log = _log(out)
    assert last == log[-1] and last["event"] == "stopped" and last["step"] < 8
    assert f"fell below min_agreement 1.0 at step {last['step']}" in last["reason"]
    checks = [e for e in log[:-1] if "heldout_agreement" in e]  # the untrained model's first, as step 0
    assert [e["step"] for e in checks] == [0, *range(2, last["step"] + 1, 2)] and checks[0]["event"] == "baseline"
    assert [e["heldout_agreement"] == 1.0 for e in checks] == [True] * (len(checks) - 1) + [False]
    assert all(e["heldout_tokens_per_forward"] >= 1 for e in checks)
    rolled_back_to = last["rolled_back_to"]
    if rolled_back_to:
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert state["step"] == rolled_back_to
        expected = {k.removeprefix("lm."): v for k, v in state["model"].items()}
    else:
        expected = _weights(model_dir)
    assert all(torch.equal(v, expected[k]) for k, v in _weights(out).items())
    # a rerun reports the stop instead of training on; one with another threshold resumes from the checkpoint
    assert train(model_dir, trajectories, str(out), config, progress=False) == last and _log(out) == log
    lower = dataclasses.replace(config, min_agreement=0.0)
    assert train(model_dir, trajectories, str(out), lower, progress=False)["step"] == 8
    assert [e["step"] for e in _log(out) if "loss" in e] == list(range(1, 9)) and not os.path.exists(out / "stopped.json")


def test_heldout_check_rolls_back_to_the_last_passed_checkpoint_or_refuses_to_start(exact, tmp_path, monkeypatch):
    model_dir, trajectories = exact
    agreements = iter([1.0, 0.9, 0.5])  # the untrained model, step 2, step 4
    monkeypatch.setattr(train_module._Run, "_decode_heldout", lambda self, state: (next(agreements), 1.5))
    config = TrainConfig(lr=1e-3, batch_size=2, max_steps=8, save_every=2, heldout=2, min_agreement=0.8)
    last = train(model_dir, trajectories, str(tmp_path / "out"), config, progress=False)
    assert (last["step"], last["rolled_back_to"], last["heldout_agreement"]) == (4, 2, 0.5)
    state = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.equal(v, state["model"]["lm." + k]) for k, v in _weights(tmp_path / "out").items())

    monkeypatch.setattr(train_module._Run, "_decode_heldout", lambda self, state: (0.7, 1.0))
    with pytest.raises(ValueError, match="untrained model's held-out answers agree .* only 0.700, below min_agreement=0.8"):
        train(model_dir, trajectories, str(tmp_path / "never"), config, progress=False)


# ---------------------------------------------------------------- bad inputs: clear errors, nothing written

def _contents(directory) -> dict:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_out_dir_that_is_the_model_or_holds_other_files_is_refused_untouched(setup, tmp_path):
    model = save_model(tiny_lm(eos_token_id=EOS), tmp_path / "model", byte_tokenizer())
    before = _contents(model)
    for out in (model, os.path.join(model, "trained")):
        with pytest.raises(ValueError, match="is the model directory .* or inside it"):
            train(model, setup["trajectories"], out, BASE, progress=False)
    assert _contents(model) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.jsonl").write_text("my notes\n")
    (mine / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is not empty and holds no training run of cllm_rt"):
        train(setup["model"], setup["trajectories"], str(mine), BASE, progress=False)
    assert _contents(mine) == {"log.jsonl": b"my notes\n", "config.json": b"{}"}


def test_a_run_killed_before_its_first_checkpoint_restarts_and_another_run_is_refused(setup, tmp_path, monkeypatch):
    train_killed_at(monkeypatch, 1, setup["model"], setup["trajectories"], str(tmp_path / "out"), BASE,
                    progress=False)
    assert sorted(files_in(tmp_path / "out")) == ["log.jsonl", "run.json"]
    with pytest.raises(ValueError, match="run.json belongs to another training run .lr: 0.001 there, 0.002 now"):
        train(setup["model"], setup["trajectories"], str(tmp_path / "out"), dataclasses.replace(BASE, lr=2e-3),
              progress=False)
    assert train(setup["model"], setup["trajectories"], str(tmp_path / "out"), BASE, progress=False)["step"] == 4
    assert [e["step"] for e in _log(tmp_path / "out")] == [1, 2, 3, 4]


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, ("pwned",))


def test_a_checkpoint_that_would_run_code_is_refused_not_unpickled(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"step": 1, "payload": _RunsCode()}, out / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is not a checkpoint of cllm_rt"):
        train(setup["model"], setup["trajectories"], str(out), BASE, progress=False)
    assert not os.path.exists(tmp_path / "pwned")


def test_trajectories_of_another_tokenizer_are_refused(setup, tmp_path):
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    trajectories = _collect(tiny_lm(eos_token_id=EOS), tmp_path / "t", tokenizer=other)
    with pytest.raises(ValueError, match="another tokenizer"):
        train(setup["model"], trajectories, str(tmp_path / "out"), BASE, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_trajectories_of_another_model_are_refused_naming_both_fingerprints(setup, tmp_path):
    other = save_model(tiny_lm(eos_token_id=EOS, seed=1), tmp_path / "other", byte_tokenizer())
    with pytest.raises(ValueError, match=r"collected with another model \(fingerprint [0-9a-f]{16}\) than .*other "
                                         r"\([0-9a-f]{16}\)"):
        train(other, setup["trajectories"], str(tmp_path / "out"), BASE, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_a_float32_copy_of_a_model_collected_in_bfloat16_is_the_same_model(setup, tmp_path):
    trajectories = _collect(tiny_lm(eos_token_id=EOS, dtype=torch.bfloat16), tmp_path / "t")
    train(setup["model"], trajectories, str(tmp_path / "out"), TrainConfig(lr=1e-3, batch_size=4, max_steps=1),
          progress=False)


def test_trajectories_of_another_vocabulary_are_refused(setup, tmp_path):
    model = save_model(tiny_lm(vocab_size=300), tmp_path / "model")
    with pytest.raises(ValueError, match="vocabulary of 258 tokens but .* has 300"):
        train(model, setup["trajectories"], str(tmp_path / "out"), BASE, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_resuming_on_trajectories_of_another_block_size_is_refused(setup, tmp_path):
    out = str(tmp_path / "out")
    train(setup["model"], setup["trajectories"], out, TrainConfig(lr=1e-3, batch_size=4, max_steps=1), progress=False)
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in files_in(out)}
    eight = _collect(tiny_lm(eos_token_id=EOS), tmp_path / "t8", block_size=8)
    with pytest.raises(ValueError, match="block_size: 4 there, 8 now"):
        train(setup["model"], eight, out, TrainConfig(lr=1e-3, batch_size=4, max_steps=1), progress=False)
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in files_in(out)} == before


def test_reference_target_needs_references_and_a_directory_needs_a_manifest(setup, tmp_path):
    plain = _collect(tiny_lm(eos_token_id=EOS), tmp_path / "t", keep_reference=False)
    with pytest.raises(ValueError, match="without --keep-reference"):
        train(setup["model"], plain, str(tmp_path / "out"), TrainConfig(ar_target="reference"), progress=False)
    with pytest.raises(FileNotFoundError, match="not a trajectory directory"):
        train(setup["model"], str(tmp_path), str(tmp_path / "out"), BASE, progress=False)
    with pytest.raises(ValueError, match="heldout=8 leaves nothing to train on"):
        train(setup["model"], plain, str(tmp_path / "out"), TrainConfig(heldout=8), progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_objective_and_its_deprecated_alias_loss():
    assert TrainConfig(loss="local").objective == "cllm-local" and TrainConfig(loss="global").loss is None
    assert dataclasses.replace(TrainConfig(loss="local"), lr=1.0).objective == "cllm-local"
    with pytest.raises(ValueError, match="contradicts objective='jacobi-forcing'"):
        TrainConfig(loss="global", objective="jacobi-forcing")
    with pytest.raises(ValueError, match="loss must be 'global' or 'local'"):
        TrainConfig(loss="both")
    with pytest.raises(ValueError, match="objective must be one of cllm-global, cllm-local, jacobi-forcing"):
        TrainConfig(objective="cllm").validate()
    with pytest.raises(ValueError, match="ar_target must be 'greedy'"):
        TrainConfig(objective="jacobi-forcing", ar_target="reference").validate()


def test_cli_train_then_generate(setup, tmp_path, capsys):
    out = str(tmp_path / "out")
    cli_main(["train", "--model", setup["model"], "--trajectories", setup["trajectories"], "--out", out,
              "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--objective", "jacobi-forcing",
              "--noise-window", "4"])
    assert "step 2: loss" in capsys.readouterr().out
    cli_main(["generate", "--model", out, "def f(x):", "--max-new-tokens", "12", "--block-size", "4"])
    err = capsys.readouterr().err
    assert "12 tokens in" in err and "tokens per forward" in err
    cli_main(["generate", "--model", out, "def f(x):", "--max-new-tokens", "5", "--weights", "int8"])
    assert "5 tokens in" in capsys.readouterr().err
