"""``model.generate(custom_generate=...)`` through both forms equals plain greedy ``model.generate`` (float64)."""

import pytest
import torch
from transformers import GenerationConfig, MaxLengthCriteria, StoppingCriteria, StoppingCriteriaList, StopStringCriteria
from transformers.generation import GenerateDecoderOnlyOutput

import cllm_rt
import cllm_rt.hf as hf
from tiny_models import random_prompts, tiny_model
from training_fixtures import EOS, PAD, byte_tokenizer, tiny_lm

MAX_NEW = 24
FORMS = {
    "callable": dict(custom_generate=hf.generate),
    "directory": dict(custom_generate=hf.CUSTOM_GENERATE_DIR, trust_remote_code=True),
}


class Recorder:
    """A streamer that keeps what it was given."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


@pytest.fixture(scope="module")
def byte_lm():
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    return tiny_lm(dtype=torch.float64), tokenizer


def _stop_strings(new_tokens: list[list[int]]) -> list[str]:
    """One stop string per row: the first printable ASCII character after a few tokens, and the next one if
    it is printable too, so every row stops early."""
    strings = []
    for row in new_tokens:
        at = next((i for i in range(3, len(row) - 1) if 32 < row[i] < 127), None)
        assert at is not None, "the reference has no printable byte to stop at; pick other prompts"
        strings.append(bytes(row[at:at + 2] if 32 < row[at + 1] < 127 else row[at:at + 1]).decode())
    return strings


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("lengths", [[7], [5, 9, 2]], ids=["batch1", "ragged"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_both_forms_equal_greedy_generate(arch, lengths, form):
    model = tiny_model(arch)
    ids, mask = random_prompts(len(lengths), lengths, seed=1)
    reference = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, block_size=4, **FORMS[form])
    assert torch.equal(out, reference)


@pytest.mark.parametrize("form", FORMS)
def test_eos_pads_finished_rows_as_generate_does(form):
    model = tiny_model("llama")
    ids, mask = random_prompts(3, [5, 9, 2], seed=2)
    plain = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    eos = int(plain[0, ids.shape[1] + 6])  # row 0 stops at its 7th token, the others when they meet it
    reference = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos, **FORMS[form])
    assert torch.equal(out, reference) and (out[0, ids.shape[1] + 7:] == 0).all()


@pytest.mark.parametrize("form", FORMS)
def test_max_length_and_return_dict(form):
    model = tiny_model("qwen3")
    ids, mask = random_prompts(2, [6, 3], seed=4)
    reference = model.generate(ids, attention_mask=mask, do_sample=False, max_length=ids.shape[1] + 9,
                               return_dict_in_generate=True)
    out = model.generate(ids, attention_mask=mask, max_length=ids.shape[1] + 9, return_dict_in_generate=True,
                         **FORMS[form])
    assert isinstance(out, GenerateDecoderOnlyOutput) and torch.equal(out.sequences, reference.sequences)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("eos", [None, EOS], ids=["no-eos", "eos"])
def test_stop_strings_in_a_ragged_batch(byte_lm, eos, form):
    """Without an EOS criterion HF keeps appending greedy tokens to rows that stopped, with one it pads them."""
    model, tokenizer = byte_lm
    batch = tokenizer(["Hello there", "ab", "The quick brown fox"], return_tensors="pt", padding=True)
    length = batch.input_ids.shape[1]
    plain = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
    stops = _stop_strings(plain[:, length:].tolist())
    reference = model.generate(**batch, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                               pad_token_id=PAD, stop_strings=stops, tokenizer=tokenizer)
    assert reference.shape[1] < length + MAX_NEW
    # transformers 5.24 drops `tokenizer` before calling a callable, so the callable gets the criterion itself
    stopping = (dict(stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, stops)]))
                if form == "callable" else dict(stop_strings=stops, tokenizer=tokenizer))
    out = model.generate(**batch, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, block_size=8,
                         **stopping, **FORMS[form])
    assert torch.equal(out, reference)


@pytest.mark.parametrize("form", FORMS)
def test_streamer_gets_what_generate_streams(byte_lm, form):
    model, tokenizer = byte_lm
    ids = tokenizer(["Hello there"], return_tensors="pt").input_ids
    plain = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW)
    stops = _stop_strings(plain[:, ids.shape[1]:].tolist())
    expected = Recorder()
    reference = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, stop_strings=stops,
                               tokenizer=tokenizer, streamer=expected)
    assert reference.shape[1] < ids.shape[1] + MAX_NEW
    stopping = (dict(stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, stops)]))
                if form == "callable" else dict(stop_strings=stops, tokenizer=tokenizer))
    got = Recorder()
    out = model.generate(ids, max_new_tokens=MAX_NEW, streamer=got, **stopping, **FORMS[form])
    assert torch.equal(out, reference)
    assert got.puts == expected.puts and got.ended and expected.ended


def test_a_stop_inside_an_accepted_path_cuts_at_that_token(byte_lm):
    """Several tokens made final in one forward: the row ends at the token completing the stop string."""
    _, tokenizer = byte_lm
    prompt = torch.tensor([[PAD, 72, 105]])  # left pad, then "Hi"
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer, ["cd"])])
    criteria.append(MaxLengthCriteria(max_length=prompt.shape[1] + 10))
    config = GenerationConfig()
    config._pad_token_tensor = torch.tensor(PAD)
    rows = hf._Rows(prompt, criteria, config)
    assert not rows.pad_after_stop and rows.budget == 10
    assert rows.take(0, list(b"abcdef")) == list(b"abcd") and rows.stopped == [4]
    assert rows.done() == [0]  # no EOS criterion: its greedy tokens past the stop stay, up to the longest row
    assert rows.sequences().tolist() == [[PAD, 72, 105, *b"abcd"]]


@pytest.mark.parametrize("settings, message", [
    (dict(num_beams=2), "decodes greedily"),
    (dict(repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
    (dict(do_sample=True, repetition_penalty=1.3), "RepetitionPenaltyLogitsProcessor"),
    (dict(max_time=5.0), "not MaxTimeCriteria"),
    (dict(return_dict_in_generate=True, output_scores=True), "cannot provide output_scores"),
    (dict(stopping_criteria=StoppingCriteriaList([type("Custom", (StoppingCriteria,), {})()])), "not Custom"),
    (dict(streamer=Recorder()), "batch size 1"),
])
def test_what_it_cannot_do_exactly_is_refused(settings, message):
    model = tiny_model("llama")
    ids, mask = random_prompts(2, [4, 3])
    with pytest.raises((NotImplementedError, ValueError), match=message):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=hf.generate, **settings)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_sampling_gives_cllm_rt_generates_seeded_tokens(form):
    model = tiny_model("llama")
    ids, mask = random_prompts(2, [4, 7])
    settings = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95)
    ours = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, seed=3, **settings)
    through_hf = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, seed=3, **settings, **FORMS[form])
    assert torch.equal(through_hf, ours.sequences)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False)
    assert not torch.equal(through_hf, greedy)


def test_misuse_gets_one_line_errors():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(TypeError, match="custom_generate=cllm_rt.hf.generate"):
        hf.generate(model, ids)
    with pytest.raises(ValueError, match="trust_remote_code"):  # transformers' own gate for a local directory
        model.generate(ids, max_new_tokens=4, custom_generate=hf.CUSTOM_GENERATE_DIR, trust_remote_code=False)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, max_new_tokens=4, stop_strings=["x"], **FORMS["directory"])
