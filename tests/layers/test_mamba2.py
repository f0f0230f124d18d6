"""Mamba-2: the mixer and a whole model equal transformers' on the same weights (copied by
name), the SSD through linear_attention equals Mamba-2's own recurrence, the tiny config trains
and decodes token by token, the 130M config has mamba2-130m's size."""

import re

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import Mamba2Config, Mamba2ForCausalLM
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

import zoo
from zoo.layers.mamba2 import Mamba2
from zoo.testing import assert_close


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _hf_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                head_dim=32, num_heads=4, n_groups=1, conv_kernel=4, chunk_size=8,
                layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    return Mamba2Config(**{**base, **kw})


@pytest.mark.parametrize("head_dim,n_groups,use_bias", [(32, 1, False), (16, 2, True)])
@torch.no_grad()
def test_mixer_matches_transformers_mamba2_mixer(head_dim, n_groups, use_bias):
    hf_config = _hf_config(head_dim=head_dim, num_heads=128 // head_dim, n_groups=n_groups,
                           use_bias=use_bias)
    hf = Mamba2Mixer(hf_config, 0).eval()
    _perturb(hf)
    ours = Mamba2(64, d_state=16, head_dim=head_dim, n_groups=n_groups, bias=use_bias,
                  chunk_size=8).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 21, 64)
    y, _ = ours(x)
    assert_close("mamba2 vs Mamba2Mixer", hf(x), y, 1e-5)


def _hf_to_zoo_names(name: str) -> str:
    name = re.sub(r"^backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.mixer_norm.", name)
    name = name.replace("backbone.embeddings.", "model.embed_tokens.")
    return name.replace("backbone.norm_f.", "model.norm.").replace("backbone.", "model.")


@torch.no_grad()
def test_model_logits_match_transformers_mamba2_for_causal_lm():
    torch.manual_seed(0)
    hf = Mamba2ForCausalLM(_hf_config()).eval()
    _perturb(hf.backbone.layers)
    ours = zoo.ZooForCausalLM(zoo.load_config("mamba2-tiny")).eval()
    state = {_hf_to_zoo_names(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = torch.randint(0, 256, (2, 19))
    assert_close("logits", hf(ids).logits, ours(ids).logits, 1e-5)


@torch.no_grad()
def test_ssd_equals_mamba2_recurrence_one_step_at_a_time():
    """Mamba-2's recurrence per head written out, h_t = exp(dt A) h + dt B_t x_t^T, against the
    mixer's whole-sequence output: checks the mapping onto linear_attention (q=C, k=B, v=x dt)."""
    torch.manual_seed(0)
    mixer = Mamba2(64, d_state=8, head_dim=16, n_groups=2, chunk_size=4).eval()
    _perturb(mixer)
    x = torch.randn(1, 9, 64)
    y, state = mixer(x)
    z, xBC, dt = mixer.in_proj(x).split([mixer.d_inner, mixer.conv_dim, mixer.n_heads], -1)
    xBC = F.silu(mixer.conv1d(xBC.transpose(1, 2))[..., :9].transpose(1, 2))
    xs, B, C = xBC.split([mixer.d_inner, 16, 16], -1)
    xs = rearrange(xs, "b t (h p) -> b t h p", p=16)
    B = rearrange(B, "b t (g n) -> b t g n", g=2).repeat_interleave(4, 2)
    C = rearrange(C, "b t (g n) -> b t g n", g=2).repeat_interleave(4, 2)
    dt = F.softplus(dt + mixer.dt_bias)
    A = -torch.exp(mixer.A_log)
    h = torch.zeros(1, 8, 16, 8)  # (b, h, p, n), transformers' layout
    outs = []
    for t in range(9):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None, None] * xs[:, t, :, :, None] * B[:, t, :, None, :])
        outs.append((h * C[:, t, :, None, :]).sum(-1) + mixer.D[:, None] * xs[:, t])
    ref = mixer.out_proj(mixer.norm(rearrange(torch.stack(outs, 1), "b t h p -> b t (h p)"), z))
    assert_close("y", ref, y, 1e-5)
    assert_close("ssm_state", h.transpose(-1, -2), state.ssm_state, 1e-5)


def test_tiny_config_trains():
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("mamba2-tiny")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([list(range(7, 39)) * 2] * 2)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall: {losses}"


@torch.no_grad()
def test_tiny_model_decodes_token_by_token_as_the_full_forward():
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("mamba2-tiny")).eval()
    ids = torch.randint(0, 256, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(4, 14):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    assert_close("stepped logits", full, torch.cat(pieces, 1), 1e-5)


def test_130m_config_has_the_parameter_count_of_transformers_mamba2_130m():
    config = zoo.load_config("mamba2-130m")
    with torch.device("meta"):
        ours = zoo.ZooForCausalLM(config)
        hf = Mamba2ForCausalLM(_hf_config(vocab_size=50288, hidden_size=768,
                                          num_hidden_layers=24, state_size=128, head_dim=64,
                                          num_heads=24, n_groups=1, chunk_size=256))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    assert 125e6 < count < 135e6
