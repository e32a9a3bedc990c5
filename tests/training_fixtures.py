"""Small model directories, a byte tokenizer and data files for the collection/training tests (no downloads)."""

import json
import os

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS, PAD = 256, 257  # byte ids are the bytes themselves; the two specials follow


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every UTF-8 byte is one token (id = byte value), plus <eos> and <pad>."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte-to-unicode table: the ByteLevel pre-tokenizer maps each byte to one of these characters
    rest = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(rest)}
    vocab = {chars[b]: b for b in range(256)} | {"<eos>": EOS, "<pad>": PAD}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def tiny_lm(vocab_size: int = 258, seed: int = 0, dtype=torch.float32, init_std: float | None = 0.3,
            **config) -> transformers.PreTrainedModel:
    """A Llama of two 32-wide layers; ``init_std`` 0.3 gives peaked, varied greedy continuations."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
                    eos_token_id=None, pad_token_id=0, tie_word_embeddings=False) | config
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**settings), dtype=dtype)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, init_std)
    model.generation_config.eos_token_id = settings["eos_token_id"]
    model.generation_config.pad_token_id = 0
    return model.eval()


def save_model(model, path, tokenizer=None) -> str:
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory)) if os.path.isdir(directory) else []
