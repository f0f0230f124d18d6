"""Text data: tokenizers, the corpus on disk, a memory-mapped token cache, packed sequences.

- `ByteTokenizer` (vocab 256, needs no files) by default, or any local tokenizer: a directory
  `AutoTokenizer.from_pretrained` reads, or a `tokenizers` `tokenizer.json` file.
- The default corpus is the Python standard library's source of the running interpreter
  (`sysconfig.get_paths()["stdlib"]`, every *.py outside site-packages, sorted): real text that
  every Python install carries, so no run downloads anything.
- Every document is tokenised once into `<cache_dir>/<key>/tokens.bin` (a numpy memmap; the key
  hashes the file list with sizes and mtimes, the tokenizer and the split), train documents
  first, then validation documents. The split is by document (about val_fraction of the
  tokens, whole files spread over the corpus), the same on every run and every machine.
- Sequences are consecutive windows of `seq_len` tokens; training visits them in a permutation
  per epoch drawn from (seed, epoch), so the sequence at global sample position p is a pure
  function of p: the data position in a checkpoint is one integer, and ranks shard a batch by
  taking disjoint slices of the same positions.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from zoo.tokenizer import ByteTokenizer
from zoo.train.config import DataSection, RunConfigError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
CACHE_FORMAT = 3
EXCLUDED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}


# ---------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    fingerprint: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A local Hugging Face (`AutoTokenizer`) directory or a `tokenizers` tokenizer.json.

    Documents are separated by the directory's eos token; a bare tokenizer.json names none, so
    its documents are concatenated without a separator.
    """

    def __init__(self, path: Path):
        if path.is_file():
            from tokenizers import Tokenizer as RawTokenizer

            self._raw = RawTokenizer.from_file(str(path))
            self._hf = None
            self.vocab_size = self._raw.get_vocab_size(with_added_tokens=True)
            files = [path]
        else:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self._raw = None
            self.vocab_size = len(self._hf)
            files = sorted(p for p in path.iterdir() if p.is_file())
        self.eos_id = self._hf.eos_token_id if self._hf is not None else None
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
        self.fingerprint = f"hf:{digest.hexdigest()[:16]}"

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        return self._raw.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids)
        return self._raw.decode(ids)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte", or the path of a local tokenizer directory or tokenizer.json file."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise RunConfigError(
            f"data.tokenizer={spec!r}: no such directory or file; allowed: 'byte', a local "
            "tokenizer directory (AutoTokenizer.from_pretrained) or a tokenizer.json file"
        )
    return HFTokenizer(path)


# ---------------------------------------------------------------------------------------------
# The corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    """Every *.py of the running interpreter's standard library (not site-packages), sorted."""
    root = stdlib_root()
    return sorted(
        p for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_STDLIB_DIRS.intersection(p.relative_to(root).parts)
    )


def expand_paths(paths: Sequence[str]) -> list[Path]:
    """Files, folders (their text files, recursively) and globs -> a sorted list of files."""
    found: set[Path] = set()
    for spec in paths:
        expanded = os.path.expanduser(spec)
        matches = [Path(m) for m in glob.glob(expanded, recursive=True)] if glob.has_magic(
            expanded) else [Path(expanded)]
        if not matches or not all(m.exists() for m in matches):
            raise RunConfigError(f"data.paths entry {spec!r} matches no file or folder")
        for match in matches:
            if match.is_dir():
                found.update(p for p in match.rglob("*")
                             if p.is_file() and p.suffix in TEXT_SUFFIXES)
            elif match.is_file():
                found.add(match)
    if not found:
        raise RunConfigError(
            f"data.paths={list(paths)!r} holds no text files (folders are searched for "
            f"{', '.join(TEXT_SUFFIXES)})"
        )
    return sorted(found)


