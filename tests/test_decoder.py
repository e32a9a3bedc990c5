"""The step-wise Decoder: rows that join a running batch or leave early decode exactly as alone (float64)."""

import pytest
import torch

from cllm_rt.runtime.decoding import Decoder, RowsFailed
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
        for prompt, budget, message in (([1, 500], 4, "token ids in"), ([], 4, "non-empty"),
                                        ([1, 2], 0, "max_new_tokens")):
            with pytest.raises(RowsFailed) as failed:
                decoder.add([prompt], [budget], [0])
            assert list(failed.value.errors) == [0] and isinstance(failed.value.errors[0], ValueError)
            assert message in str(failed.value.errors[0]) and not decoder.rows


def _run(decoder, outputs, failures, joining=None):
    """Step ``decoder`` until no row is left (adding ``joining`` = (prompts, budgets, handles) first), as a
    server does: a failure is noted and the batch goes on."""
    try:
        if joining:
            decoder.add(*joining)
    except RowsFailed as failed:
        failures.update(failed.errors)
    while decoder.rows:
        for handle, new, _ in decoder.emit():
            outputs[handle] += new
        try:
            decoder.decode()
        except RowsFailed as failed:
            failures.update(failed.errors)


def _prompts(lengths, seed=0):
    ids, mask = random_prompts(len(lengths), lengths, seed=seed)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def test_each_row_is_checked_against_the_context_on_its_own():
    model = tiny_model("llama")
    model.config.max_position_embeddings = 40
    # 30 + 8 and 6 + 30 fit; max(prompt) + max(max_new_tokens) = 60 would not; 6 + 40 does not
    prompts, budgets = _prompts([30, 6, 6]), [8, 30, 40]
    outputs, failures = {i: [] for i in range(3)}, {}
    with torch.inference_mode(), Decoder(model, corpus=Corpus()) as decoder:
        _run(decoder, outputs, failures, (prompts, budgets, [0, 1, 2]))
    assert list(failures) == [2] and "exceeds the model's max_position_embeddings (40)" in str(failures[2])
    for i in (0, 1):
        assert outputs[i] == _alone(model, prompts[i], budgets[i])


class _Fault:
    """A hook on the first decoder layer: at its ``call``-th forward (1: the prefill) it makes ``row`` NaN, or
    raises ``error`` when the forward's length is ``length``."""

    def __init__(self, model, call=None, row=None, error=None, length=None):
        self.calls, self.call, self.row, self.error, self.length = 0, call, row, error, length
        self.handle = model.model.layers[0].register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if self.error is not None and hidden.shape[1] == self.length:
            raise self.error
        if self.calls == self.call:
            hidden[self.row] = float("nan")
        return output


@pytest.mark.parametrize("drafts", ["auto", None])
@pytest.mark.parametrize("call", [1, 3], ids=["prefill", "decode"])
def test_nan_in_one_row_fails_that_row_only(drafts, call):
    model = tiny_model("llama")
    prompts = _prompts([5, 9, 3])
    outputs, failures = {h: [] for h in (10, 11, 12)}, {}
    fault = _Fault(model, call=call, row=1)
    with torch.inference_mode(), Decoder(model, drafts=drafts, corpus=Corpus()) as decoder:
        _run(decoder, outputs, failures, (prompts, [MAX_NEW] * 3, [10, 11, 12]))
    fault.handle.remove()
    assert list(failures) == [11] and isinstance(failures[11], FloatingPointError)
    assert outputs[11] == ([] if call == 1 else _alone(model, prompts[1], MAX_NEW)[:len(outputs[11])])
    for handle, i in ((10, 0), (12, 2)):
        assert outputs[handle] == _alone(model, prompts[i], MAX_NEW)


def test_a_prefill_that_raises_is_retried_row_by_row_and_a_raising_decode_sheds_one_row():
    model = tiny_model("llama")
    prompts = _prompts([5, 11, 3])  # the group's prefill and row 1's alone are 11 tokens long
    outputs, failures = {i: [] for i in range(3)}, {}
    fault = _Fault(model, error=torch.OutOfMemoryError("out of memory (simulated)"), length=11)
    with torch.inference_mode(), Decoder(model, drafts=None, block_size=4, corpus=Corpus()) as decoder:
        _run(decoder, outputs, failures, (prompts, [MAX_NEW] * 3, [0, 1, 2]))
    fault.handle.remove()
    assert list(failures) == [1] and isinstance(failures[1], torch.OutOfMemoryError) and outputs[1] == []
    for i in (0, 2):
        assert outputs[i] == _alone(model, prompts[i], MAX_NEW)

    outputs, failures = {i: [] for i in range(3)}, {}
    fault = _Fault(model, length=4)  # a decode forward of blocks of 4
    with torch.inference_mode(), Decoder(model, drafts=None, block_size=4, corpus=Corpus()) as decoder:
        decoder.add(prompts, [MAX_NEW] * 3, [0, 1, 2])
        for handle, new, _ in decoder.emit():
            outputs[handle] += new
        fault.error = torch.OutOfMemoryError("out of memory (simulated)")
        with pytest.raises(RowsFailed) as failed:
            decoder.decode()  # one forward raises: the longest row (1) leaves, nothing else changes
        fault.error = None
        assert list(failed.value.errors) == [1] and [row.index for row in decoder.rows] == [0, 2]
        _run(decoder, outputs, failures)
    fault.handle.remove()
    assert not failures and outputs[1] == _alone(model, prompts[1], 1)
    for i in (0, 2):
        assert outputs[i] == _alone(model, prompts[i], MAX_NEW)


def test_each_row_drafts_from_and_feeds_its_own_corpus():
    model = tiny_model("llama")
    ids, mask = random_prompts(2, [6, 4], seed=7)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    answers = [_alone(model, p, MAX_NEW) for p in prompts]
    mine, theirs = Corpus(), Corpus()
    mine.add(prompts[0] + answers[0])  # row 0's own answer: long corpus drafts for row 0 only
    outputs = {0: [], 1: []}
    with torch.inference_mode(), Decoder(model, drafts=("corpus",), corpus=Corpus()) as decoder:
        decoder.add(prompts, [MAX_NEW, MAX_NEW], [0, 1], corpora=[mine, theirs])
        while decoder.rows:
            for handle, new, _ in decoder.emit():
                outputs[handle] += new
            decoder.decode()
        for handle, new, _ in decoder.emit():
            outputs[handle] += new
        assert len(decoder.corpus) == 0  # the Decoder's own corpus saw neither answer
    assert [outputs[0], outputs[1]] == answers
    assert len(theirs) == len(prompts[1]) + MAX_NEW  # row 1's answer went to its corpus, row 0's did not
    assert len(mine) == 2 * (len(prompts[0]) + MAX_NEW)
