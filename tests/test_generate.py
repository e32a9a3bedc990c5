"""Exactness: greedy Jacobi decoding must equal model.generate(do_sample=False) token for token.

Everything runs in float64, where rounding cannot flip an argmax, so any difference is a real bug.
"""

import functools

import pytest
import torch
import transformers

import cllm_rt
import tiny_models
from tiny_models import CONFIGS, random_prompts, tiny_model

ARCHS = sorted(CONFIGS)
BLOCK_SIZES = [1, 2, 5, 16, 32]
PROMPT_LENGTHS = {"single": [7], "ragged": [5, 1, 9], "length_one": [1]}
MAX_NEW = 37  # not a multiple of any block size above 1


@functools.lru_cache(maxsize=None)
def _model(arch):
    return tiny_model(arch)


@functools.lru_cache(maxsize=None)
def _hf_reference(arch, batch_case, max_new_tokens=MAX_NEW, eos=None):
    ids, mask = random_prompts(len(PROMPT_LENGTHS[batch_case]), PROMPT_LENGTHS[batch_case])
    out = _model(arch).generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=eos, pad_token_id=0)
    return ids, mask, out


@pytest.mark.parametrize("drafts", ["auto", None])
@pytest.mark.parametrize("batch_case", sorted(PROMPT_LENGTHS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hf_generate(arch, block_size, batch_case, drafts):
    ids, mask, expected = _hf_reference(arch, batch_case)
    out = cllm_rt.generate(_model(arch), ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                           pad_token_id=0, drafts=drafts)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.stats.new_tokens == [MAX_NEW] * ids.shape[0]
    assert 1.0 <= out.stats.tokens_per_forward <= (block_size if drafts is None else 64)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eos_mid_block_rows_finish_independently(arch, block_size):
    ids, mask, free_run = _hf_reference(arch, "ragged")
    # an EOS that row 0 produces after a few tokens, inside the first blocks; other rows stop elsewhere or never
    eos = int(free_run[0, ids.shape[1] + 6])
    _, _, expected = _hf_reference(arch, "ragged", eos=eos)
    out = cllm_rt.generate(_model(arch), ids, mask, max_new_tokens=MAX_NEW, block_size=block_size,
                           eos_token_id=eos, pad_token_id=0)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.stats.new_tokens[0] <= 7
    assert out.sequences[0, ids.shape[1] + out.stats.new_tokens[0] - 1] == eos
    # the finished row left the batch: fewer row-steps than forwards x rows
    assert sum(out.stats.accepted_histogram) < out.stats.forward_passes * ids.shape[0]


def test_eos_from_generation_config():
    model = tiny_model("llama")
    ids, mask, free_run = _hf_reference("llama", "single")
    model.generation_config.eos_token_id = int(free_run[0, ids.shape[1] + 10])
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=8)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.sequences.shape[1] < ids.shape[1] + MAX_NEW


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_eos_given_as_none_disables_the_configs_eos_as_in_hf(arch):
    """``eos_token_id`` absent: stop at the generation config's EOS; given as None: never stop (HF 5.24)."""
    model = tiny_model(arch)
    ids, mask, free_run = _hf_reference(arch, "ragged")
    model.generation_config.eos_token_id = int(free_run[0, ids.shape[1] + 4])  # a token row 0 emits
    for spelling in ({}, {"eos_token_id": None}):
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                                  pad_token_id=0, **spelling)
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=8, pad_token_id=0, **spelling)
        torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
        assert (out.sequences.shape[1] < ids.shape[1] + MAX_NEW) == (spelling == {})


def test_pad_absent_or_none_as_in_hf():
    """Absent: the config's pad id (7); None: HF falls back on the EOS. Row 0 ends early, so it is padded."""
    model = tiny_model("llama")
    ids, mask, free_run = _hf_reference("llama", "ragged")
    eos = int(free_run[0, ids.shape[1] + 4])
    model.generation_config.pad_token_id = 7
    for spelling, pad in (({}, 7), ({"pad_token_id": None}, eos)):
        expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW,
                                  eos_token_id=eos, **spelling)
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=8, eos_token_id=eos, **spelling)
        torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
        assert out.sequences[0, -1] == pad