def subset_by_size(files: list[Path], max_bytes: int | None) -> list[Path]:
    """A deterministic subset of about `max_bytes`: every k-th file of the sorted list (so every
    part of the corpus is represented), cut where the budget runs out.
    """
    if max_bytes is None:
        return files
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    if total <= max_bytes:
        return files
    stride = -(-total // max_bytes)  # ceil
    chosen: set[int] = set()
    budget = max_bytes
    for offset in range(stride):  # later passes fill the budget if the first falls short
        for i in range(offset, len(files), stride):
            if sizes[i] <= budget and i not in chosen:
                chosen.add(i)
                budget -= sizes[i]
        if budget < min(sizes):
            break
    return [files[i] for i in sorted(chosen)]


def corpus_files(data: DataSection) -> list[Path]:
    files = expand_paths(data.paths) if data.paths else default_corpus_files()
    if not files:
        raise RunConfigError("data.paths is empty and no standard-library source was found")
    return subset_by_size(files, data.max_bytes)


def is_validation_document(
    n_tokens: int, val_tokens: int, seen_tokens: int, val_fraction: float
) -> bool:
    """Hold a document out when that leaves the held-out share of the tokens seen so far (in
    sorted file order) closer to val_fraction than keeping it would: whole documents, spread
    over the corpus, about val_fraction of the tokens, the same split on every run.
    """
    total = seen_tokens + n_tokens
    return abs((val_tokens + n_tokens) / total - val_fraction) < abs(
        val_tokens / total - val_fraction)


# ---------------------------------------------------------------------------------------------
# The token cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zoo" / "tokens"


def cache_key(files: Sequence[Path], tokenizer: Tokenizer, val_fraction: float) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_FORMAT, tokenizer.fingerprint, val_fraction]).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


class TokenCache:
    """tokens.bin (train documents, then validation documents) + meta.json, in one folder."""

    def __init__(self, folder: Path):
        meta_path = folder / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as error:
            raise RuntimeError(f"token cache {folder} is unreadable ({error}); delete it") from None
        self.folder = folder
        dtype = np.dtype(self.meta["dtype"])
        n = self.meta["n_tokens"]
        expected = n * dtype.itemsize
        actual = (folder / "tokens.bin").stat().st_size
        if actual != expected:
            raise RuntimeError(
                f"token cache {folder} holds {actual} bytes, expected {expected}; delete it"
            )
        self.tokens = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
        self.n_train = self.meta["train_tokens"]

    @property
    def train(self) -> np.ndarray:
        return self.tokens[: self.n_train]

    @property
    def val(self) -> np.ndarray:
        return self.tokens[self.n_train:]


