"""Synthetic tasks the efficient-architecture literature compares mixers on.

Each task is a dataset of sequences (B, T) with labels -100 everywhere but the answer positions,
in the Hugging Face convention (labels line up with input_ids; the model shifts), so the same
loss serves text and tasks, and accuracy = argmax at the answer positions.

- MQAR, multi-query associative recall (zoology, Arora et al. 2023): key-value pairs, then the
  keys asked again in another order; the value must be recalled. Keys from [1, V/2), values
  from [V/2, V), token 0 fills the gaps. A query's slot is uniform by default; zoology draws it
  from a power law (`query_gap_power` 0.01, its `power_a`), so most queries come soon after the
  context, as a repeated bigram does in text.
- Selective copying (Mamba, Gu & Dao 2023, section 3.1): data tokens scattered among blank
  tokens (0), a separator (1), then the data tokens in order.
- Induction heads (Mamba, section 3.1; Olsson et al. 2022): random tokens with a trigger token
  (0) once in the middle, followed by some token x; the trigger again at the end: predict x.

Sample p of the training stream is drawn from a generator seeded by (seed, 0, p), validation
sample i from (seed, 1, i): a pure function of its position, like the text data.
"""

from __future__ import annotations

import numpy as np
import torch

from zoo.train.config import DataSection, RunConfigError

IGNORE = -100
NUM_VAL = 1 << 30  # validation samples are generated, so there are as many as asked for


class SyntheticTask:
    has_accuracy = True
    num_val = NUM_VAL

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One sequence (T,) of token ids and its mask (T,) of answer positions."""
        raise NotImplementedError

    def _batch(self, split: int, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids, masks = zip(*(self.sample(np.random.default_rng([self.seed, split, int(i)]))
                           for i in indices))
        ids = torch.from_numpy(np.stack(ids).astype(np.int64))
        labels = ids.masked_fill(~torch.from_numpy(np.stack(masks)), IGNORE)
        return ids, labels

    def train_batch(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(0, positions)

    def val_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(1, indices)


class MQAR(SyntheticTask):
    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_kv_pairs: int,
                 query_gap_power: float = 1.0):
        super().__init__(vocab_size, seq_len, seed)
        self.num_kv_pairs = k = num_kv_pairs
        key_vocab = vocab_size // 2
        if k > key_vocab - 1 or k > vocab_size - key_vocab:
            raise RunConfigError(
                f"data.num_kv_pairs={k} needs distinct keys and values: at most "
                f"{min(key_vocab - 1, vocab_size - key_vocab)} for data.vocab_size={vocab_size}"
            )
        if seq_len < 4 * k:
            raise RunConfigError(
                f"train.seq_len={seq_len} is too short for data.num_kv_pairs={k}: MQAR needs "
                f"at least 4 x num_kv_pairs = {4 * k} tokens (context + queries)"
            )
        if not 0 < query_gap_power <= 1:
            raise RunConfigError(f"MQAR query_gap_power={query_gap_power!r} must be in (0, 1] "
                                 "(1: uniform query slots; zoology uses 0.01)")
        self.query_gap_power = query_gap_power
        # zoology's power law over the query slots after the context: P(slot i) ~ (i+1)^(a-1)
        slots = (seq_len - 2 * k) // 2
        weights = np.arange(1, slots + 1, dtype=np.float64) ** (query_gap_power - 1)
        self._slot_probabilities = None if query_gap_power == 1 else weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        k, half = self.num_kv_pairs, self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), size=k, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=k, replace=False)
        ids = np.zeros(self.seq_len, dtype=np.int64)
        mask = np.zeros(self.seq_len, dtype=bool)
        ids[0: 2 * k: 2], ids[1: 2 * k: 2] = keys, values
        # Queries sit in pairs of slots after the context, at random places, in random order.
        slots = np.sort(rng.choice((self.seq_len - 2 * k) // 2, size=k, replace=False,
                                   p=self._slot_probabilities))
        asked = rng.permutation(k)
        where = 2 * k + 2 * slots
        ids[where], ids[where + 1] = keys[asked], values[asked]
        mask[where + 1] = True
        return ids, mask


class SelectiveCopying(SyntheticTask):
    BLANK, SEPARATOR = 0, 1

    def __init__(self, vocab_size: int, seq_len: int, seed: int, num_tokens: int):
        super().__init__(vocab_size, seq_len, seed)
        self.num_tokens = n = num_tokens
        if seq_len < 2 * n + 1:
            raise RunConfigError(
                f"train.seq_len={seq_len} is too short for data.num_tokens={n}: selective "
                f"copying needs at least 2 x num_tokens + 1 = {2 * n + 1} tokens"
            )

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        n = self.num_tokens
        region = self.seq_len - n - 1
        data = rng.integers(2, self.vocab_size, size=n)
        ids = np.full(self.seq_len, self.BLANK, dtype=np.int64)
        ids[np.sort(rng.choice(region, size=n, replace=False))] = data
        ids[region] = self.SEPARATOR
        ids[region + 1:] = data
        mask = np.zeros(self.seq_len, dtype=bool)
        mask[region + 1:] = True
        return ids, mask


class InductionHeads(SyntheticTask):
    TRIGGER = 0

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        super().__init__(vocab_size, seq_len, seed)
        if seq_len < 6:
            raise RunConfigError(f"train.seq_len={seq_len}: induction heads needs at least 6")

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids = rng.integers(1, self.vocab_size, size=self.seq_len)
        at = int(rng.integers(0, self.seq_len - 3))
        ids[at] = self.TRIGGER
        ids[-2], ids[-1] = self.TRIGGER, ids[at + 1]
        mask = np.zeros(self.seq_len, dtype=bool)
        mask[-1] = True
        return ids, mask


def build_task(data: DataSection, seq_len: int, seed: int) -> SyntheticTask:
    if data.source == "mqar":
        return MQAR(data.vocab_size, seq_len, seed, data.num_kv_pairs)
    if data.source == "selective_copying":
        return SelectiveCopying(data.vocab_size, seq_len, seed, data.num_tokens)
    if data.source == "induction_heads":
        return InductionHeads(data.vocab_size, seq_len, seed)
    raise RunConfigError(
        f"data.source={data.source!r} is not a synthetic task; allowed: mqar, "
        "selective_copying, induction_heads"
    )