def test_greedy_generation_config_decodes_the_plain_argmax():
    from cllm_rt.runtime.inputs import greedy_generation_config

    model = tiny_model("llama")
    ids, mask, expected = _hf_reference("llama", "single")
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=8,
                           generation_config=greedy_generation_config(model.generation_config))
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert model.generation_config.repetition_penalty == 1.3  # the model's own config is untouched


def test_beam_search_config_warns_that_decoding_is_greedy():
    model = tiny_model("llama")
    ids, mask, expected = _hf_reference("llama", "single")
    model.generation_config.num_beams = 2  # (do_sample in the config samples: tests/test_sampling.py)
    with pytest.warns(UserWarning, match="decodes greedily"):
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=8)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def test_max_new_tokens_one_is_prefill_only():
    ids, mask, _ = _hf_reference("llama", "ragged")
    expected = _model("llama").generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1,
                                        pad_token_id=0)
    out = cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=1, block_size=16)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.stats.forward_passes == 0


@pytest.mark.parametrize("drafts", ["auto", None])
def test_autoregressive_stats_and_jacobi_never_needs_more_forwards(drafts):
    ids, mask, _ = _hf_reference("llama", "single")
    ar = cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=MAX_NEW, block_size=1, drafts=None)
    assert ar.stats.tokens_per_forward == 1.0 and ar.stats.budgets == {1: MAX_NEW - 1}
    assert ar.stats.forward_passes == MAX_NEW - 1  # the first token comes from the prefill
    jacobi = cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=MAX_NEW, block_size=16, drafts=drafts)
    assert jacobi.stats.forward_passes <= ar.stats.forward_passes
    assert sum(k * c for k, c in enumerate(jacobi.stats.accepted_histogram)) == MAX_NEW - 1


def test_seed_changes_guesses_not_output():
    ids, mask, expected = _hf_reference("qwen2", "ragged")
    for seed in (1, 2):
        out = cllm_rt.generate(_model("qwen2"), ids, mask, max_new_tokens=MAX_NEW, block_size=8, seed=seed)
        torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def test_no_attention_mask_means_no_padding():
    ids, _, _ = _hf_reference("llama", "single")
    expected = _model("llama").generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
    out = cllm_rt.generate(_model("llama"), ids, max_new_tokens=12, block_size=4)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def test_float32_model_runs_and_restores_attention_implementation():
    model = tiny_model("llama", dtype=torch.float32)
    before = model.config._attn_implementation
    ids, mask = random_prompts(2, [4, 6])
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=10, block_size=4)
    assert out.sequences.shape == (2, 16)
    assert model.config._attn_implementation == before


class _CollectingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_every_token_once():
    ids, mask, expected = _hf_reference("llama", "single")
    streamer = _CollectingStreamer()
    cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=MAX_NEW, block_size=6, streamer=streamer)
    assert streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == expected[0, ids.shape[1]:].tolist()
    assert streamer.ended


def test_works_with_transformers_text_streamer(capsys):
    from transformers import TextStreamer

    class _DigitsTokenizer:  # the smallest tokenizer TextStreamer accepts
        def decode(self, ids, **kwargs):
            return " ".join(str(i) for i in ids)

    ids, mask, expected = _hf_reference("llama", "single")
    cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=MAX_NEW, block_size=6,
                     streamer=TextStreamer(_DigitsTokenizer(), skip_prompt=True))
    printed = capsys.readouterr().out.split()
    assert printed == [str(t) for t in expected[0, ids.shape[1]:].tolist()]


# ---------------------------------------------------------------- bad input: clear errors, never garbage

def test_rejects_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        cllm_rt.generate(_model("llama"), torch.zeros(1, 0, dtype=torch.long), max_new_tokens=4)
    ids, mask = random_prompts(2, [3, 2])
    mask[1] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_rejects_bad_block_size(block_size):
    ids, mask = random_prompts(1, [3])
    with pytest.raises(ValueError, match="block_size"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4, block_size=block_size)


