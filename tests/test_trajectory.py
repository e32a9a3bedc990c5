"""Jacobi trajectory collection: exactness against model.generate, storage, resume and clear errors.

Models run in float64, where rounding cannot flip an argmax, so the KV-cached batched collector must
reproduce greedy decoding and a cache-free recomputation token for token.
"""

import dataclasses
import functools
import os
import subprocess
import sys

import pytest
import torch

from cllm_rt.training import collect as collect_module
from cllm_rt.training import storage
from cllm_rt.cli import main as cli_main
from cllm_rt.training.collect import CollectSettings, Prompt, collect, decode_trajectories, is_repetitive, prompt_seed
from cllm_rt.training.prompt_file import read_prompt_file
from cllm_rt.training.storage import load_trajectories
from cllm_rt.runtime.step import jacobi_step
from tiny_models import random_prompts, tiny_model
from training_fixtures import EOS, byte_tokenizer, files_in, save_model, tiny_lm, write_jsonl

MAX_NEW = 37


@functools.lru_cache(maxsize=None)
def _model(arch):
    return tiny_model(arch)


def _prompt_lists(lengths, seed=0):
    ids, mask = random_prompts(len(lengths), lengths, seed=seed)
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]


def _greedy(model, prompt, max_new_tokens, eos=None):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("block_size", [2, 5, 16])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fixed_points_concatenate_to_the_greedy_answer(arch, block_size):
    model = _model(arch)
    prompts = _prompt_lists([5, 1, 9, 3])
    eos = _greedy(model, prompts[0], MAX_NEW)[9]  # row 0 stops inside a block; others may not
    builders = decode_trajectories(model, prompts, [prompt_seed(0, i) for i in range(4)], block_size=block_size,
                                   max_new_tokens=MAX_NEW, eos={eos})
    for prompt, builder in zip(prompts, builders):
        assert builder.answer == _greedy(model, prompt, MAX_NEW, eos)
        fixed_points = [t for block in builder.blocks for t in block.states[-1][:block.valid]]
        assert builder.answer[1:] == fixed_points[:len(builder.answer) - 1]
        assert all(len(state) == block_size for block in builder.blocks for state in block.states)
    assert builders[0].answer[-1] == eos and builders[0].blocks[-1].valid <= block_size


def test_every_state_is_one_jacobi_iteration_of_the_previous_one():
    # a cache-free recomputation of each iteration: greedy over [context, y_1 .. y_{n-1}]
    model, n = _model("llama"), 6
    prompt = _prompt_lists([7])[0]
    builder = decode_trajectories(model, [prompt], [3], block_size=n, max_new_tokens=20, eos=set())[0]
    for block in builder.blocks:
        context = prompt + builder.answer[:1 + block.index * n]
        for before, after in zip(block.states, block.states[1:]):
            logits = model(torch.tensor([context + before[:-1]])).logits[0, len(context) - 1:]
            assert logits.argmax(-1).tolist() == after
        fixed = block.states[-1]
        assert model(torch.tensor([context + fixed[:-1]])).logits[0, len(context) - 1:].argmax(-1).tolist() == fixed
        assert len(set(map(tuple, block.states))) == len(block.states)  # no state recorded twice


def test_each_iteration_feeds_only_the_positions_not_yet_final(monkeypatch):
    """The shrinking window: after the first iteration of a block the proven prefix is cached, not re-fed; the
    states it records are checked above against a cache-free recomputation of whole blocks."""
    widths = []

    def recording(model, cache, block):
        widths.append(block.shape[1])
        return jacobi_step(model, cache, block)

    monkeypatch.setattr(collect_module, "jacobi_step", recording)
    builder = decode_trajectories(_model("llama"), _prompt_lists([7]), [3], block_size=8, max_new_tokens=33,
                                  eos=set())[0]
    assert len(widths) == sum(len(b.states) for b in builder.blocks) - sum(  # one forward per iteration
        b.states[-1][:-1] == b.states[-2][:-1] for b in builder.blocks if len(b.states) > 1)
    assert max(widths) == 8 and min(widths) < 8 and sum(widths) < 8 * len(widths)


