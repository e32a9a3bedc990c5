"""Seeded Gumbel-max sampling: the noise generator, the op against its reference and the true softmax, and
token identity with one-token-at-a-time sampling on every decoding path (float64)."""

import functools

import pytest
import torch

import cllm_rt
from cllm_rt import draft_head, ops
from cllm_rt.runtime.decoding import Decoder
from cllm_rt.runtime.drafts import SOURCES, Corpus
from cllm_rt.runtime.sampling import SamplingParams, batch_sampling
from tiny_models import random_prompts, tiny_model

MAX_NEW = 23
native = pytest.mark.skipif(not ops.native_available(), reason="needs the compiled extension")


@functools.lru_cache(maxsize=None)
def _model(arch="llama"):
    return tiny_model(arch)


def _model_with_a_random_head():
    """A new model each call: decoding learns per model how often a source's guesses are accepted, and a random
    head's rarely are, so on a model shared with earlier tests the trees would soon leave its guesses out."""
    model = tiny_model("llama")
    torch.manual_seed(3)  # random weights: its guesses are often wrong, which the sampled path must not show
    proposer = draft_head.DraftHead(model.config.hidden_size, depth=3).to(model.dtype)
    with torch.no_grad():
        for p in proposer.parameters():
            p.normal_(0.0, 0.5)
    draft_head.attach(model, proposer)
    return model


def _one_token_sampler(model, prompt, params, max_new_tokens):
    """The specification: a full forward over the whole sequence per token, the reference masks and noise."""
    ids = list(prompt)
    sampling = batch_sampling([params], "cpu")
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[:, -1:]
            logits = logits.masked_fill(ops.sampling_mask(logits, sampling), float("-inf"))
            ids.append(int(ops.gumbel_argmax_reference(logits, sampling.seeds, torch.tensor([[len(ids)]]),
                                                       sampling.temperature)))
    return ids[len(prompt):]


def _streams(B, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(-2**62, 2**62, (B,), generator=g)
    return seeds, torch.randint(0, 10**6, (B, n), generator=g)


@native
def test_kernel_uniforms_equal_the_torch_reference_bit_for_bit():
    seeds, positions = _streams(5, 7)
    seeds[0], seeds[1] = 0, -1  # the extremes of the uint64 reinterpretation
    u = torch.ops.cllm_rt.gumbel_uniform(seeds, positions, 3000)
    assert torch.equal(u, ops.gumbel_uniform_reference(seeds, positions, 3000))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005  # 105,000 uniforms: sd of the mean 0.0009


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gumbel_argmax_matches_its_reference_and_is_greedy_at_temperature_zero(dtype):
    seeds, positions = _streams(6, 9, seed=1)
    logits = (torch.randn(6, 9, 1000, dtype=torch.float64) * 3).to(dtype)
    logits[2, :, 500:] = float("-inf")  # a masked row never samples a masked token
    temperature = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.0, 1e-3], dtype=torch.float64)
    tokens = ops.gumbel_argmax(logits, seeds, positions, temperature)
    assert torch.equal(tokens, ops.gumbel_argmax_reference(logits, seeds, positions, temperature))
    greedy, _ = ops.jacobi_verify(logits, positions)
    assert torch.equal(tokens[temperature == 0], greedy[temperature == 0])
    assert bool((tokens[2] < 500).all())
    assert not torch.equal(tokens[3], greedy[3])  # temperature 2 over 1000 tokens: not the argmax everywhere


def test_greedy_batches_take_the_greedy_path_bit_for_bit(monkeypatch):
    hidden, weight = torch.randn(2, 9, 16), torch.randn(50, 16)
    block = torch.randint(0, 50, (2, 9))
    zero = batch_sampling([SamplingParams(temperature=0.0, top_k=3, seed=4), None], "cpu")
    assert zero is None  # no row samples: today's greedy op runs, not a sampling one
    expected = ops.greedy_verify(hidden, weight, None, block)
    monkeypatch.setattr(ops, "gumbel_argmax", None)  # would raise if called
    for got, want in zip(ops.sample_verify(hidden, weight, None, block, zero, block), expected):
        assert torch.equal(got, want)