def test_rejects_bad_max_new_tokens():
    ids, mask = random_prompts(1, [3])
    with pytest.raises(ValueError, match="max_new_tokens"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=0)


def test_rejects_sequences_beyond_model_positions():
    ids, mask = random_prompts(1, [200])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=57)


def test_rejects_right_padding_and_bad_shapes():
    ids, mask = random_prompts(2, [3, 5])
    with pytest.raises(ValueError, match="left padding"):
        cllm_rt.generate(_model("llama"), ids, mask.flip(1), max_new_tokens=4)
    with pytest.raises(ValueError, match="input_ids"):
        cllm_rt.generate(_model("llama"), ids[0], max_new_tokens=4)
    with pytest.raises(TypeError, match="integer"):
        cllm_rt.generate(_model("llama"), ids.float(), max_new_tokens=4)
    with pytest.raises(ValueError, match="attention_mask shape"):
        cllm_rt.generate(_model("llama"), ids, mask[:, 1:], max_new_tokens=4)


def test_rejects_lists_and_token_ids_outside_the_vocabulary():
    with pytest.raises(TypeError, match="torch.LongTensor"):
        cllm_rt.generate(_model("llama"), [[1, 2, 3]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"token ids in \[0, 101\).*\[1, 101\]"):
        cllm_rt.generate(_model("llama"), torch.tensor([[1, 101, 3]]), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        cllm_rt.generate(_model("llama"), torch.tensor([[1, -1, 3]]), max_new_tokens=4)


def test_rejects_unsupported_architecture():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="gpt2"):
        cllm_rt.generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)


def test_rejects_sequences_beyond_sliding_window():
    import transformers

    torch.manual_seed(0)
    config = transformers.MistralConfig(**{**tiny_model("mistral").config.to_dict(), "sliding_window": 16})
    model = transformers.MistralForCausalLM(config).double().eval()
    with pytest.raises(NotImplementedError, match="sliding window"):
        cllm_rt.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=20)


def test_rejects_streamer_with_batch():
    ids, mask = random_prompts(2, [3, 5])
    with pytest.raises(ValueError, match="batch size 1"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4, streamer=_CollectingStreamer())


def test_rejects_logits_processors_that_change_greedy():
    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        cllm_rt.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4)


def test_nan_model_output_raises():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN"):
        cllm_rt.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4)


def test_reference_ops_give_the_same_output():
    ids, mask, expected = _hf_reference("llama", "ragged")
    cllm_rt.ops.use_native_kernels(False)
    try:
        out = cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=MAX_NEW, block_size=16)
    finally:
        cllm_rt.ops.use_native_kernels(True)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def _longrope_phi3():
    half = 32 // 4 // 2  # hidden size / heads / 2: one factor per rotated pair
    config = transformers.Phi3Config(**{**tiny_models._COMMON, "max_position_embeddings": 128},
                                     original_max_position_embeddings=32,
                                     rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * half,
                                                   "long_factor": [4.0] * half})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    return model


def test_rope_whose_frequencies_follow_the_forward_is_refused(monkeypatch):
    model = _longrope_phi3()
    ids, mask = random_prompts(2, [26, 20], seed=1)  # 26 + 20 crosses original_max_position_embeddings = 32
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="rope_type='longrope' exactly: its frequencies depend on"):
        cllm_rt.generate(model, ids, mask, max_new_tokens=20)
    dynamic = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**tiny_models._COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(NotImplementedError, match="rope_type='dynamic'"):
        cllm_rt.generate(dynamic, ids, mask, max_new_tokens=4)
    # why: decoded anyway, draft nodes past position 32 switch the whole forward to the long factors early
    monkeypatch.setattr(cllm_rt.runtime.inputs, "_position_dependent_rope", lambda config: None)
    for drafts in ("auto", None):
        out = cllm_rt.generate(model, ids, mask, max_new_tokens=20, drafts=drafts).sequences
        assert not torch.equal(out, expected)