def test_trajectories_do_not_depend_on_batch_composition():
    model = _model("llama")
    prompts = _prompt_lists([5, 1, 9])
    seeds = [prompt_seed(4, i) for i in range(3)]
    together = decode_trajectories(model, prompts, seeds, block_size=5, max_new_tokens=MAX_NEW, eos=set())
    for prompt, seed, batched in zip(prompts, seeds, together):
        alone = decode_trajectories(model, [prompt], [seed], block_size=5, max_new_tokens=MAX_NEW, eos=set())[0]
        assert alone.blocks == batched.blocks and alone.answer == batched.answer


def test_is_repetitive():
    assert is_repetitive([7] * 40)
    assert is_repetitive([1, 2, 3] * 12 + [4, 5])
    assert not is_repetitive(list(range(60)))
    assert not is_repetitive(list(range(40)) + [1, 2] * 4)  # a short loop at the end covers too little


# ---------------------------------------------------------------- storage, resume, errors

@pytest.fixture(scope="module")
def byte_model():
    return tiny_lm(eos_token_id=EOS, dtype=torch.float64)


def _prompts(count=10, with_reference=False):
    lists = _prompt_lists([3 + i % 7 for i in range(count)], seed=1)
    return [Prompt(p, [10 + i, EOS] if with_reference else None) for i, p in enumerate(lists)]


SETTINGS = CollectSettings(block_size=4, max_new_tokens=17, seed=2, shard_size=3)


def _as_tuples(directory):
    return [(p.index, p.prompt, p.answer, p.reference, p.blocks) for p in load_trajectories(directory).prompts]


def test_collect_stores_what_decoding_produced(tmp_path, byte_model):
    prompts = _prompts(with_reference=True)
    settings = CollectSettings(block_size=4, max_new_tokens=17, seed=2, shard_size=3, keep_reference=True)
    manifest = collect(byte_model, prompts, str(tmp_path / "t"), settings, batch_size=4, progress=False)
    assert manifest["complete"] and manifest["prompts_done"] == 10 == manifest["prompts_kept"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(4)]
    assert manifest["settings"]["block_size"] == 4 and manifest["settings"]["eos_token_ids"] == [EOS]
    stored = load_trajectories(str(tmp_path / "t"))
    assert [p.index for p in stored.prompts] == list(range(10))
    decoded = decode_trajectories(byte_model, [p.tokens for p in prompts], [prompt_seed(2, i) for i in range(10)],
                                  block_size=4, max_new_tokens=17, eos={EOS})
    for p, d, source in zip(stored.prompts, decoded, prompts):
        assert (p.prompt, p.answer, p.blocks, p.reference) == (source.tokens, d.answer, d.blocks, source.reference)
    assert not [f for f in files_in(tmp_path / "t") if ".tmp" in f]


def test_interrupted_collection_resumes_without_loss_or_duplicates(tmp_path, byte_model, monkeypatch):
    prompts = _prompts()
    collect(byte_model, prompts, str(tmp_path / "whole"), SETTINGS, batch_size=2, progress=False)

    write_shard = storage.write_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(args[1])
        write_shard(*args, **kwargs)

    monkeypatch.setattr(storage, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        collect(byte_model, prompts, str(tmp_path / "cut"), SETTINGS, batch_size=2, progress=False)
    partial = storage.read_manifest(str(tmp_path / "cut"))
    assert partial["prompts_done"] == 6 and not partial["complete"]
    monkeypatch.setattr(storage, "write_shard", write_shard)
    # the rerun may batch differently: trajectories depend on the seed and the prompt index only
    manifest = collect(byte_model, prompts, str(tmp_path / "cut"), SETTINGS, batch_size=3, progress=False)
    assert manifest["complete"] and manifest["prompts_done"] == 10
    assert _as_tuples(tmp_path / "cut") == _as_tuples(tmp_path / "whole")
    assert not [f for f in files_in(tmp_path / "cut") if ".tmp" in f]


def test_rerun_with_other_settings_model_tokenizer_or_data_is_refused(tmp_path, byte_model):
    out = str(tmp_path / "t")
    tokenizer = byte_tokenizer()
    collect(byte_model, _prompts(4), out, SETTINGS, tokenizer=tokenizer, progress=False)
    before = files_in(out)
    with pytest.raises(ValueError, match=r"settings\.block_size: 4 there, 8 now"):
        collect(byte_model, _prompts(4), out, CollectSettings(block_size=8, max_new_tokens=17, seed=2, shard_size=3),
                tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"model\.sha256"):
        collect(tiny_lm(seed=5, eos_token_id=EOS, dtype=torch.float64), _prompts(4), out, SETTINGS,
                tokenizer=tokenizer, progress=False)
    other_tokenizer = byte_tokenizer()
    other_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match=r"tokenizer\.sha256"):
        collect(byte_model, _prompts(4), out, SETTINGS, tokenizer=other_tokenizer, progress=False)
    with pytest.raises(ValueError, match=r"prompts\.count: 4 there, 5 now"):
        collect(byte_model, _prompts(5), out, SETTINGS, tokenizer=tokenizer, progress=False)
    assert files_in(out) == before


