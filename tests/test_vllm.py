"""cllm_rt.vllm.Proposer: its unit behaviour on inputs shaped like vLLM's (no vLLM needed), then, where vLLM is
importable (its CPU build, in its own venv: README "cllm_rt inside vLLM"), greedy outputs with the proposer equal
vLLM's own without speculation on a tiny random llama."""

import types

import numpy as np
import pytest

import cllm_rt.vllm
from cllm_rt.runtime.drafts import AcceptanceStats
from cllm_rt.vllm import CORPUS_ENV, Proposer


def _config(num_speculative_tokens=4, max_model_len=64):
    return types.SimpleNamespace(speculative_config=types.SimpleNamespace(num_speculative_tokens=num_speculative_tokens),
                                 model_config=types.SimpleNamespace(max_model_len=max_model_len))


class StepClock:
    """What the proposer reads as ``time.perf_counter`` (the ``clock`` fixture): FakeBatch's steps advance it.
    The proposer learns the step cost from the time between its calls, so with the real clock the drafts it
    chooses would follow this machine's load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = StepClock()
    monkeypatch.setattr(cllm_rt.vllm, "time", clock)
    return clock


class FakeBatch:
    """vLLM's view of a running batch: slot i holds a request whose greedy continuation is ``targets[i]``.

    As vLLM's runner does, each step verifies the slot's drafts (the longest prefix equal to the target's
    tokens, plus the target's next token), appends what it made final to ``token_ids_cpu`` and passes that
    to the proposer as ``sampled_token_ids``. A step takes 10 ms plus 1 ms a token verified on ``clock``.
    """

    def __init__(self, prompts, targets, clock, max_model_len=64):
        self.clock = clock
        self.targets = [list(t) for t in targets]
        self.token_ids_cpu = np.zeros((len(prompts), max_model_len), dtype=np.int32)
        self.num_tokens_no_spec = np.zeros(len(prompts), dtype=np.int32)
        self.made = [0] * len(prompts)  # target tokens made final per slot
        self.accepted = 0
        for slot, prompt in enumerate(prompts):
            self.place(slot, prompt)

    def place(self, slot, prompt, target=None):
        """A new request in ``slot`` (vLLM reuses a finished request's slot)."""
        self.token_ids_cpu[slot, :len(prompt)] = prompt
        self.num_tokens_no_spec[slot] = len(prompt)
        self.made[slot] = 0
        if target is not None:
            self.targets[slot] = list(target)

    def step(self, drafts):
        self.clock.now += 0.010 + 0.001 * sum(1 + len(draft) for draft in drafts)
        sampled = []
        for slot, draft in enumerate(drafts):
            want = self.targets[slot][self.made[slot]:]
            accepted = 0
            while accepted < len(draft) and accepted < len(want) - 1 and draft[accepted] == want[accepted]:
                accepted += 1
            new = want[:accepted + 1]
            self.accepted += accepted
            n = self.num_tokens_no_spec[slot]
            self.token_ids_cpu[slot, n:n + len(new)] = new
            self.num_tokens_no_spec[slot] += len(new)
            self.made[slot] += len(new)
            sampled.append(new)
        return sampled

    def run(self, proposer, first_sampled):
        """Steps until every slot made its target, then one more call; returns the number of steps."""
        sampled, steps = first_sampled, 0
        while any(m < len(t) for m, t in zip(self.made, self.targets)):
            drafts = proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu)
            assert len(drafts) == len(sampled)
            sampled = self.step(drafts)
            steps += 1
        proposer.propose(sampled, self.num_tokens_no_spec, self.token_ids_cpu)  # so it sees the last step too
        return steps


def _text(batch, slot):
    return batch.token_ids_cpu[slot, :batch.num_tokens_no_spec[slot]].tolist()


# ---------------------------------------------------------------- without vLLM

def test_drafts_continue_the_requests_own_context_and_skip_slots_not_decoding():
    proposer = Proposer(_config(num_speculative_tokens=3))
    tokens = np.zeros((2, 64), dtype=np.int32)
    tokens[0, :8] = [5, 6, 7, 8, 9, 1, 5, 6]  # "5 6" occurred before, followed by 7 8 9
    drafts = proposer.propose([[6], []], np.array([8, 4]), tokens)
    assert drafts[1] == []  # a prefilling slot (no sampled tokens): vLLM drafts nothing for it
    assert drafts[0] and drafts[0] == [7, 8, 9][:len(drafts[0])]


def test_acceptance_is_learnt_from_the_next_calls_sampled_tokens(clock):
    # the target repeats its prompt: context drafts are right, and every accepted one must be counted
    prompt = [3, 4, 5, 6, 7, 8, 9, 10]
    batch = FakeBatch([prompt], [prompt * 4], clock)
    proposer = Proposer(_config())
    steps = batch.run(proposer, [[prompt[-1]]])
    assert _text(batch, 0) == prompt + prompt * 4
    assert batch.accepted > 0 and proposer.accepted_tokens == batch.accepted
    assert steps < len(prompt) * 4  # drafts made several tokens final per step
    fresh = AcceptanceStats()
    assert proposer.acceptance.calibration("context", 4, 1) > fresh.calibration("context", 4, 1)


def test_rejected_drafts_lower_the_calibration_until_drafting_stops(clock):
    # the context suggests 1 2 3 again, the target never follows it: drafts shrink to nothing
    prompt = [1, 2, 3, 9, 1, 2, 3, 9, 1, 2]
    batch = FakeBatch([prompt], [[50 + i for i in range(40)]], clock)
    proposer = Proposer(_config())
    batch.run(proposer, [[prompt[-1]]])
    fresh = AcceptanceStats()
    assert batch.accepted == proposer.accepted_tokens == 0
    learnt = min(proposer.acceptance.calibration("context", matched, 1) for matched in range(1, 5))
    assert learnt < fresh.calibration("context", 1, 1)
    proposed_before = proposer.proposed_tokens
    batch.place(0, prompt, [60 + i for i in range(20)])  # the same misleading context, learnt from
    batch.run(proposer, [[prompt[-1]]])
    assert proposer.proposed_tokens - proposed_before < proposed_before


def test_a_new_request_in_a_slot_is_not_mistaken_for_the_old_one(clock):
    prompt = [3, 4, 5, 6, 3, 4]
    batch = FakeBatch([prompt], [[5, 6, 3, 4]], clock)
    proposer = Proposer(_config())
    batch.run(proposer, [[4]])
    accepted = proposer.accepted_tokens
    # vLLM puts another request of the same length in the slot; its first sampled token is not a draft
    other = [7, 7, 7, 7, 7, 7, 7, 7, 7, 1]
    batch.place(0, other, [2, 2])
    drafts = proposer.propose([[other[-1]]], batch.num_tokens_no_spec, batch.token_ids_cpu)
    assert proposer.accepted_tokens == accepted  # nothing learnt from a request it never drafted for
    assert proposer.requests[0].history.tokens == other
    assert drafts == [[]]  # "1" never occurred before in the new request


@pytest.mark.parametrize("mode", ["shared", "off"])
def test_the_shared_corpus_drafts_from_earlier_requests_and_off_does_not(mode, clock):
    answer = [40, 41, 42, 43, 44, 45, 46, 47]
    batch = FakeBatch([[1, 2, 3]], [answer], clock)
    proposer = Proposer(_config(), corpus=mode)
    batch.run(proposer, [[3]])
    batch.place(0, [9, 9, 8, 40, 41], answer[2:])  # quotes the first answer's start: the corpus knows the rest
    # a batch slot that vLLM compacted away retires its request too; here the request in slot 0 is new
    drafts = proposer.propose([[41]], batch.num_tokens_no_spec, batch.token_ids_cpu)
    if mode == "shared":
        assert drafts[0] and drafts[0] == answer[2:2 + len(drafts[0])]
    else:
        assert drafts == [[]]  # "41" never occurred before in the request itself


def test_draft_length_stays_within_num_speculative_tokens_and_max_model_len():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    tokens = np.zeros((1, 16), dtype=np.int32)
    tokens[0, :len(prompt)] = prompt
    assert len(Proposer(_config(3, 64)).propose([[2]], np.array([11]), tokens)[0]) <= 3
    assert Proposer(_config(8, 13)).propose([[2]], np.array([11]), tokens)[0] == [3]  # room for one more token


def test_a_step_cost_that_grows_with_drafts_shortens_them():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]
    tokens = np.zeros((1, 64), dtype=np.int32)
    tokens[0, :len(prompt)] = prompt
    cheap, dear = Proposer(_config(8)), Proposer(_config(8))
    for size in range(1, 10):
        cheap.cost.observe(size, 1.0)
        dear.cost.observe(size, float(size))  # each token verified costs as much as a whole step
    assert len(cheap.propose([[2]], np.array([11]), tokens)[0]) > len(dear.propose([[2]], np.array([11]), tokens)[0])


