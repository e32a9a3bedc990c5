"""The prompts of ``cllm-rt collect``: a JSON-lines file read, tokenized and collected in one call."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..models import load_model
from ..runtime.inputs import NOT_GIVEN
from .collect import CollectSettings, Prompt, collect
from .distributed import torchrun_processes


@dataclass(frozen=True)
class PromptText:
    prompt: str
    reference: str | None


def read_prompt_file(path: str, prompt_template: str | None = None, keep_reference: bool = False) -> list[PromptText]:
    """Prompts of a JSON-lines file: field ``prompt``, or ``question`` formatted through ``prompt_template``
    (``{question}`` marks its place); ``answer`` is the reference, required with ``keep_reference``."""
    texts = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            if prompt_template is not None:
                if "question" not in row:
                    raise ValueError(f"{path}:{number}: no field 'question' for --prompt-template "
                                     f"(fields: {sorted(row)})")
                prompt = prompt_template.replace("{question}", str(row["question"]))  # other braces stay as written
            elif "prompt" in row:
                prompt = row["prompt"]
            else:
                raise ValueError(f"{path}:{number}: no field 'prompt' (fields: {sorted(row)}); give "
                                 "--prompt-template to format a 'question' field instead")
            if keep_reference and "answer" not in row:
                raise ValueError(f"{path}:{number}: no field 'answer' to keep as the reference (--keep-reference)")
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{path}:{number}: the prompt must be a non-empty string")
            texts.append(PromptText(prompt, str(row["answer"]) if keep_reference else None))
    if not texts:
        raise ValueError(f"{path} holds no prompts (the file is empty)")
    return texts


def collect_from_files(model: str, data_path: str, out_dir: str, settings: CollectSettings, *,
                       batch_size: int = 8, dtype: str = "auto", eos_token_id=NOT_GIVEN, progress: bool = True) -> dict:
    """``cllm-rt collect``: read and tokenize the data, load the model (a directory or a short name, see
    :func:`cllm_rt.models.load_model`) on this process's device, collect."""
    texts = read_prompt_file(data_path, settings.prompt_template, settings.keep_reference)
    with torchrun_processes() as processes:
        lm, tokenizer = load_model(model, dtype=dtype, device=processes.device)
        eos_suffix = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        # the reference ends with EOS, so the AR loss also teaches the model where to stop
        prompts = [Prompt(tokenizer(t.prompt)["input_ids"], None if t.reference is None else
                          tokenizer(t.reference, add_special_tokens=False)["input_ids"] + eos_suffix) for t in texts]
        return collect(lm, prompts, out_dir, settings, batch_size=batch_size, eos_token_id=eos_token_id,
                       tokenizer=tokenizer, processes=processes, progress=progress)