def _masked_softmax(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The target distribution, written independently of ops.sampling_mask: sort once, then cut."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token], mass = True, mass + float(p[token]) / float(p[order[:top_k or None]].sum())
    q = torch.where(keep, p, 0.0)
    q = torch.where(q >= min_p * q.max(), q, 0.0)
    return q / q.sum()


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit p-value (k - 1 degrees of freedom), as scipy.stats.chisquare
    gives it: the upper regularized incomplete gamma Q(df / 2, statistic / 2), here from torch.special."""
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(degrees, statistic / 2))


def test_the_chi_square_p_value_matches_known_values():
    # chi-square quantiles (df, statistic at p): (1, 3.841) p=0.05, (4, 13.277) p=0.01, (9, 21.666) p=0.01
    for df, statistic, p in ((1, 3.841459, 0.05), (4, 13.276704, 0.01), (9, 21.665994, 0.01)):
        observed = torch.zeros(df + 1, dtype=torch.float64)
        expected = torch.ones(df + 1, dtype=torch.float64)
        observed[0] = 1 + statistic ** 0.5  # the statistic is (observed - expected)^2 / expected in one cell
        observed[1:] = 1.0
        assert chi_square_p_value(observed, expected) == pytest.approx(p, rel=1e-4)


CASES = [dict(temperature=0.7), dict(temperature=1.0), dict(temperature=1.6), dict(temperature=1.0, top_k=4),
         dict(temperature=1.0, top_p=0.8), dict(temperature=0.9, min_p=0.15),
         dict(temperature=1.2, top_k=6, top_p=0.9)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_the_next_token_distribution_is_the_softmax(case):
    # 120,000 draws over fixed logits (400 seeds x 300 positions): the chi-square test sees a 2 % relative
    # shift of the likeliest token's probability, checked below by the same test rejecting it.
    V, seeds_n, positions_n = 10, 400, 300
    logits = torch.tensor([2.0, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0], dtype=torch.float64)
    params = [SamplingParams(**case, seed=s) for s in range(seeds_n)]
    sampling = batch_sampling(params, "cpu")
    rows = logits.expand(seeds_n, positions_n, V)
    rows = rows.masked_fill(ops.sampling_mask(rows, sampling), float("-inf"))
    positions = torch.arange(positions_n).expand(seeds_n, positions_n).contiguous()
    tokens = ops.gumbel_argmax(rows, sampling.seeds, positions, sampling.temperature)
    counts = torch.bincount(tokens.flatten(), minlength=V).double()
    target = _masked_softmax(logits, **case)
    assert bool((counts[target == 0] == 0).all())  # masked tokens are never drawn
    live = target > 0
    expected = target[live] * counts.sum()
    assert chi_square_p_value(counts[live], expected) > 0.01
    shifted = target[live].clone()
    shifted[0] *= 1.02
    shifted[1:] *= (1 - shifted[0]) / shifted[1:].sum()
    assert chi_square_p_value(counts[live], shifted * counts.sum()) < 0.01


PARAMS = [SamplingParams(temperature=1.0, seed=11), SamplingParams(temperature=0.7, top_k=20, seed=5),
          SamplingParams(temperature=1.3, top_p=0.9, min_p=0.02, seed=2**63 + 7)]
PATHS = {"ar": dict(block_size=1, drafts=None), "jacobi5": dict(block_size=5, drafts=None),
         "jacobi16": dict(block_size=16, drafts=None), "auto": dict(drafts="auto"),
         **{source: dict(drafts=(source,)) for source in SOURCES}}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("params", PARAMS, ids=["t1", "t07_topk", "t13_topp_minp"])
def test_every_path_samples_the_one_token_samplers_tokens(path, params):
    model = _model_with_a_random_head() if path == "head" else _model()
    ids, mask = random_prompts(3, [6, 1, 11], seed=2)
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=Corpus(), do_sample=True,
                           temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                           min_p=params.min_p, seed=params.seed, **PATHS[path])
    assert out.seed == params.seed
    if path == "head":
        assert out.stats.proposed_by_source["head"] > 0
    greedy = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, block_size=1, drafts=None)
    assert not torch.equal(out.sequences, greedy.sequences)
    for b, (row, m) in enumerate(zip(ids, mask)):
        prompt = row[m.bool()].tolist()
        row_params = SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, params.seed + b)
        assert out.sequences[b, ids.shape[1]:].tolist() == _one_token_sampler(model, prompt, row_params, MAX_NEW)


def test_a_row_samples_the_same_tokens_in_a_batch_of_eight_as_alone():
    model = _model("qwen2")
    ids, mask = random_prompts(8, [3, 9, 1, 7, 12, 5, 2, 8], seed=4)
    batch = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, do_sample=True, temperature=1.0, seed=40)
    for b in range(8):
        alone = cllm_rt.generate(model, ids[b:b + 1, mask[b].argmax():], max_new_tokens=MAX_NEW, do_sample=True,
                                 temperature=1.0, seed=40 + b)
        assert batch.sequences[b, ids.shape[1]:].tolist() == alone.sequences[0, -MAX_NEW:].tolist()


@pytest.mark.parametrize("drafts", ["auto", None])
def test_rows_joining_a_running_batch_sample_as_alone_and_greedy_rows_stay_greedy(drafts):
    model = _model()
    ids, mask = random_prompts(3, [5, 9, 4], seed=3)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    params = [SamplingParams(temperature=1.0, seed=9), None, SamplingParams(temperature=0.8, top_k=10, seed=1)]
    outputs = {i: [] for i in range(3)}
    with torch.inference_mode(), Decoder(model, drafts=drafts, corpus=Corpus()) as decoder:
        decoder.add(prompts[:1], [MAX_NEW], [0], params[:1])
        for step in range(100):
            if step == 3:
                decoder.add(prompts[1:], [MAX_NEW] * 2, [1, 2], params[1:])
            for handle, new, _ in decoder.emit():
                outputs[handle] += new
            decoder.decode()
            if step > 3 and not decoder.rows:
                break
    for i in (0, 2):
        assert outputs[i] == _one_token_sampler(model, prompts[i], params[i], MAX_NEW)
    assert outputs[1] == model.generate(torch.tensor([prompts[1]]), do_sample=False, max_new_tokens=MAX_NEW,
                                        pad_token_id=0)[0, len(prompts[1]):].tolist()


def test_generation_config_sampling_draws_and_returns_a_seed_that_reproduces_the_answer():
    model = tiny_model("llama")
    model.generation_config.do_sample, model.generation_config.temperature = True, 1.2
    ids, mask = random_prompts(2, [4, 6], seed=5)
    first = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW)
    again = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, seed=first.seed)
    assert isinstance(first.seed, int) and torch.equal(first.sequences, again.sequences)
    other = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, seed=first.seed + 2)
    assert not torch.equal(first.sequences, other.sequences)
    greedy = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, do_sample=False)
    assert greedy.seed is None
    hf = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW)
    assert torch.equal(greedy.sequences, hf)


@pytest.mark.parametrize("change, fragment", [(dict(temperature=-1.0), "temperature must be >= 0"),
                                              (dict(top_p=0.0), "top_p must be in (0, 1]"),
                                              (dict(top_k=-2), "top_k must be an integer >= 0"),
                                              (dict(min_p=1.5), "min_p must be in [0, 1]"),
                                              (dict(seed=1.5), "seed must be an integer")])
def test_bad_sampling_parameters_are_refused_with_one_line(change, fragment):
    ids, mask = random_prompts(1, [4])
    args = dict(temperature=1.0, seed=0) | change
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        cllm_rt.generate(_model(), ids, mask, max_new_tokens=3, do_sample=True, **args)


def test_repetition_penalty_is_refused_when_sampling_too():
    model = tiny_model("llama")
    model.generation_config.repetition_penalty = 1.2
    ids, mask = random_prompts(1, [4])
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        cllm_rt.generate(model, ids, mask, max_new_tokens=3, do_sample=True, temperature=1.0)


@native
def test_opcheck():
    seeds, positions = _streams(2, 3)
    logits = torch.randn(2, 3, 40)
    temperature = torch.tensor([0.0, 0.8], dtype=torch.float64)
    torch.library.opcheck(torch.ops.cllm_rt.gumbel_argmax.default, (logits, seeds, positions, temperature))
    torch.library.opcheck(torch.ops.cllm_rt.gumbel_uniform.default, (seeds, positions, 40))


@pytest.mark.parametrize("change, error, fragment", [
    (dict(seeds=torch.zeros(3, dtype=torch.long)), ValueError, "seeds must have shape"),
    (dict(temperature=torch.zeros(2)), TypeError, "temperature must have dtype"),
    (dict(positions=torch.zeros(2, 4, dtype=torch.long)), ValueError, "positions must have shape")])
def test_gumbel_argmax_rejects_bad_inputs(change, error, fragment):
    args = dict(logits=torch.randn(2, 3, 40), seeds=torch.zeros(2, dtype=torch.long),
                positions=torch.zeros(2, 3, dtype=torch.long), temperature=torch.ones(2, dtype=torch.float64))
    with pytest.raises(error, match=fragment):
        ops.gumbel_argmax(**(args | change))