def build_token_cache(
    files: Sequence[Path], tokenizer: Tokenizer, val_fraction: float, cache_dir: Path,
    progress: bool = True,
) -> TokenCache:
    """Tokenise `files` once; later calls with the same files and tokenizer reuse the memmap.

    Written into a temporary folder and renamed, so a killed build leaves no half cache; two
    ranks building at once both succeed (the loser of the rename uses the winner's folder).
    """
    key = cache_key(files, tokenizer, val_fraction)
    folder = cache_dir / key
    if (folder / "meta.json").exists():
        return TokenCache(folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    from tqdm.auto import tqdm

    val_parts: list[np.ndarray] = []
    n_train = n_val = 0
    n_docs = [0, 0]
    with open(tmp / "tokens.bin", "wb") as out:
        for path in tqdm(files, desc="tokenising", unit="file",
                         disable=not progress, leave=False):
            raw = path.read_bytes()
            if isinstance(tokenizer, ByteTokenizer):
                ids = tokenizer.encode_array(raw).astype(dtype)
            else:
                ids = np.asarray(tokenizer.encode(raw.decode("utf-8", errors="replace")),
                                 dtype=dtype)
            if tokenizer.eos_id is not None:
                ids = np.append(ids, np.asarray([tokenizer.eos_id], dtype=dtype))
            if is_validation_document(len(ids), n_val, n_train + n_val, val_fraction):
                val_parts.append(ids)
                n_val += len(ids)
                n_docs[1] += 1
            else:
                out.write(ids.tobytes())
                n_train += len(ids)
                n_docs[0] += 1
        for ids in val_parts:
            out.write(ids.tobytes())
        out.flush()
        os.fsync(out.fileno())
    meta = {
        "format": CACHE_FORMAT, "dtype": np.dtype(dtype).name, "n_tokens": n_train + n_val,
        "train_tokens": n_train, "val_tokens": n_val, "train_documents": n_docs[0],
        "val_documents": n_docs[1], "tokenizer": tokenizer.fingerprint,
        "files": [str(f) for f in files],
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, folder)
    except OSError:  # another process finished first: its cache is the same tokens
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache(folder)


# ---------------------------------------------------------------------------------------------
# Datasets: the trainer's view


class Dataset(Protocol):
    """Sequences addressed by global sample position; labels -100 where nothing is scored."""

    vocab_size: int  # the largest token id + 1 the data can hold
    has_accuracy: bool  # synthetic tasks: accuracy on the answer positions is meaningful
    num_val: int

    def train_batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...

    def val_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


class PackedTextDataset:
    """Consecutive windows of seq_len tokens over the cached train / validation tokens."""

    has_accuracy = False

    def __init__(self, cache: TokenCache, seq_len: int, seed: int, vocab_size: int):
        self.cache, self.seq_len, self.seed, self.vocab_size = cache, seq_len, seed, vocab_size
        self.num_train = len(cache.train) // seq_len
        self.num_val = len(cache.val) // seq_len
        if self.num_train < 1:
            raise RunConfigError(
                f"train.seq_len={seq_len} is longer than the training split "
                f"({len(cache.train)} tokens); use more data (data.paths, data.max_bytes) or "
                "shorter sequences"
            )
        if self.num_val < 1:
            raise RunConfigError(
                f"the validation split holds {len(cache.val)} tokens, fewer than "
                f"train.seq_len={seq_len}; raise data.val_fraction or use more data"
            )
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.num_train)
        return self._order

    def _windows(self, tokens: np.ndarray, windows: np.ndarray) -> tuple[torch.Tensor, ...]:
        starts = windows.astype(np.int64) * self.seq_len
        rows = np.stack([np.asarray(tokens[s: s + self.seq_len]) for s in starts])
        ids = torch.from_numpy(rows.astype(np.int64))
        return ids, ids.clone()

    def train_batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        windows = np.empty_like(positions)
        for i, p in enumerate(positions):
            epoch, offset = divmod(int(p), self.num_train)
            windows[i] = self.order(epoch)[offset]
        return self._windows(self.cache.train, windows)

    def val_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(self.cache.val, np.asarray(indices) % self.num_val)


def build_dataset(
    data: DataSection, seq_len: int, seed: int, model_vocab_size: int, progress: bool = True,
) -> tuple[Dataset, Tokenizer | None]:
    """The dataset the run config names, and its tokenizer (None for synthetic tasks)."""
    if data.source != "text":
        from zoo.train.synthetic import build_task

        if data.vocab_size > model_vocab_size:
            raise RunConfigError(
                f"data.vocab_size={data.vocab_size} exceeds the model's vocab_size "
                f"({model_vocab_size}); the task's tokens must be ids the model has"
            )
        return build_task(data, seq_len, seed), None
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > model_vocab_size:
        raise RunConfigError(
            f"data.tokenizer {data.tokenizer!r} has {tokenizer.vocab_size} tokens but the model "
            f"has vocab_size={model_vocab_size}; set model.overrides.vocab_size="
            f"{tokenizer.vocab_size} (or more)"
        )
    files = corpus_files(data)
    cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    cache = build_token_cache(files, tokenizer, data.val_fraction, cache_dir, progress=progress)
    return PackedTextDataset(cache, seq_len, seed, tokenizer.vocab_size), tokenizer
