"""Draft sources, token trees and the cost model, then exactness of tree-verified decoding in float64."""

import functools

import pytest
import torch

import cllm_rt
from cllm_rt.runtime.cost import StepCost, choose_budget
from cllm_rt.runtime.drafts import AcceptanceStats, Corpus, DraftTree, NgramIndex
from tiny_models import random_prompts, tiny_model

MAX_NEW = 41


# ---------------------------------------------------------------- suffix lookups

def test_ngram_index_continues_the_longest_suffix_most_recent_first():
    index = NgramIndex(max_n=3)
    index.extend([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    # the longest tail found earlier is [2, 3] (3 tokens: [7, 2, 3] never occurred before)
    assert index.continuations(index.tokens, depth=2, max_matches=8) == (2, [[5, 7], [4, 9]])
    assert index.continuations(index.tokens, depth=2, max_matches=1) == (2, [[5, 7]])
    assert index.continuations([8, 8], depth=2, max_matches=8) == (0, [])  # nothing to continue
    assert index.continuations([6, 3], depth=1, max_matches=8, min_n=2) == (0, [])  # only a 1-token match
    assert index.continuations([6, 3], depth=1, max_matches=8) == (1, [[5], [4]])


class _CountedSlices(list):
    def __init__(self, *args):
        super().__init__(*args)
        self.slices = 0

    def __getitem__(self, key):
        self.slices += isinstance(key, slice)
        return super().__getitem__(key)


def test_a_lookup_slices_only_the_continuations_it_returns():
    index = NgramIndex(max_n=2)
    index.extend([1, 2] * 500)  # 500 earlier occurrences of the suffix [1, 2]
    index.tokens = _CountedSlices(index.tokens)
    assert index.continuations([1, 2], depth=3, max_matches=4) == (2, [[1, 2]] + [[1, 2, 1]] * 3)
    assert index.tokens.slices == 4


def test_step_cost_computes_medians_once_per_observation(monkeypatch):
    import statistics

    calls = []
    median = statistics.median
    monkeypatch.setattr(statistics, "median", lambda values: calls.append(1) or median(values))
    cost = StepCost()
    for tokens in (1, 4, 16):
        cost.observe(tokens, 0.02 + 0.001 * tokens)
    choose_budget(cost, [[0.9] * 40] * 2, 64)  # prices a dozen budgets
    assert len(calls) == 3
    cost.observe(4, 0.5)  # a new measurement is seen at once
    assert cost.predict(4) == pytest.approx(median([0.024, 0.5])) and len(calls) == 6


def test_corpus_never_continues_across_sequences_and_stays_bounded():
    corpus = Corpus(max_tokens=10, max_n=2)
    corpus.add([1, 2, 3])
    corpus.add([2, 5])
    assert corpus.continuations([9, 2], depth=4, max_matches=8, min_n=1) == (1, [[5], [3]])
    for start in range(20):
        corpus.add([100 + start, 101 + start, 102 + start])
    assert len(corpus) <= 10
    assert corpus.continuations([9, 2], depth=4, max_matches=8, min_n=1) == (0, [])  # evicted, oldest first
    # the two newest sequences are held, the young generation's first; [117, 118, 119] and older are gone
    assert corpus.continuations([119], depth=2, max_matches=8, min_n=1) == (1, [[120, 121], [120]])
    assert corpus.continuations([117], depth=2, max_matches=8, min_n=1) == (0, [])


def test_corpus_indexes_each_token_once_however_often_it_evicts(monkeypatch):
    indexed = []
    extend = NgramIndex.extend
    monkeypatch.setattr(NgramIndex, "extend", lambda self, tokens: (indexed.append(len(tokens)), extend(self, tokens)))
    corpus = Corpus(max_tokens=64, max_n=3)
    sequences = [[(7 * i + j) % 50 for j in range(1 + i % 9)] for i in range(200)]
    for tokens in sequences:
        corpus.add(tokens)
    assert sum(indexed) == sum(len(t) + 1 for t in sequences)  # each token and its separator, never again
    assert len(corpus) <= 64
    assert corpus.continuations(sequences[-1][:1], depth=8, max_matches=1, min_n=1)[1][0] == sequences[-1][1:]


def test_corpus_needs_room_for_two_generations():
    with pytest.raises(ValueError, match="max_tokens must be >= 2"):
        Corpus(max_tokens=1)


# ---------------------------------------------------------------- trees

def _tree():
    stats = AcceptanceStats()
    tree = DraftTree.rooted_at(7)
    tree.add_trie([[1, 2, 3], [1, 2, 4], [1, 5], [6]], stats.calibration, "context", matched=2)
    tree.add_branch([1, 9], [0.9, 0.8], [1.0, 1.0], "jacobi")  # shares the prefix [1]
    return tree


def test_trie_merges_shared_prefixes_and_scores_by_share():
    tree = _tree()
    assert tree.tokens == [7, 1, 2, 3, 4, 5, 6, 9]
    assert tree.parents == [-1, 0, 1, 2, 2, 1, 0, 1]
    prior = AcceptanceStats.PRIOR["context"]
    assert tree.scores[1] == pytest.approx(0.9)  # the Jacobi branch's higher score wins the shared node
    assert tree.scores[6] == pytest.approx(prior * 1 / 4)  # [6]: one continuation of four
    assert tree.scores[2] == pytest.approx(0.9 * min(1.0, prior * 2 / 3)) or tree.scores[2] < tree.scores[1]
    assert all(tree.scores[c] <= tree.scores[p] for c, p in enumerate(tree.parents) if p >= 0)


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 8, 100])
def test_best_keeps_a_subtree_of_the_highest_scores_in_depth_first_order(budget):
    tree = _tree()
    best = tree.best(budget)
    assert len(best) == min(budget, len(tree))
    assert all(p < i for i, p in enumerate(best.parents) if i)  # topological
    kept = sorted(tree.scores[1:], reverse=True)[:budget - 1]
    assert sorted(best.scores[1:], reverse=True) == pytest.approx(kept)
    assert best.expected_tokens() == pytest.approx(1 + sum(kept))
    # depth-first with the best child first: the best path is the block's first positions
    chain = [0] + best.first_child_chain(0)
    assert chain == list(range(len(chain)))
    paths = {tuple(best.tokens[n] for n in [0] + best.first_child_chain(0))}
    assert paths <= {(7,), (7, 1), (7, 1, 9), (7, 1, 2), (7, 1, 2, 3)}


