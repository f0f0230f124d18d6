"""Decoding benchmarks of zoo.infer: the lean loop against transformers' generate.

    zoo bench decode              ms/token at 128, 1k, 8k context, every shipped tiny config,
                                  next to transformers' generate on the matching HF model
    zoo bench decode-delta-rule   the same, on the tiny configs with a delta-rule layer only
    zoo bench decode-smollm2      SmolLM2-135M: ms/token at 128 context vs the weight-read bound
    zoo bench speculative         SmolLM2-135M with a layer-truncated copy of itself as draft

Per-token times are medians of the intervals between consecutive decode steps (a
LogitsProcessor stamps transformers' steps, the loop's own steps stamp zoo's), so the prefill
is never mixed in and one slow step on a shared machine does not move the figure.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from zoo.app.bench.harness import BenchOptions, format_rows, line_plot, register_bench
from zoo.app.decode_timer import (
    NEW_TOKENS,
    read_bandwidth,
    time_decode,
    weight_bytes,
    without_gc,
)
from zoo.config import ZooConfig, load_config, shipped_configs
from zoo.model import ZooForCausalLM

# --- timing ------------------------------------------------------------------------------------

class _StepClock:
    """A transformers logits processor that only records when each step reached it."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _median_interval_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(b - a for a, b in zip(times, times[1:]))


@torch.no_grad()
def hf_generate_ms_per_token(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS) -> float:
    """transformers' generate (greedy): the median time between consecutive steps."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0,
                   eos_token_id=None, logits_processor=LogitsProcessorList([clock]))
    return _median_interval_ms(clock.times)


def _zoo_ms(model: ZooForCausalLM, ids: torch.Tensor, new_tokens: int,
            compile: bool | str = False) -> float:
    return time_decode(model, ids, new_tokens, compile=compile).ms_per_token


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the transformers model of the same shape -------------------------------------------------

def _plain_layers(config: ZooConfig) -> bool:
    return not config.layers


def _stack_shapes(config: ZooConfig, mixer_shape, moe_shape):
    """(blocks, {kind: shape}) of a config whose every mixer and FFN has a shape in a peer
    family (`mixer_shape` / `moe_shape` give None otherwise, dense SwiGLU FFNs are "dense") and
    whose layers of one kind share one shape, as transformers' hybrid configs require; else None."""
    from zoo.layers.ffn import SwiGLU
    from zoo.layers.moe import MoE

    if config.norm != "rms" or config.embed_norm:
        return None
    with torch.device("meta"):  # the built modules resolve every default
        blocks = list(ZooForCausalLM(config).model.layers)
    shapes = {}  # kind -> its one shape
    for block in blocks:
        ffn = block.ffn
        if isinstance(ffn, MoE):
            ffn_shape = moe_shape(ffn)
        elif type(ffn) is SwiGLU and ffn.gate_proj.bias is None:
            ffn_shape = ("dense", ffn.gate_proj.out_features)
        else:
            return None
        for shape in (mixer_shape(block.mixer), ffn_shape):
            if shape is None or shapes.setdefault(shape[0], shape) != shape:
                return None
    return blocks, shapes


