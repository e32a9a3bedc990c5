"""The paged KV cache: a row holds the pages of its own tokens, a join copies only the joining rows' pages, a
leave moves nothing, and decoding over rows that span many small pages stays exact (float64)."""

import pytest
import torch

import cllm_rt
from cllm_rt.runtime import cache as cache_module
from cllm_rt.runtime.cache import JacobiCache
from cllm_rt.runtime.decoding import Decoder
from cllm_rt.runtime.drafts import Corpus
from tiny_models import random_prompts, tiny_model


def _filled(lengths, page_size, num_layers=2, max_len=64):
    """A cache whose position s of row b holds key 100 * b + s (value: its negative), written through the
    cache's own write path, one block per row length."""
    cache = JacobiCache(num_layers, torch.zeros(len(lengths), dtype=torch.long), max_len, page_size=page_size)
    n = max(lengths)
    cache.begin_block(n)
    keys = torch.tensor([[100.0 * b + s for s in range(n)] for b in range(len(lengths))])  # [B, n]
    keys = keys[:, None, :, None].expand(-1, 1, -1, 4).contiguous()  # [B, Hkv = 1, n, D = 4]
    for layer in cache.layers:
        layer.update(keys, -keys)
    cache.commit(torch.tensor(lengths), list(lengths))
    return cache


def _row(cache, b, layer=0):
    """Row b's committed keys (one number per position), read through its pages."""
    pages = cache.row_pages[b]
    keys = cache.layers[layer].keys
    return [keys[pages[s // cache.page_size], 0, s % cache.page_size, 0].item()
            for s in range(cache.lengths_host[b])]


def test_a_row_holds_the_pages_of_its_tokens_not_of_the_longest_row():
    cache = _filled([3, 20], page_size=4)  # one prefill forward wrote 20 positions of both rows
    cache.trim()
    assert [len(pages) for pages in cache.row_pages] == [1, 5] and len(cache.free) == 4
    cache.begin_block(2)  # row 0 needs 5 positions (2 pages), row 1 22 (6 pages): both from the free list
    assert [len(pages) for pages in cache.row_pages] == [2, 6]
    assert cache.num_pages == 10 and len(cache.free) == 2
    assert cache.page_table.tolist() == [cache.row_pages[0] + [0] * 4, cache.row_pages[1]]


def test_a_leaving_row_moves_nothing_and_frees_its_pages():
    cache = _filled([9, 13, 5], page_size=4)
    pools = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
    rows_before = [_row(cache, b) for b in range(3)]
    freed = set(cache.row_pages[1])
    cache.select_rows(torch.tensor([0, 2]), [0, 2])
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == pools  # no copy
    assert set(cache.free) == freed
    assert [_row(cache, 0), _row(cache, 1)] == [rows_before[0], rows_before[2]]
    assert cache.lengths.tolist() == cache.lengths_host == [9, 5]


def test_a_joining_row_copies_only_its_committed_pages_into_free_ones():
    cache = _filled([9, 13, 5], page_size=4)
    cache.select_rows(torch.tensor([0, 2]), [0, 2])  # 4 pages back on the free list
    pools = [layer.keys.data_ptr() for layer in cache.layers]
    kept = [_row(cache, 0), _row(cache, 1)]
    joining = _filled([6, 2], page_size=4)
    cache.extend(joining)
    assert [layer.keys.data_ptr() for layer in cache.layers] == pools  # enough free pages: the pool stays
    assert [len(pages) for pages in cache.row_pages[2:]] == [2, 1]  # 6 and 2 tokens, not the prefill's 6 + 6
    assert [_row(cache, b) for b in range(4)] == kept + [[float(s) for s in range(6)], [100.0, 101.0]]
    assert len(cache.free) == 1


def test_the_pool_grows_by_a_quarter_at_least():
    cache = JacobiCache(1, torch.zeros(1, dtype=torch.long), max_len=10_000, page_size=4)
    sizes = []
    for _ in range(40):
        cache.begin_block(4)
        cache.commit(torch.tensor([4]), [4])
        if not sizes or cache.num_pages != sizes[-1]:
            sizes.append(cache.num_pages)
    assert sizes[-1] >= 40
    assert all(b - a >= max(1, a // 4) for a, b in zip(sizes, sizes[1:]))  # amortized: geometric growth


def test_commit_paths_moves_the_accepted_nodes_into_place_across_pages():
    cache = _filled([3, 1], page_size=4, max_len=12)
    keys = torch.tensor([[100.0 * b + 10 + i for i in range(6)] for b in range(2)])[:, None, :, None]
    keys = keys.expand(-1, 1, -1, 4).contiguous()  # node i of row b: 100 * b + 10 + i
    cache.begin_block(6)  # row 0's block spans positions 3-8: three pages
    for layer in cache.layers:
        layer.update(keys, -keys)
    cache.commit_paths([[0, 2, 5], [0, 1]], torch.tensor([3, 2]))
    assert cache.lengths.tolist() == cache.lengths_host == [6, 3]
    assert _row(cache, 0) == [0, 1, 2, 10, 12, 15]  # nodes 0, 2, 5 of the block at 3
    assert _row(cache, 1) == [100, 110, 111]  # a chain prefix stays where it is
    assert _row(cache, 0, layer=1) == [0, 1, 2, 10, 12, 15]


def test_a_chat_sized_budget_does_not_reserve_its_positions():
    # The dense cache reserved prompt + budget + 64 positions per row up front (~380 MB per SmolLM2 chat row).
    model = tiny_model("llama")
    ids, mask = random_prompts(1, [7])
    with torch.inference_mode(), Decoder(model, drafts=None) as decoder:
        decoder.add([ids[0].tolist()], [240], [0])
        cache = decoder.cache
        assert cache.num_pages * cache.page_size < 7 + cache_module.PAGE_SIZE


# ---------------------------------------------------------------- exactness over many small pages

@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(cache_module, "PAGE_SIZE", 32)  # the kernels' smallest page: rows cross many


@pytest.mark.parametrize("drafts", ["auto", None])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generate_is_exact_over_small_pages(small_pages, arch, drafts):
    model = tiny_model(arch)
    ids, mask = random_prompts(3, [5, 40, 17], seed=4)
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=90, pad_token_id=0)
    out = cllm_rt.generate(model, ids, mask, max_new_tokens=90, drafts=drafts, corpus=Corpus(), pad_token_id=0)
    assert torch.equal(out.sequences, expected)


def test_rows_joining_and_leaving_over_small_pages_decode_as_alone(small_pages):
    model = tiny_model("llama")
    ids, mask = random_prompts(4, [5, 33, 2, 14], seed=5)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    budgets = [90, 20, 70, 45]
    outputs = {i: [] for i in range(4)}
    with torch.inference_mode(), Decoder(model, corpus=Corpus()) as decoder:
        decoder.add(prompts[:2], budgets[:2], [0, 1])
        for step in range(400):
            if step == 3:
                decoder.add(prompts[2:], budgets[2:], [2, 3])  # join rows that already span pages
            for handle, new, _ in decoder.emit():
                outputs[handle] += new
            decoder.decode()
            if step > 3 and not decoder.rows:
                break
    for i, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=budgets[i], pad_token_id=0)
        assert outputs[i] == alone[0, len(prompt):].tolist()