def test_refuses_a_directory_that_is_not_a_trajectory_directory(tmp_path, byte_model):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a trajectory directory"):
        collect(byte_model, _prompts(2), str(tmp_path), SETTINGS, progress=False)
    assert files_in(tmp_path) == ["notes.txt"]


def test_repetitive_answers_are_dropped_by_default_and_counted(tmp_path):
    looping = tiny_lm(init_std=None, eos_token_id=EOS)  # HF's small init: greedy outputs mostly loop
    settings = CollectSettings(block_size=4, max_new_tokens=40, shard_size=4)
    assert settings.drop_repetitive
    keeping = dataclasses.replace(settings, drop_repetitive=False)
    everything = collect(looping, _prompts(4), str(tmp_path / "all"), keeping, progress=False)
    manifest = collect(looping, _prompts(4), str(tmp_path / "kept"), settings, progress=False)
    expected = [p for p in load_trajectories(str(tmp_path / "all")).prompts if not is_repetitive(p.answer)]
    assert everything["prompts_kept"] == 4 > len(expected) and everything["prompts_repetitive"] == 0
    assert manifest["prompts_done"] == 4 and manifest["prompts_kept"] == len(expected)
    assert manifest["prompts_repetitive"] == 4 - len(expected) == manifest["shards"][0]["repetitive"]
    assert load_trajectories(str(tmp_path / "kept")).prompts == expected


# ---------------------------------------------------------------- data files and the command line

def test_read_prompt_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}])
    texts = read_prompt_file(path, "Q: {question}\nA:", keep_reference=True)
    assert [(t.prompt, t.reference) for t in texts] == [("Q: 2+2?\nA:", "4"), ("Q: 3+3?\nA:", "6")]
    assert read_prompt_file(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}]))[0].prompt == "hi"


@pytest.mark.parametrize("rows, options, message", [
    ([], {}, "holds no prompts"),
    ([{"prompt": "a"}, {"text": "b"}], {}, r"d\.jsonl:2: no field 'prompt' \(fields: \['text'\]\)"),
    ([{"prompt": "a"}], {"prompt_template": "Q: {question}"}, r"d\.jsonl:1: no field 'question'"),
    ([{"prompt": "a"}], {"keep_reference": True}, r"d\.jsonl:1: no field 'answer'"),
    ([{"prompt": ""}], {}, "non-empty string"),
])
def test_bad_data_files_fail_clearly(tmp_path, rows, options, message):
    with pytest.raises(ValueError, match=message):
        read_prompt_file(write_jsonl(tmp_path / "d.jsonl", rows), **options)