def test_acceptance_stats_learn_which_source_is_right():
    stats = AcceptanceStats()
    for _ in range(50):
        tree = DraftTree.rooted_at(0)
        tree.add_trie([[1, 2]], stats.calibration, "context", matched=3)
        tree.add_trie([[3, 4]], stats.calibration, "corpus", matched=3)
        stats.observe(tree, [0, 1, 2])  # context's drafts always accepted, corpus's never
    assert stats.calibration("context", 3, 1) > 0.9 and stats.calibration("corpus", 3, 1) < 0.1
    assert stats.calibration("context", 3, 5) > 0.9  # deeper levels inherit what depth 1 and 2 showed
    assert stats.calibration("context", 1, 1) == pytest.approx(AcceptanceStats.PRIOR["context"])


# ---------------------------------------------------------------- cost model

def test_budget_grows_when_extra_tokens_are_cheap_and_shrinks_when_drafts_are_bad():
    cheap, dear = StepCost(), StepCost()
    for tokens in (1, 8, 16, 32, 64):
        cheap.observe(tokens, 0.010 + 0.00001 * tokens)  # a GPU-like step: extra tokens nearly free
        dear.observe(tokens, 0.010 + 0.002 * tokens)  # each extra token costs 20% of a step
    good = [[0.9 ** d for d in range(1, 40)]]
    assert choose_budget(cheap, good, 64) >= 32
    assert choose_budget(dear, good, 64) < choose_budget(cheap, good, 64)
    assert choose_budget(dear, [[0.05] * 30], 64) == 1  # bad drafts: plain autoregressive steps
    assert choose_budget(cheap, [[]], 64) == 1  # nothing drafted
    assert choose_budget(cheap, good, 4) <= 4


def test_exploration_measures_the_next_larger_budget():
    cost = StepCost()
    for _ in range(5):
        cost.observe(1, 0.010)
        cost.observe(2, 0.030)  # 2-node steps look dear: the plain choice stays at 1
    scores = [[0.5, 0.4, 0.3, 0.2]]
    assert choose_budget(cost, scores, 64) == 1
    assert choose_budget(cost, scores, 64, explore=True) == 3  # 2 is measured enough; 3 is not
    assert choose_budget(cost, [[]], 64, explore=True) == 1  # nothing to explore with


def test_step_cost_ignores_outliers_and_interpolates_unmeasured_sizes():
    cost = StepCost()
    assert cost.predict(10) > cost.predict(1)  # the prior before any observation
    for tokens in (1, 4, 16) * 5:
        cost.observe(tokens, 0.02 + 0.001 * tokens)
    cost.observe(4, 1.0)  # a step slowed down by a busy neighbour
    assert cost.predict(4) == pytest.approx(0.024)
    assert cost.predict(10) == pytest.approx(0.030)  # between the medians of 4 and 16
    # beyond: along the slope of the two largest sizes (0.001 per token) or the prior's, whichever is steeper
    prior = StepCost.PRIOR_SLOPE * 0.036 / (1 + StepCost.PRIOR_SLOPE * 16)
    assert cost.predict(32) == pytest.approx(0.036 + max(prior, 0.001) * 16)


# ---------------------------------------------------------------- exactness in float64

@functools.lru_cache(maxsize=None)
def _model(arch):
    return tiny_model(arch)