def kimi_linear_peer(config: ZooConfig):
    """("KimiLinearForCausalLM", a transformers Kimi Linear model of the same stack with random
    weights) for a zoo config of KDA and MLA layers with SwiGLU and sigmoid-routed MoE FFNs, as
    Kimi Linear lays them out (kimi-linear-tiny), or None: Kimi Linear has one KDA, one MLA, one
    dense and one MoE shape per model, and at least one MLA layer. It never ties its head, so
    the peer of a tied zoo model holds one more matrix (each decode step multiplies by one head
    either way)."""
    from transformers import KimiLinearConfig, KimiLinearForCausalLM

    from zoo.layers.kda import KimiDeltaAttention
    from zoo.layers.mla import LATENT_NORM_EPS, MultiHeadLatentAttention
    from zoo.layers.moe import MoE

    def kda_shape(m) -> tuple | None:  # Kimi Linear's low ranks are head_dim; no conv bias
        if (m.conv1d is None or m.conv1d.bias is not None or m.value_dim != m.head_dim
                or m.allow_neg_eigval or m.f_a_proj.out_features != m.head_dim
                or m.g_a_proj.out_features != m.head_dim):
            return None
        return ("kda", m.n_heads, m.head_dim, m.conv_size)

    def mla_shape(m) -> tuple | None:  # transformers' latent norms have a fixed epsilon
        if m.kv_a_layernorm.eps != LATENT_NORM_EPS:
            return None
        return ("mla", m.n_heads, m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim,
                m.qk_rope_head_dim, m.v_head_dim, m.o_proj.bias is not None)

    def moe_shape(f) -> tuple | None:  # sigmoid router, SwiGLU experts, plain shared experts
        shared = f.shared_experts
        shared_hidden = 0 if shared is None else shared.gate_proj.out_features
        if (f.router_scoring != "sigmoid" or f.experts.expert_type != "swiglu"
                or getattr(f, "shared_expert_gate", None) is not None
                or shared_hidden % f.hidden_size):
            return None
        return ("sparse", f.n_experts, f.top_k, f.hidden_size, shared_hidden // f.hidden_size,
                f.normalize_weights, f.n_expert_groups, f.top_k_groups,
                f.routed_scaling_factor)

    def mixer_shape(m) -> tuple | None:
        if isinstance(m, KimiDeltaAttention):
            return kda_shape(m)
        return mla_shape(m) if isinstance(m, MultiHeadLatentAttention) else None

    found = _stack_shapes(config, mixer_shape, moe_shape)
    if found is None:
        return None
    blocks, shapes = found
    if "mla" not in shapes:
        # transformers' Kimi Linear cannot run without a full-attention layer: its cache then
        # has no layer to count the tokens seen (get_seq_length raises), so no KDA-only peer
        return None
    kda, mla = shapes.get("kda"), shapes.get("mla")
    dense, sparse = shapes.get("dense"), shapes.get("sparse")
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        num_hidden_layers=config.n_layers, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=False, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        layer_types=["linear_attention" if isinstance(b.mixer, KimiDeltaAttention)
                     else "full_attention" for b in blocks],
        mlp_layer_types=["sparse" if isinstance(b.ffn, MoE) else "dense" for b in blocks],
    )
    if kda is not None:
        fields.update(linear_num_heads=kda[1], linear_head_dim=kda[2],
                      linear_conv_kernel_dim=kda[3])
    if mla is not None:
        fields.update(num_attention_heads=mla[1], num_key_value_heads=mla[1],
                      q_lora_rank=mla[2], kv_lora_rank=mla[3], qk_nope_head_dim=mla[4],
                      qk_rope_head_dim=mla[5], v_head_dim=mla[6], attention_bias=mla[7])
    if dense is not None:
        fields.update(intermediate_size=dense[1])
    if sparse is not None:
        fields.update(num_experts=sparse[1], num_experts_per_token=sparse[2],
                      moe_intermediate_size=sparse[3], num_shared_experts=sparse[4],
                      moe_renormalize=sparse[5], num_expert_group=sparse[6],
                      topk_group=sparse[7], routed_scaling_factor=sparse[8])
    return "KimiLinearForCausalLM", KimiLinearForCausalLM(KimiLinearConfig(**fields))


