"""Teacher logits cached on disk, so every student distilled from one teacher on one corpus
reads them instead of running the teacher again (`distill.teacher_logits: cache`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch


class TeacherLogitsCache:
    """Per training window: the teacher's top-k (or full) logits, as float16 memmaps.

    <root>/<key>/values.f16 (N, T, k), indices.bin (N, T, k) (absent when full), filled.u8 (N,),
    meta.json. Windows are filled lazily and flushed as they are written; `filled` is set only
    after a window's values are written, so a killed run leaves no half-filled window marked.
    """

    def __init__(self, root: Path, key_parts: Mapping[str, Any], num_windows: int, seq_len: int,
                 top_k: int, vocab_size: int):
        key = hashlib.sha256(json.dumps(dict(key_parts), sort_keys=True).encode()).hexdigest()
        self.folder = root / key[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.top_k = top_k
        width = top_k or vocab_size
        shape = (num_windows, seq_len, width)
        meta = {**key_parts, "shape": list(shape), "full": top_k == 0}
        meta_file = self.folder / "meta.json"
        if not meta_file.exists():
            meta_file.write_text(json.dumps(meta, indent=1))
        self.values = self._open("values.f16", np.float16, shape)
        self.indices = None
        if top_k:
            index_dtype = np.uint16 if vocab_size <= 2**16 else np.int32
            self.indices = self._open("indices.bin", index_dtype, shape)
        self.filled = self._open("filled.u8", np.uint8, (num_windows,))

    def _open(self, name: str, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
        path = self.folder / name
        mode = "r+" if path.exists() else "w+"  # w+ creates a sparse, zero-filled file
        return np.memmap(path, dtype=dtype, mode=mode, shape=shape)

    @property
    def filled_fraction(self) -> float:
        return float(self.filled.mean())

    def get(self, windows: np.ndarray, compute) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The teacher logits of `windows` (full (B, T, V) or (indices, values) (B, T, k));
        compute(missing_rows) -> logits (b, T, V) fills the windows not cached yet."""
        missing = [i for i, w in enumerate(windows) if not self.filled[w]]
        if missing:
            logits = compute(missing).float()
            if self.top_k:
                values, indices = logits.topk(self.top_k, dim=-1)
            else:
                values, indices = logits, None
            for row, i in enumerate(missing):
                w = windows[i]
                self.values[w] = values[row].cpu().numpy().astype(np.float16)
                if indices is not None:
                    self.indices[w] = indices[row].cpu().numpy().astype(self.indices.dtype)
            self.values.flush()
            if self.indices is not None:
                self.indices.flush()
            self.filled[[windows[i] for i in missing]] = 1
            self.filled.flush()
        values = torch.from_numpy(np.stack([self.values[w] for w in windows]).astype(np.float32))
        if not self.top_k:
            return values
        indices = torch.from_numpy(np.stack([self.indices[w] for w in windows]).astype(np.int64))
        return indices, values