def _repeating_prompt(batch_lengths, period=6, seed=0):
    """Prompts that repeat a short unit: suffix drafts then match long stretches (long accepted paths)."""
    g = torch.Generator().manual_seed(seed)
    width = max(batch_lengths)
    ids = torch.zeros(len(batch_lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(batch_lengths):
        unit = torch.randint(3, 101, (period,), generator=g)
        ids[row, width - length:] = unit.repeat(-(-length // period))[:length]
        mask[row, width - length:] = 1
    return ids, mask


def _expected(model, ids, mask, max_new_tokens=MAX_NEW, eos=None):
    return model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                          eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("drafts", ["auto", ("context",), ("corpus",), ("jacobi",), ("context", "corpus")])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"])
def test_every_source_is_exact(arch, drafts):
    model = _model(arch)
    ids, mask = random_prompts(3, [5, 1, 9])
    corpus = Corpus()
    corpus.add(_expected(model, ids, mask)[0].tolist())  # row 0's answer is in the corpus: long corpus paths
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, drafts=drafts, corpus=corpus, pad_token_id=0)
    torch.testing.assert_close(out.sequences, _expected(model, ids, mask), rtol=0, atol=0)
    assert out.stats.new_tokens == [MAX_NEW] * 3


@pytest.mark.parametrize("max_tree_nodes", [1, 2, 3, 7, 16, 64])
def test_budgets_from_one_to_sixty_four_nodes_are_exact(max_tree_nodes):
    model = _model("llama")
    ids, mask = _repeating_prompt([30, 13, 21])
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, max_tree_nodes=max_tree_nodes,
                           corpus=Corpus(), pad_token_id=0)
    torch.testing.assert_close(out.sequences, _expected(model, ids, mask), rtol=0, atol=0)
    assert max(out.stats.budgets) <= max_tree_nodes
    if max_tree_nodes == 1:
        assert out.stats.tokens_per_forward == 1.0


def test_long_accepted_paths_through_a_corpus_that_holds_the_answer():
    """The corpus holds the greedy answer itself: paths run deep and often leave the first branch, so the
    commit moves keys/values; the output must still be exactly greedy."""
    model = _model("qwen2")
    ids, mask = _repeating_prompt([17, 9])
    expected = _expected(model, ids, mask)
    corpus = Corpus()
    for row in expected:
        corpus.add(row.tolist())
    corpus.add([5, 6, 7, 8] * 10)  # a distractor branch
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=corpus, pad_token_id=0)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.stats.tokens_per_forward > 3 and out.stats.accepted_by_source["corpus"] > MAX_NEW


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_eos_inside_an_accepted_path(arch):
    model = _model(arch)
    ids, mask = _repeating_prompt([17, 9, 12])
    free = _expected(model, ids, mask)
    eos = int(free[0, ids.shape[1] + 11])
    expected = _expected(model, ids, mask, eos=eos)
    corpus = Corpus()
    corpus.add(free[0].tolist())  # row 0's long path runs through its EOS
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=corpus, eos_token_id=eos,
                           pad_token_id=0)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)
    assert out.sequences[0, ids.shape[1] + out.stats.new_tokens[0] - 1] == eos


def test_empty_trees_decode_autoregressively():
    model = _model("llama")
    ids, mask = random_prompts(1, [4])
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, drafts=("corpus",), corpus=Corpus(),
                           pad_token_id=0)
    torch.testing.assert_close(out.sequences, _expected(model, ids, mask), rtol=0, atol=0)


def test_a_corpus_of_another_vocabulary_only_drafts_ids_the_model_has():
    model = _model("llama")  # vocabulary of 101
    ids, mask = random_prompts(1, [6])
    expected = _expected(model, ids, mask)
    corpus = Corpus()
    corpus.add(expected[0, :8].tolist() + [5000, -3] + expected[0, 8:].tolist())
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=corpus, pad_token_id=0)
    torch.testing.assert_close(out.sequences, expected, rtol=0, atol=0)


def test_the_default_corpus_belongs_to_the_model():
    """Outputs of one model never become drafts of another (whose vocabulary may be smaller)."""
    big = tiny_model("llama", seed=1)
    big.resize_token_embeddings(400)
    cllm_rt.generate(big, torch.tensor([[300, 301, 302, 303]]), max_new_tokens=8, pad_token_id=0)
    model = _model("llama")
    ids, mask = random_prompts(1, [4])
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, pad_token_id=0)
    torch.testing.assert_close(out.sequences, _expected(model, ids, mask), rtol=0, atol=0)


def test_calls_add_their_outputs_to_the_corpus():
    model = _model("llama")
    ids, mask = random_prompts(1, [6])
    corpus = Corpus()
    first = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=corpus, pad_token_id=0)
    assert len(corpus) == first.sequences.shape[1]
    again = cllm_rt.generate(model, ids, mask, max_new_tokens=MAX_NEW, corpus=corpus, pad_token_id=0)
    torch.testing.assert_close(again.sequences, first.sequences, rtol=0, atol=0)
    assert again.stats.forward_passes < first.stats.forward_passes  # the repeat is drafted from the corpus


def test_rejects_bad_draft_options():
    ids, mask = random_prompts(1, [3])
    with pytest.raises(ValueError, match="drafts must be"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4, drafts=("ngram",))
    with pytest.raises(ValueError, match="max_tree_nodes must be at most 64"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4, max_tree_nodes=65)
    with pytest.raises(ValueError, match="max_tree_nodes"):
        cllm_rt.generate(_model("llama"), ids, mask, max_new_tokens=4, max_tree_nodes=0)
