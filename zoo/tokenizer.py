"""The byte-level tokenizer of zoo's vocabulary-256 models, and the test for a folder that holds a
tokenizer of its own; training (zoo.train.data) and generation (zoo.infer.text) share both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# the files by which AutoTokenizer.from_pretrained recognises a saved tokenizer: a fast
# tokenizer, its config, a sentencepiece model, or a BPE vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: Path) -> bool:
    """Whether `folder` holds a saved tokenizer (any of TOKENIZER_FILES)."""
    return any((folder / name).exists() for name in TOKENIZER_FILES)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255. Byte 0 (NUL, absent from text) separates documents."""

    vocab_size = 256
    eos_id = 0
    fingerprint = "byte"
    # transformers' name, which generation reads as a stop token: None, because NUL ends a
    # training document, not a reply; a byte-level model stops at its config's eos_token_id
    eos_token_id = None

    def encode(self, text: str | bytes) -> list[int]:
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return list(data)

    def encode_array(self, data: bytes) -> np.ndarray:
        """`encode` for a whole file's bytes at once, without a Python list."""
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