def test_long_prompts_are_refused_before_anything_is_written_or_skipped(tmp_path):
    model = tiny_lm(eos_token_id=EOS, dtype=torch.float64, max_position_embeddings=40)
    prompts = [Prompt(list(range(3, 3 + length))) for length in (5, 30, 8, 25)]  # 1 and 3 leave no room
    settings = CollectSettings(block_size=4, max_new_tokens=12, shard_size=1)
    # 12 new tokens in blocks of 4 decode 1 + 3 x 4 = 13 positions: 25 + 13 = 38 fits, 30 + 13 = 43 does not
    with pytest.raises(ValueError, match=r"1 of 4 prompts .* prompt 1 has 30 tokens.*needs 13 more positions.*"
                                         r"max_position_embeddings=40.*--skip-long-prompts"):
        collect(model, prompts, str(tmp_path / "t"), settings, progress=False)
    assert not os.path.exists(tmp_path / "t")
    skipping = dataclasses.replace(settings, skip_long_prompts=True)
    manifest = collect(model, prompts, str(tmp_path / "t"), skipping, progress=False)
    assert manifest["complete"] and manifest["prompts_done"] == 4 and manifest["prompts_kept"] == 3
    assert [p.index for p in load_trajectories(str(tmp_path / "t")).prompts] == [0, 2, 3]


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid UTF-8"):
        read_prompt_file(str(path))


def test_eos_none_collects_past_the_configs_eos(tmp_path, byte_model):
    prompts = _prompts(count=3)
    settings = CollectSettings(block_size=4, max_new_tokens=17, shard_size=3)
    stopped = collect(byte_model, prompts, str(tmp_path / "a"), settings, progress=False)
    free = collect(byte_model, prompts, str(tmp_path / "b"), settings, eos_token_id=None, progress=False)
    assert stopped["settings"]["eos_token_ids"] == [EOS] and free["settings"]["eos_token_ids"] == []
    answers = [len(p.answer) for p in load_trajectories(str(tmp_path / "b")).prompts]
    assert answers == [17, 17, 17]


def test_bad_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        read_prompt_file(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tiny_lm(eos_token_id=EOS), tmp_path_factory.mktemp("model"), byte_tokenizer())


def _collect_args(model_dir, data, out, *extra):
    return ["collect", "--model", model_dir, "--data", data, "--out", out, "--block-size", "4",
            "--max-new-tokens", "12", "--shard-size", "2", *extra]


def test_cli_collect_then_bad_inputs_leave_nothing_behind(tmp_path, model_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": f"{i} + {i}?", "answer": str(2 * i)} for i in range(5)])
    out = str(tmp_path / "t")
    options = ["--prompt-template", r"Q: {question}\nA:", "--keep-reference"]
    cli_main(_collect_args(model_dir, data, out, *options))
    assert "5 prompts done (5 kept, 0 repetitive dropped) in 3 shards" in capsys.readouterr().out
    stored = load_trajectories(out)
    assert stored.manifest["settings"]["prompt_template"] == "Q: {question}\nA:"
    tokenizer = byte_tokenizer()
    assert stored.prompts[1].prompt == tokenizer("Q: 1 + 1?\nA:")["input_ids"]
    assert stored.prompts[1].reference == tokenizer("2")["input_ids"] + [EOS]

    for rows, message in (([], "holds no prompts"), ([{"text": "x"}], "no field 'prompt'")):
        bad = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(SystemExit) as exit_info:
            cli_main(_collect_args(model_dir, bad, str(tmp_path / "never")))
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "never")
    with pytest.raises(SystemExit):
        cli_main(_collect_args(model_dir, data, out, *options, "--block-size", "8"))
    assert "settings.block_size: 4 there, 8 now" in capsys.readouterr().err


def test_two_processes_split_shards_and_merge_one_manifest(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"prompt number {i}"} for i in range(7)])
    cli_main(_collect_args(model_dir, data, str(tmp_path / "one")))
    env = dict(os.environ, OMP_NUM_THREADS="1", CLLM_RT_ALLOW_FALLBACK="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "cllm_rt", *_collect_args(model_dir, data, str(tmp_path / "two"))],
                   check=True, env=env, capture_output=True, timeout=300)
    manifest = load_trajectories(str(tmp_path / "two")).manifest
    assert manifest["complete"] and manifest["prompts_done"] == 7 and len(manifest["shards"]) == 4
    assert _as_tuples(tmp_path / "two") == _as_tuples(tmp_path / "one")
