"""The step-wise Decoder: rows that join a running batch or leave early decode exactly as alone (float64)."""

import pytest
import torch

from cllm_rt.runtime.decoding import Decoder
from cllm_rt.runtime.drafts import Corpus
from tiny_models import random_prompts, tiny_model

MAX_NEW = 23


def _alone(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("drafts", ["auto", None])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rows_joining_between_steps_decode_as_alone(arch, drafts):
    model = tiny_model(arch)
    ids, mask = random_prompts(4, [5, 9, 2, 14], seed=3)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    budgets = [MAX_NEW, 7, MAX_NEW, 12]
    outputs = {i: [] for i in range(4)}
    finished = set()
    with torch.inference_mode(), Decoder(model, drafts=drafts, corpus=Corpus()) as decoder:
        decoder.add(prompts[:1], budgets[:1], [0])
        for step in range(200):
            if step == 2:
                decoder.add(prompts[1:3], budgets[1:3], [1, 2])  # join a running batch (its cache grows)
            if step == 5:
                decoder.add(prompts[3:], budgets[3:], [3])
            for handle, new, done in decoder.emit():
                outputs[handle] += new
                if done:
                    finished.add(handle)
            decoder.decode()
            if step > 5 and not decoder.rows:
                break
    assert finished == {0, 1, 2, 3}
    for i, prompt in enumerate(prompts):
        assert outputs[i] == _alone(model, prompt, budgets[i])


def test_a_removed_row_stops_and_the_others_continue():
    model = tiny_model("llama")
    ids, mask = random_prompts(2, [6, 4])
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    outputs = {0: [], 1: []}
    with torch.inference_mode(), Decoder(model, corpus=Corpus()) as decoder:
        decoder.add(prompts, [MAX_NEW, MAX_NEW], [0, 1])
        for _ in range(3):
            for handle, new, _ in decoder.emit():
                outputs[handle] += new
            decoder.decode()
        decoder.remove(0)
        while decoder.rows:
            for handle, new, _ in decoder.emit():
                outputs[handle] += new
            decoder.decode()
    assert 0 < len(outputs[0]) < MAX_NEW and outputs[0] == _alone(model, prompts[0], MAX_NEW)[:len(outputs[0])]
    assert outputs[1] == _alone(model, prompts[1], MAX_NEW)


def test_a_first_token_is_emitted_after_the_prefill_without_a_forward():
    model = tiny_model("llama")
    ids, mask = random_prompts(2, [6, 4])
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    first = [(i, _alone(model, p, 1)) for i, p in enumerate(prompts)]
    with torch.inference_mode(), Decoder(model, corpus=Corpus()) as decoder:
        decoder.add(prompts, [MAX_NEW, MAX_NEW], [0, 1])
        events = decoder.emit()
        assert decoder.stats.forward_passes == 0
        assert [(h, new) for h, new, _ in events] == first
        assert decoder.emit() == [(0, [], False), (1, [], False)]  # nothing new until a forward
        decoder.decode()
        assert decoder.stats.forward_passes == 1 and all(new for _, new, _ in decoder.emit())


def test_decoder_outside_its_context_and_bad_prompts_are_refused():
    model = tiny_model("llama")
    decoder = Decoder(model)
    with pytest.raises(RuntimeError, match="context manager"):
        decoder.add([[1, 2]], [4], [0])
    with Decoder(model) as decoder:
        with pytest.raises(ValueError, match="token ids in"):
            decoder.add([[1, 500]], [4], [0])
        with pytest.raises(ValueError, match="non-empty"):
            decoder.add([[]], [4], [0])
        with pytest.raises(ValueError, match="max_new_tokens"):
            decoder.add([[1, 2]], [0], [0])