def qwen3_next_peer(config: ZooConfig):
    """("Qwen3NextForCausalLM", a transformers Qwen3-Next of the same stack with random
    weights) for a zoo config of gated_deltanet and attention layers with SwiGLU FFNs or
    Qwen3-Next's MoE (softmax router, one gated shared expert), as `zoo.from_hf` maps Qwen3-Next
    (gated-deltanet-hybrid-tiny), or None: Qwen3-Next has one Gated DeltaNet, one attention,
    one dense and one MoE shape per model, and needs an attention layer (transformers' cache
    counts the tokens seen on one); a stack without Gated DeltaNet is Llama's or Mixtral's.
    Qwen3-Next's attention always carries q/k norms and the output gate (q_proj twice as
    wide): the peer of a plain-attention zoo stack does that much more work per attention
    layer, counted in its parameters."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from zoo.layers.attention import Attention
    from zoo.layers.gated_deltanet import GatedDeltaNet
    from zoo.layers.moe import MoE

    def deltanet_shape(m) -> tuple | None:  # Qwen3-Next's conv has no bias; its gate is SiLU
        if (m.conv1d is None or m.conv1d.bias is not None or m.g_proj is None
                or m.allow_neg_eigval):
            return None
        return ("linear_attention", m.n_heads, m.n_value_heads, m.head_dim, m.value_dim,
                m.conv_size)

    def attention_shape(m) -> tuple | None:
        has_bias = m.q_proj.bias is not None
        if m.window is not None or m.rotary is None or (m.o_proj.bias is not None) != has_bias:
            return None
        return ("full_attention", m.n_heads, m.n_kv_heads, m.head_dim, has_bias,
                m.rotary.theta, m.rotary.head_dim / m.head_dim)

    def moe_shape(f) -> tuple | None:  # softmax router, SwiGLU experts, one gated shared expert
        if (getattr(f, "router_scoring", "softmax") != "softmax"
                or getattr(f, "expert_bias", None) is not None
                or f.experts.expert_type != "swiglu" or f.shared_experts is None
                or f.shared_expert_gate is None):
            return None
        return ("sparse", f.n_experts, f.top_k, f.hidden_size,
                f.shared_experts.gate_proj.out_features, f.normalize_weights)

    def mixer_shape(m) -> tuple | None:
        if type(m) is GatedDeltaNet:
            return deltanet_shape(m)
        return attention_shape(m) if isinstance(m, Attention) else None

    found = _stack_shapes(config, mixer_shape, moe_shape)
    if found is None:
        return None
    blocks, shapes = found
    attention, deltanet = shapes.get("full_attention"), shapes.get("linear_attention")
    # without a Gated DeltaNet layer Llama or Mixtral is the peer; without an attention layer
    # transformers' Qwen3-Next cannot generate
    if attention is None or deltanet is None:
        return None
    dense, sparse = shapes.get("dense"), shapes.get("sparse")
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        num_hidden_layers=config.n_layers, rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        layer_types=["linear_attention" if type(b.mixer) is GatedDeltaNet else "full_attention"
                     for b in blocks],
        num_attention_heads=attention[1], num_key_value_heads=attention[2],
        head_dim=attention[3], attention_bias=attention[4],
        rope_parameters={"rope_type": "default", "rope_theta": attention[5],
                         "partial_rotary_factor": attention[6]},
        max_position_embeddings=16384,
        linear_num_key_heads=deltanet[1], linear_num_value_heads=deltanet[2],
        linear_key_head_dim=deltanet[3], linear_value_head_dim=deltanet[4],
        linear_conv_kernel_dim=deltanet[5],
        num_experts=0 if sparse is None else sparse[1],
        mlp_only_layers=[i for i, b in enumerate(blocks) if not isinstance(b.ffn, MoE)],
    )
    if dense is not None:
        fields.update(intermediate_size=dense[1])
    if sparse is not None:
        fields.update(num_experts_per_tok=sparse[2], moe_intermediate_size=sparse[3],
                      shared_expert_intermediate_size=sparse[4], norm_topk_prob=sparse[5])
    return "Qwen3NextForCausalLM", Qwen3NextForCausalLM(Qwen3NextConfig(**fields))


def transformers_peer(config: ZooConfig):
    """(label, a transformers model of the same shape with random weights), or None."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
        MambaConfig,
        MambaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        RwkvConfig,
        RwkvForCausalLM,
    )

    from zoo.layers.ffn import swiglu_hidden_size

    mixer, ffn = dict(config.mixer), dict(config.ffn or {})
    kind, ffn_kind = mixer.get("type"), ffn.get("type")
    common = dict(vocab_size=config.vocab_size, hidden_size=config.d_model,
                  num_hidden_layers=config.n_layers,
                  tie_word_embeddings=config.tie_word_embeddings)
    kimi_linear = kimi_linear_peer(config)
    if kimi_linear is not None:
        return kimi_linear
    qwen3_next = qwen3_next_peer(config)
    if qwen3_next is not None:
        return qwen3_next
    if not _plain_layers(config):
        return None
    if kind == "attention" and ffn_kind in ("swiglu", "moe"):
        heads = mixer.get("n_heads") or max(1, config.d_model // 64)
        attention = dict(num_attention_heads=heads,
                         num_key_value_heads=mixer.get("n_kv_heads") or heads,
                         rms_norm_eps=config.norm_eps, max_position_embeddings=16384,
                         rope_theta=mixer.get("rope_theta", 10000.0))
        if ffn_kind == "swiglu":
            hidden = ffn.get("hidden_size") or swiglu_hidden_size(config.d_model)
            return "LlamaForCausalLM", LlamaForCausalLM(
                LlamaConfig(**common, **attention, intermediate_size=hidden))
        if ffn.get("expert_type") == "swiglu" and not ffn.get("n_shared_experts"):
            return "MixtralForCausalLM", MixtralForCausalLM(MixtralConfig(
                **common, **attention, intermediate_size=ffn["hidden_size"],
                num_local_experts=ffn["n_experts"], num_experts_per_tok=ffn["top_k"]))
        return None
    if kind == "mamba" and config.ffn is None:
        return "MambaForCausalLM", MambaForCausalLM(MambaConfig(
            **common, state_size=mixer.get("d_state", 16), expand=mixer.get("expand", 2),
            conv_kernel=mixer.get("d_conv", 4), layer_norm_epsilon=config.norm_eps))
    if kind == "mamba2" and config.ffn is None:
        expand, head_dim = mixer.get("expand", 2), mixer.get("head_dim", 64)
        return "Mamba2ForCausalLM", Mamba2ForCausalLM(Mamba2Config(
            **common, state_size=mixer.get("d_state", 128), expand=expand, head_dim=head_dim,
            num_heads=expand * config.d_model // head_dim, n_groups=mixer.get("n_groups", 1),
            conv_kernel=mixer.get("d_conv", 4), layer_norm_epsilon=config.norm_eps))
    if kind == "rwkv4" and ffn_kind == "rwkv4_cmix":
        return "RwkvForCausalLM", RwkvForCausalLM(RwkvConfig(
            **common, attention_hidden_size=mixer.get("attention_hidden_size") or config.d_model,
            intermediate_size=ffn.get("hidden_size") or 4 * config.d_model,
            layer_norm_epsilon=config.norm_eps, rescale_every=0))
    return None


# --- decode: every tiny config ------------------------------------------------------------------

def _tiny_configs() -> list[str]:
    return [name for name in shipped_configs() if name.endswith("-tiny")]


# the delta-rule generation's mixers (issue #25): `zoo bench decode-delta-rule` times only the
# tiny configs that hold one of them
DELTA_RULE_MIXERS = ("deltanet", "gated_deltanet", "kda", "rwkv7")


def _delta_rule_configs() -> list[str]:
    """The tiny configs with a delta-rule layer: the pure stacks and their hybrids."""
    names = []
    for name in _tiny_configs():
        config = load_config(name)
        kinds = {config.layer_spec(i)[0]["type"] for i in range(config.n_layers)}
        if kinds & set(DELTA_RULE_MIXERS):
            names.append(name)
    return names


def decode_report(rows: list[dict]) -> str:
    lines = [format_rows(rows), ""]
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == name and "zoo_ms_per_token" in r),
                      key=lambda r: r["context"])
        if not mine:
            continue
        first, last = mine[0], mine[-1]
        line = f"{name}: {first['context']} -> {last['context']} context"
        compiled = "native" if first.get("compiled_step") == "native" else "compiled"
        for label, key in ((compiled, "zoo_compiled_ms"), ("eager", "zoo_ms_per_token")):
            growth = last[key] / first[key]
            line += f", {label} {first[key]:.3f} -> {last[key]:.3f} ms/token (x{growth:.2f}"
            if first["bounded"]:
                line += ", flat within 10%: " + ("yes" if growth <= 1.10 else "NO")
            line += ")"
        if last.get("compiled_GB_per_s"):
            line += (f"; the {compiled} step reads weights and state at "
                     f"{last['compiled_GB_per_s']:.1f} GB/s at {last['context']} context")
        speedups = [r["speedup_vs_peer"] for r in mine if r.get("speedup_vs_peer")]
        if speedups:
            line += (f"; compiled loop vs {first['peer']}'s generate: x{min(speedups):.1f} to "
                     f"x{max(speedups):.1f} per token (target x5)")
        loop = [r["speedup_vs_hf_loop"] for r in mine]
        line += f"; vs transformers' generate on the same zoo model: x{statistics.median(loop):.1f}"
        lines.append(line)
    return "\n".join(lines)


