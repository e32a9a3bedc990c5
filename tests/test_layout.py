"""The package's rooms and what each may import (docs/ARCHITECTURE.md), checked on the source and at run time."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "cllm_rt"

# room -> rooms it must never import (a room is a top-level module or subpackage of cllm_rt)
FORBIDDEN = {
    "ops": {"runtime", "training", "demo", "cli", "models", "hf", "hf_generate", "serve"},
    "runtime": {"training", "demo", "cli", "hf", "hf_generate", "serve"},
    "models": {"runtime", "training", "demo", "cli", "hf", "hf_generate", "serve"},
    "quantize": {"runtime", "training", "demo", "cli", "models", "hf", "hf_generate", "serve", "draft_head"},
    "draft_head": {"ops", "runtime", "models", "training", "demo", "cli", "hf", "hf_generate", "serve"},
    "training": {"demo", "cli", "hf", "hf_generate", "serve"},
    "demo": {"cli", "hf", "hf_generate", "serve"},
    # clients of the runtime that nothing imports but the CLI (serve) and hf's custom_generate shim (hf_generate)
    "hf": {"training", "demo", "cli", "serve", "hf_generate"},
    "hf_generate": {"runtime", "models", "training", "demo", "cli", "serve"},
    "serve": {"training", "demo", "cli", "hf", "hf_generate"},
    # the vLLM proposer: draft sources and the cost model only (vLLM's worker loads it; it imports no torch)
    "vllm": {"ops", "training", "demo", "cli", "hf", "hf_generate", "serve", "models"},
}


def _room(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_rooms(path: pathlib.Path) -> set[str]:
    """Rooms of cllm_rt that ``path`` imports (absolute ``cllm_rt.x`` or relative ``from ..x``)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for cllm_rt/x.py, 1 for cllm_rt/room/x.py
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "cllm_rt":
                    rooms |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
            elif node.level > depth:  # climbs to the package root: the next name is a room
                parts = (node.module or "").split(".")
                rooms |= {parts[0]} if parts[0] else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            rooms |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cllm_rt.")}
    return rooms


def test_the_import_checker_sees_relative_and_absolute_imports(tmp_path):
    assert _imported_rooms(PACKAGE / "training" / "collect.py") >= {"runtime"}
    assert "cli" in _imported_rooms(PACKAGE / "__main__.py")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_rooms_import_only_what_they_may(path):
    room = _room(path)
    bad = _imported_rooms(path) & FORBIDDEN.get(room, set())
    assert not bad, f"{path.relative_to(PACKAGE)} ({room}) imports {sorted(bad)}"
    if path.name != "__main__.py":
        assert "cli" not in _imported_rooms(path) or room == "cli", "only __main__ imports the CLI"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
                         check=True, capture_output=True, text=True, timeout=120)
    return set(out.stdout.split())


def test_import_cllm_rt_pulls_in_no_training_or_demo():
    modules = _modules_after("import cllm_rt; cllm_rt.generate; cllm_rt.ops")
    assert "cllm_rt.runtime.decoding" in modules and "cllm_rt.ops" in modules
    unwanted = {m for m in modules if m.startswith(("cllm_rt.training", "cllm_rt.demo", "matplotlib",
                                                    "sentencepiece", "cllm_rt.cli"))}
    assert not unwanted


def test_cli_help_imports_no_torch():
    modules = _modules_after("from cllm_rt.cli import build_parser; build_parser().format_help()")
    assert "torch" not in modules and not any(m.startswith(("cllm_rt.runtime", "cllm_rt.training")) for m in modules)
