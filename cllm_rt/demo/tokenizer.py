"""A small SentencePiece tokenizer trained on the demo's training text, wrapped as a Hugging Face tokenizer.

SentencePiece (Kudo & Richardson 2018) learns a unigram vocabulary with byte fallback, so any text — code
indentation, tabs, newlines, non-Latin characters — encodes and decodes back exactly. The wrapper is a
``transformers.PreTrainedTokenizerFast`` over a ``tokenizers`` Unigram model built from the SentencePiece
pieces and scores, so it is saved with a model and reloaded by ``AutoTokenizer.from_pretrained`` with no
sentencepiece (or protobuf, which transformers' own converters need) at load time.

Choices: identity normalization and no dummy prefix (text is encoded exactly as written); spaces are
SentencePiece's ``▁``; digits are split (the model reads numbers digit by digit, as Llama does); runs of
4 and 8 spaces are whole pieces so indented code stays short; ids 0-3 are ``<unk> <s> </s> <pad>``; the
tokenizer prepends ``<s>`` and the models end answers with ``</s>``.
"""

from __future__ import annotations

import io
import os
from typing import Iterable

SPM_FILE = "spm.model"
SPECIALS = {"unk": (0, "<unk>"), "bos": (1, "<s>"), "eos": (2, "</s>"), "pad": (3, "<pad>")}
# SentencePiece reads one "sentence" at a time: longer ones are skipped, so documents are cut at line ends
_MAX_SENTENCE_BYTES = 8192
USER_SYMBOLS = ["\n", "\t", "    ", "        "]  # matched whole, never split or merged


def _chunks(texts: Iterable[str], max_bytes: int = _MAX_SENTENCE_BYTES - 16) -> Iterable[str]:
    for text in texts:
        current = ""
        for line in text.splitlines(keepends=True):
            if len((current + line).encode("utf-8")) > max_bytes:
                if current:
                    yield current
                current = line[: max_bytes // 4]
            else:
                current += line
        if current:
            yield current


def train_sentencepiece(texts: Iterable[str], vocab_size: int = 4096, threads: int = 2) -> bytes:
    """Train a unigram SentencePiece model on ``texts`` (in the order given: no sampling, so the result
    depends only on the texts) and return its serialized bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_chunks(texts))), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=USER_SYMBOLS, character_coverage=0.9995,
        max_sentence_length=_MAX_SENTENCE_BYTES, hard_vocab_limit=False, shuffle_input_sentence=False, num_threads=threads,
        unk_id=SPECIALS["unk"][0], bos_id=SPECIALS["bos"][0], eos_id=SPECIALS["eos"][0],
        pad_id=SPECIALS["pad"][0], unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        minloglevel=2)
    return model.getvalue()


def hf_tokenizer_from_sentencepiece(model_file: str):
    """A ``PreTrainedTokenizerFast`` that segments like the SentencePiece unigram model in ``model_file``."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=SPECIALS["unk"][0], byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    # user-defined pieces (newline, tab, indentation) are matched whole before segmentation, as in SentencePiece
    # (SentencePiece stores them raw, e.g. four spaces, not "▁▁▁▁": they are matched before normalization)
    assert all(sp.piece_to_id(p) != sp.unk_id() for p in USER_SYMBOLS), "user-defined pieces missing"
    tokenizer.add_tokens([AddedToken(p, normalized=False, special=False) for p in USER_SYMBOLS])
    bos, eos = SPECIALS["bos"], SPECIALS["eos"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos[1]} $A", pair=f"{bos[1]} $A {bos[1]} $B", special_tokens=[(bos[1], bos[0])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos[1], eos_token=eos[1],
                                   unk_token=SPECIALS["unk"][1], pad_token=SPECIALS["pad"][1],
                                   padding_side="left", clean_up_tokenization_spaces=False)


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 4096):
    """Train SentencePiece on ``texts``; save ``spm.model`` and the Hugging Face tokenizer in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    model_file = os.path.join(out_dir, SPM_FILE)
    with open(model_file, "wb") as f:
        f.write(train_sentencepiece(texts, vocab_size))
    tokenizer = hf_tokenizer_from_sentencepiece(model_file)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