@torch.no_grad()
def compiled_step_kind(model: ZooForCausalLM, device: str) -> str:
    """Which step generate(compile=True) runs for `model` on one row: "native" or "inductor"."""
    from zoo.infer import native
    from zoo.infer.generate import prefill

    layout = prefill(model, [[0]]).cache.flatten()[0]
    return "native" if native.native_support(model, layout, 1) else "inductor"


def _decode_plot(rows: list[dict], path) -> None:
    line_plot(rows, path, x="context", y="zoo_compiled_ms", series="config",
              title="zoo.infer decode cost per token (compiled step)")


@register_bench(
    "decode",
    "zoo.infer decode ms/token at 128/1k/8k context, every tiny config, vs transformers' generate",
    plot=_decode_plot,
    report=decode_report,
)
def bench_decode(options: BenchOptions) -> list[dict]:
    return decode_rows(options, _tiny_configs())


@register_bench(
    "decode-delta-rule",
    "zoo bench decode on the tiny configs with a delta-rule layer (DeltaNet, Gated DeltaNet, "
    "KDA, RWKV-7 and their hybrids) only",
    plot=_decode_plot,
    report=decode_report,
)
def bench_decode_delta_rule(options: BenchOptions) -> list[dict]:
    return decode_rows(options, _delta_rule_configs())