def test_bad_corpus_mode_is_a_one_line_error(monkeypatch):
    with pytest.raises(ValueError, match="corpus"):
        Proposer(_config(), corpus="per-tenant")
    monkeypatch.setenv(CORPUS_ENV, "everyone")
    with pytest.raises(ValueError, match=CORPUS_ENV):
        Proposer(_config())
    monkeypatch.setenv(CORPUS_ENV, "shared")
    assert Proposer(_config()).corpus is not None and Proposer(_config(), corpus="off").corpus is None


# ---------------------------------------------------------------- inside vLLM (its CPU build)

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("vllm")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # a wide weight init gives peaked logits: float32 argmax ties are then out of reach (vLLM's CPU backend
    # runs no float64), and the greedy text repeats itself often enough for context drafts to be accepted
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).float().save_pretrained(path)
    return str(path)


def _vllm_generate(model_path, prompts, speculative_config=None):
    """Greedy token ids from an in-process vLLM engine, and its speculative-decoding counters."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=model_path, dtype="float32", enforce_eager=True, max_model_len=256, skip_tokenizer_init=True,
              seed=0, kv_cache_memory_bytes=64 << 20, disable_log_stats=False, max_num_seqs=4,
              speculative_config=speculative_config)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num")}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return [list(o.outputs[0].token_ids) for o in outs], counters


def test_greedy_outputs_with_the_proposer_equal_vllms_without_speculation(tiny_llama, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no spawn guard needed in pytest
    monkeypatch.setenv(CORPUS_ENV, "shared")
    prompts = [[5, 6, 7, 8, 9] * 6, list(range(10, 40)), [100, 101, 102] * 8 + [7, 7], [3] * 12]
    plain, _ = _vllm_generate(tiny_llama, prompts)
    drafted, counters = _vllm_generate(tiny_llama, prompts,
                                       {"model": "cllm_rt.vllm.Proposer", "num_speculative_tokens": 4})
    assert drafted == plain
    assert counters["vllm:spec_decode_num_draft_tokens"] > 0
    assert counters["vllm:spec_decode_num_accepted_tokens"] > 0  # the comparison exercised accepted drafts
