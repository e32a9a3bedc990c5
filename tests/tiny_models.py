"""Tiny random-init decoder-only models of every supported architecture (no downloads)."""

import torch
import transformers

# Two layers, GQA (4 query heads over 2 KV heads), a vocabulary small enough to keep float64 forwards cheap.
_COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=None,
               pad_token_id=0, tie_word_embeddings=False)

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=8),
    "phi3": lambda: transformers.Phi3Config(**_COMMON),
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=8),
}


def tiny_model(arch: str = "llama", dtype=torch.float64, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Larger weights than HF's 0.02 init give peaked, varied greedy continuations instead of one repeated token.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(batch: int, lengths: list[int], vocab: int = 101, seed: int = 0):
    """Left-padded prompts (pad id 0) and their attention mask, as a tokenizer with padding_side='left' gives."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids, mask