def decode_rows(options: BenchOptions, names: list[str]) -> list[dict]:
    """Per config of `names` and context: the loop eager and with its step compiled (compiled
    once per model, at the first context: shapes that grow are dynamic after the first
    recompile), transformers' generate driving the same zoo model, and the matching
    transformers model's generate."""
    contexts = [32, 128] if options.quick else [128, 1024, 8192]
    new_tokens = 8 if options.quick else NEW_TOKENS
    # The best of a few runs per figure, the figures' runs interleaved: on the 2-core VM this
    # was written on, slow spells (10-40%) last longer than a run of a tiny model (a few ms),
    # so back-to-back runs of one figure would all land in the same spell.
    runs = 1 if options.quick else max(1, options.repeats)

    rows, start = [], time.perf_counter()
    for name in names:
        if time.perf_counter() - start > options.budget_s:
            break
        config = load_config(name)
        torch.manual_seed(0)
        model = ZooForCausalLM(config).to(options.device).eval()
        peer = transformers_peer(config)
        if peer is not None:
            torch.manual_seed(0)
            peer = (peer[0], peer[1].to(options.device).eval())
        bounded = all(block.mixer.bounded for block in model.model.layers)
        torch._dynamo.reset()  # the previous configs' compiled steps are not needed again
        compiled_step = compiled_step_kind(model, options.device)
        figures, eager_first, notes = {}, {}, {}
        for context in contexts:
            ids = torch.randint(0, config.vocab_size, (1, context), device=options.device)
            try:
                eager_first[context] = time_decode(model, ids, new_tokens)
            except ValueError as error:  # a context the config cannot hold (Hyena's max_len)
                notes[context] = {"config": name, "context": context, "note": str(error)[:80]}
                continue
            # warm-up: compiles at the first context (10-60 s), recompiles once with the
            # growing shapes dynamic at the next
            time_decode(model, ids, 4, compile=True)
            figures[context] = {
                "zoo": partial(_zoo_ms, model, ids, new_tokens),
                "compiled": partial(_zoo_ms, model, ids, new_tokens, compile=True),
                "loop": partial(hf_generate_ms_per_token, model, ids, new_tokens),
            }
            if peer is not None:
                figures[context]["peer"] = partial(
                    hf_generate_ms_per_token, peer[1], ids, new_tokens)
        # contexts interleaved too: whether a bounded mixer stays flat compares them
        best = {c: {f: float("inf") for f in figs} for c, figs in figures.items()}
        for _ in range(runs):
            for context, figs in figures.items():
                for figure, measure in figs.items():
                    with without_gc():
                        best[context][figure] = min(best[context][figure], measure())
        for context in contexts:
            if context in notes:
                rows.append(notes[context])
                continue
            got = best[context]
            first = eager_first[context]
            zoo_ms, compiled_ms, loop_ms = (
                min(first.ms_per_token, got["zoo"]), got["compiled"], got["loop"])
            row = {"config": name, "context": context, "zoo_ms_per_token": zoo_ms,
                   "zoo_compiled_ms": compiled_ms, "hf_generate_on_zoo_ms": loop_ms,
                   "speedup_vs_hf_loop": loop_ms / compiled_ms,
                   "peer": None, "peer_ms_per_token": None, "speedup_vs_peer": None,
                   "speedup_vs_peer_eager": None, "zoo_params": _params(model),
                   "peer_params": None, "state_bytes": first.state_bytes, "bounded": bounded,
                   "compiled_GB_per_s": first.bytes_per_step / compiled_ms / 1e6,
                   "threads": torch.get_num_threads(), "compiled_step": compiled_step}
            if peer is not None:
                peer_ms = got["peer"]
                row.update(peer=peer[0], peer_ms_per_token=peer_ms,
                           speedup_vs_peer=peer_ms / compiled_ms,
                           speedup_vs_peer_eager=peer_ms / zoo_ms, peer_params=_params(peer[1]))
            rows.append(row)
    return rows


