"""Evidence that consistency training works, for CLLM's global objective and for Jacobi Forcing's packed one:
plain Jacobi decoding of the trained model makes clearly more tokens final per forward than the target it
came from, while its greedy answers stay close to the target's.

Setup (real text, so the effect is not an artefact of a looping random model): a byte-level 2-layer Llama
is first trained briefly on the Python standard library's ``textwrap.py``; its greedy continuations of 32
prompts cut from that file are real, varied Python/English. Jacobi trajectories of those prompts are
collected (n = 16, 64 new tokens), the target is trained on them (AR weight 10, 100 steps), and both models
decode the same prompts with ``cllm_rt.generate`` (plain Jacobi, block 16: drafting would measure the
drafts, not the training).

Observed on a 2-core CPU (seeds fixed): tokens per forward 1.08 -> 2.2 (x2.1) for cllm-global (batch 8
blocks) and -> 1.65 (x1.5) for jacobi-forcing (batch 8 answers, noise window 16: with 4 blocks per answer
its schedule asks for unconverged fractions 0 … 0.2 only); per-position agreement with the target's answers
0.73 and 0.66, identical answers 59 % and 53 %.
"""

import os
import sysconfig

import pytest
import torch
import transformers

import cllm_rt
from cllm_rt.training.train import TrainConfig, train
from cllm_rt.training.collect import CollectSettings, Prompt, collect
from training_fixtures import EOS, byte_tokenizer, save_model, tiny_lm

PROMPTS, PROMPT_LEN, MAX_NEW, BLOCK = 32, 32, 64, 16
CORPUS = os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")
pytestmark = pytest.mark.skipif(not os.path.exists(CORPUS), reason="the standard library's sources are not installed")


def _train_target(text: bytes, steps: int = 250, seq: int = 128, batch: int = 16) -> transformers.PreTrainedModel:
    """Language-model pretraining of the tiny target on real text (byte tokens)."""
    data = torch.tensor(list(text), dtype=torch.long)
    model = tiny_lm(init_std=None, hidden_size=64, intermediate_size=256, num_key_value_heads=4,
                    eos_token_id=EOS).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
        window = torch.stack([data[s:s + seq + 1] for s in starts])
        logits = model(input_ids=window[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval()


def _decode(model, prompts):
    outputs, per_forward = [], []
    for prompt in prompts:
        out = cllm_rt.generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW, block_size=BLOCK, drafts=None)
        outputs.append(out.sequences[0, len(prompt):].tolist())
        per_forward.append(out.stats.tokens_per_forward)
    return outputs, sum(per_forward) / len(per_forward)


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from 2 threads and 1 thread resists other load
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target(tmp_path_factory, one_thread):
    """The pretrained target, its trajectories and its own decoding of the prompts."""
    root = tmp_path_factory.mktemp("consistency")
    text = open(CORPUS, encoding="utf-8").read().encode()
    model = _train_target(text)
    starts = [i * (len(text) - 200) // PROMPTS for i in range(PROMPTS)]
    prompts = [list(text[s:s + PROMPT_LEN]) for s in starts]
    collect(model, [Prompt(p) for p in prompts], str(root / "trajectories"),
            CollectSettings(block_size=BLOCK, max_new_tokens=MAX_NEW), batch_size=16, progress=False)
    return {"dir": save_model(model, root / "target", byte_tokenizer()), "trajectories": str(root / "trajectories"),
            "prompts": prompts, "decoded": _decode(model, prompts), "root": root}


@pytest.mark.parametrize("objective, min_speedup", [("cllm-global", 1.5), ("jacobi-forcing", 1.3)])
def test_consistency_training_raises_tokens_per_forward_and_keeps_answers(target, objective, min_speedup):
    out = target["root"] / objective
    train(target["dir"], target["trajectories"], str(out),
          TrainConfig(objective=objective, lr=1e-3, batch_size=8, max_steps=100, warmup=10, save_every=1000),
          progress=False)
    cllm = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    target_answers, target_speed = target["decoded"]
    cllm_answers, cllm_speed = _decode(cllm, target["prompts"])
    agreement = sum(sum(a == b for a, b in zip(t, c)) / len(t)
                    for t, c in zip(target_answers, cllm_answers)) / PROMPTS
    identical = sum(t == c for t, c in zip(target_answers, cllm_answers)) / PROMPTS
    print(f"\n{objective}: tokens per forward: target {target_speed:.2f}, trained {cllm_speed:.2f} "
          f"(x{cllm_speed / target_speed:.2f}); answer agreement {agreement:.3f} per position, "
          f"{identical:.0%} identical")
    assert cllm_speed >= min_speedup * target_speed
    assert agreement >= 0.6
