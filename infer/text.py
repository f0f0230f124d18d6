"""Text in, text out: a model loaded with its tokenizer, from whatever a person names.

Tokenizers: the model directory's own (transformers' AutoTokenizer) when it has one, the
imported source's for `zoo.from_hf` sources, and a byte-level one (UTF-8 bytes are the ids) for
vocabulary-256 models, which is what zoo's tiny and small configs are.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zoo.model import ZooForCausalLM
from zoo.tokenizer import ByteTokenizer, has_tokenizer_files


def load_for_generation(
    spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[ZooForCausalLM, object, str | None]:
    """(model, tokenizer, note) from a zoo directory, a from_hf source or a config name.

    The note says what the user should know (untrained weights), or is None.
    """
    from zoo.config import load_config
    from zoo.hf_import import is_hf_source

    path, note = Path(spec), None
    if is_hf_source(spec):
        from zoo.hf_import import from_hf

        model = from_hf(spec, dtype=dtype)
        tokenizer = model.tokenizer
    elif path.is_dir() and (path / "config.json").exists():
        model = ZooForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = None
        if has_tokenizer_files(path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        config = load_config(spec)
        model = ZooForCausalLM(config).to(dtype)
        tokenizer = None
        note = (f"{spec} is a config, not a checkpoint: the weights are random (untrained), "
                "so the text is noise")
    if tokenizer is None:
        if model.config.vocab_size != 256:
            raise ValueError(
                f"{spec}: no tokenizer found and vocab_size={model.config.vocab_size} is not "
                "the byte-level 256; save the tokenizer into the model directory"
            )
        tokenizer = ByteTokenizer()
    return model.to(device).eval(), tokenizer, note