# --- SmolLM2-135M: the weight-read bound ----------------------------------------------------------

@torch.no_grad()
def gemv_floor_ms(model, repeats: int = 5) -> float:
    """The model's matrix-vector products alone (every nn.Linear on one token, the tied head
    included): what the BLAS library makes of the weight reads, with no other work."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype, device=m.weight.device)
              for m in layers]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for m, x in zip(layers, inputs):
            m(x)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def load_smollm2(dtype: torch.dtype = torch.float32) -> ZooForCausalLM:
    """The real SmolLM2-135M, imported from the GGUF file on this machine."""
    from zoo.hf_import import from_hf

    return from_hf("smollm2-135m", dtype=dtype)


def smollm2_report(rows: list[dict]) -> str:
    lines = [format_rows(rows), ""]
    for row in rows:
        if row.get("x_bound_best") is None:
            continue
        lines.append(
            f"smollm2-135m {row['dtype']} {row['mode']}: {row['zoo_ms_per_token']:.2f} ms/token; "
            f"reading the {row['weight_MB']:.0f} MB of weights once takes "
            f"{row['bound_ms']:.2f} ms at the bandwidth measured beside each run "
            f"(x{row['x_bound']:.2f}, median over runs) and {row['bound_best_ms']:.2f} ms at "
            f"the best bandwidth seen, {row['read_GB_per_s_best']:.0f} GB/s "
            f"(x{row['x_bound_best']:.2f}; target x1.3)")
    return "\n".join(lines)


@register_bench(
    "decode-smollm2",
    "SmolLM2-135M decode ms/token at 128 context vs reading its weights once per token",
    report=smollm2_report,
)
def bench_decode_smollm2(options: BenchOptions) -> list[dict]:
    """fp32 and bf16: eager, compiled (torch.compile) and native (the C++ step, on the CPU),
    and transformers' generate, at 128 context.

    This machine's read bandwidth moves between runs and phases (48-88 GB/s on the 2-core VM
    this was written on: a large buffer on huge pages or not), so every decode measurement is
    paired with a bandwidth measurement taken just before it; the ratio is the median of the
    pairs, and the ratio to the best bandwidth seen in the whole run is reported too (the
    stricter figure)."""
    from zoo.hf_import import load_hf_model, smollm2_path

    context = 32 if options.quick else 128
    new_tokens = 8 if options.quick else 32
    repeats = 1 if options.quick else max(3, options.repeats)
    rows = []
    hf_model, _ = load_hf_model(str(smollm2_path()), torch.float32)
    hf_model = hf_model.to(options.device).eval()
    ids = torch.randint(0, 49152, (1, context), device=options.device)
    with without_gc():
        hf_ms = hf_generate_ms_per_token(hf_model, ids, new_tokens)
    del hf_model
    rows.append({"model": "smollm2-135m", "dtype": "float32", "mode": "transformers generate",
                 "context": context, "zoo_ms_per_token": hf_ms})
    # the loop eager, its step under torch.compile, and (on the CPU) the native C++ step
    modes = {False: "zoo eager", "inductor": "zoo compiled (inductor)", "native": "zoo native"}
    steps = [False, "inductor"] + (["native"] if options.device == "cpu" else [])
    plans = [(dtype, step) for dtype in (torch.float32, torch.bfloat16) for step in steps]
    if options.quick:
        plans = plans[:1]
    for dtype, compile in plans:
        model = load_smollm2(dtype).to(options.device).eval()
        nbytes = weight_bytes(model)
        if compile:
            time_decode(model, ids, 4, compile=compile)  # warm-up: compiles (1-2 min)
        pairs = []
        for _ in range(repeats):
            bandwidth = read_bandwidth(options.device)
            timing = time_decode(model, ids, new_tokens, compile=compile)
            pairs.append((bandwidth, timing.ms_per_token))
        zoo_ms = statistics.median(ms for _, ms in pairs)
        best = max(bw for bw, _ in pairs)
        # bf16 weights: half the bytes at the same bandwidth
        ratio = statistics.median(ms / (1e3 * nbytes / bw) for bw, ms in pairs)
        rows.append({
            "model": "smollm2-135m", "dtype": str(dtype).replace("torch.", ""),
            "mode": modes[compile], "context": context,
            "zoo_ms_per_token": zoo_ms, "weight_MB": nbytes / 1e6,
            "read_GB_per_s": statistics.median(bw for bw, _ in pairs) / 1e9,
            "read_GB_per_s_best": best / 1e9,
            "bound_ms": statistics.median(1e3 * nbytes / bw for bw, _ in pairs),
            "bound_best_ms": 1e3 * nbytes / best, "x_bound": ratio,
            "x_bound_best": zoo_ms / (1e3 * nbytes / best),
            "achieved_GB_per_s": nbytes / zoo_ms / 1e6,
            "gemv_floor_ms": gemv_floor_ms(model),
            "speedup_vs_transformers": hf_ms / zoo_ms if dtype == torch.float32 else None,
            "runs": [(round(bw / 1e9, 1), round(ms, 2)) for bw, ms in pairs],
            "state_bytes": timing.state_bytes, "threads": torch.get_num_threads(),
        })
        del model
    # the strict bound: the best bandwidth seen anywhere in this run (it moves between phases)
    best = max(r["read_GB_per_s_best"] for r in rows if "read_GB_per_s_best" in r)
    for r in rows:
        if "read_GB_per_s_best" in r:
            r["read_GB_per_s_best"] = best
            r["bound_best_ms"] = r["weight_MB"] / best
            r["x_bound_best"] = r["zoo_ms_per_token"] / r["bound_best_ms"]
    return rows


# --- speculative decoding -------------------------------------------------------------------------

def truncated_draft(model: ZooForCausalLM, n_layers: int) -> ZooForCausalLM:
    """The model's first n_layers with its own final norm and head: a draft that needs no
    training (self-speculative decoding by layer skipping), sharing the tokenizer."""
    config = ZooConfig(**{**model.config.to_dict(), "n_layers": n_layers})
    with torch.device("meta"):
        draft = ZooForCausalLM(config)
    keep = {k: v for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    draft.load_state_dict(keep, strict=False, assign=True)
    if config.tie_word_embeddings:
        draft.tie_weights()
    for module in draft.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return draft.eval()


@register_bench(
    "speculative",
    "speculative decoding on SmolLM2-135M with its first layers as draft: acceptance, speed-up",
    report=lambda rows: format_rows(rows),
)
def bench_speculative(options: BenchOptions) -> list[dict]:
    from zoo.infer import generate, speculative_generate

    target = load_smollm2().to(options.device).eval()
    tokenizer = target.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List the planets of the solar system in order."}],
        add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    new_tokens = 16 if options.quick else 64
    plain = generate(target, prompt, max_new_tokens=new_tokens, stop_tokens=[])
    plain_s = plain.stats.decode_seconds / max(plain.stats.generated_tokens, 1)
    rows = []
    for layers, k in ([(10, 4)] if options.quick else [(6, 3), (10, 4), (15, 4)]):
        draft = truncated_draft(target, layers)
        result = speculative_generate(target, draft, prompt, max_new_tokens=new_tokens, k=k,
                                      stop_tokens=[])
        spec_s = result.stats.decode_seconds / result.stats.generated_tokens
        rows.append({
            "target": "smollm2-135m (30 layers)", "draft_layers": layers, "k": k,
            "acceptance_rate": result.stats.acceptance_rate,
            "tokens_per_round": result.stats.tokens_per_round,
            "plain_ms_per_token": 1e3 * plain_s, "speculative_ms_per_token": 1e3 * spec_s,
            "speedup": plain_s / spec_s,
            "identical_to_plain": result.tokens == plain.tokens[0],
        })
    return rows
