"""Evidence that consistency training works: Jacobi decoding of the trained CLLM makes clearly more tokens
final per forward than the target it came from, while its greedy answers stay close to the target's.

Setup (real text, so the effect is not an artefact of a looping random model): a byte-level 2-layer Llama
is first trained briefly on the Python standard library's ``textwrap.py``; its greedy continuations of 32
prompts cut from that file are real, varied Python/English. Jacobi trajectories of those prompts are
collected (n = 16, 64 new tokens), the target is consistency-trained on them (global loss, AR weight 10,
150 steps), and both models decode the same prompts with ``cllm_rt.generate``.

Observed on a 2-core CPU (seeds fixed): tokens per forward 1.07 -> 2.4-2.6 (factor 2.3-2.6); per-position
agreement of the greedy answers with the target's 0.79-0.84, identical answers for 50-66 % of prompts.
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


def _train_target(text: bytes, steps: int = 400, seq: int = 128, batch: int = 16) -> transformers.PreTrainedModel:
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
        out = cllm_rt.generate(model, torch.tensor([prompt]), max_new_tokens=MAX_NEW, block_size=BLOCK)
        outputs.append(out.sequences[0, len(prompt):].tolist())
        per_forward.append(out.stats.tokens_per_forward)
    return outputs, sum(per_forward) / len(per_forward)


@pytest.mark.skipif(not os.path.exists(CORPUS), reason="the standard library's sources are not installed")
def test_consistency_training_raises_tokens_per_forward_and_keeps_answers(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from 2 threads and 1 thread resists other load
    try:
        _consistency_training_evidence(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _consistency_training_evidence(tmp_path):
    text = open(CORPUS, encoding="utf-8").read().encode()
    target = _train_target(text)
    target_dir = save_model(target, tmp_path / "target", byte_tokenizer())
    starts = [i * (len(text) - 200) // PROMPTS for i in range(PROMPTS)]
    prompts = [list(text[s:s + PROMPT_LEN]) for s in starts]

    collect(target, [Prompt(p) for p in prompts], str(tmp_path / "trajectories"),
            CollectSettings(block_size=BLOCK, max_new_tokens=MAX_NEW, drop_repetitive=True), batch_size=16,
            progress=False)
    train(target_dir, str(tmp_path / "trajectories"), str(tmp_path / "cllm"),
          TrainConfig(lr=1e-3, batch_size=8, max_steps=150, warmup=15, save_every=1000), progress=False)
    cllm = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "cllm")).eval()

    target_answers, target_speed = _decode(target, prompts)
    cllm_answers, cllm_speed = _decode(cllm, prompts)
    agreement = sum(sum(a == b for a, b in zip(t, c)) / len(t)
                    for t, c in zip(target_answers, cllm_answers)) / PROMPTS
    identical = sum(t == c for t, c in zip(target_answers, cllm_answers)) / PROMPTS
    print(f"\ntokens per forward: target {target_speed:.2f}, CLLM {cllm_speed:.2f} "
          f"(x{cllm_speed / target_speed:.2f}); answer agreement {agreement:.3f} per position, "
          f"{identical:.0%} identical")
    assert cllm_speed >= 1.5 * target_speed
    assert agreement >= 0.6
