"""Mamba-1: the mixer and a whole model equal transformers' on the same weights (copied by
name), the tiny config trains and decodes token by token, the 130M config has mamba-130m's size."""

import re

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM
from transformers.models.mamba.modeling_mamba import MambaMixer

import zoo
from zoo.layers.mamba import Mamba
from zoo.testing import assert_close


def _perturb(module, scale=0.1):
    """Move every parameter off its initial value, so no term hides behind a zero or a one."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _hf_config(**kw):
    base = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
                conv_kernel=4, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    return MambaConfig(**{**base, **kw})


@pytest.mark.parametrize("use_conv_bias,use_bias", [(True, False), (False, True)])
@torch.no_grad()
def test_mixer_matches_transformers_mamba_mixer(use_conv_bias, use_bias):
    hf = MambaMixer(_hf_config(use_conv_bias=use_conv_bias, use_bias=use_bias), 0).eval()
    _perturb(hf)
    ours = Mamba(64, conv_bias=use_conv_bias, bias=use_bias).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 23, 64)
    y, _ = ours(x)
    assert_close("mamba vs MambaMixer", hf(x), y, 1e-5)


def _hf_to_zoo_names(name: str) -> str:
    """MambaForCausalLM's names -> ZooForCausalLM's (the mixers' names are the same)."""
    name = re.sub(r"^backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.mixer_norm.", name)
    name = name.replace("backbone.embeddings.", "model.embed_tokens.")
    return name.replace("backbone.norm_f.", "model.norm.").replace("backbone.", "model.")


@torch.no_grad()
def test_model_logits_match_transformers_mamba_for_causal_lm():
    torch.manual_seed(0)
    hf = MambaForCausalLM(_hf_config()).eval()
    _perturb(hf.backbone.layers)
    ours = zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval()
    state = {_hf_to_zoo_names(k): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    ids = torch.randint(0, 256, (2, 17))
    assert_close("logits", hf(ids).logits, ours(ids).logits, 1e-5)


def _train_losses(name, steps=12):
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config(name)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a short repeating byte pattern: learnable in a few steps by any working sequence model
    ids = torch.tensor([list(range(7, 39)) * 2] * 2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_config_trains():
    losses = _train_losses("mamba-tiny")
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall: {losses}"


@torch.no_grad()
def test_tiny_model_decodes_token_by_token_as_the_full_forward():
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval()
    ids = torch.randint(0, 256, (2, 14))
    full = model(ids).logits
    out = model(ids[:, :4], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(4, 14):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    assert_close("stepped logits", full, torch.cat(pieces, 1), 1e-5)


def test_130m_config_has_the_parameter_count_of_transformers_mamba_130m():
    config = zoo.load_config("mamba-130m")
    with torch.device("meta"):
        ours = zoo.ZooForCausalLM(config)
        hf = MambaForCausalLM(_hf_config(vocab_size=50280, hidden_size=768,
                                         num_hidden_layers=24))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    assert 125e6 < count < 135e6


def test_bench_entries_run_quick_and_decode_state_is_flat(tmp_path):
    from zoo.app.bench import BenchOptions, load_entries, run_bench

    load_entries()
    options = BenchOptions(quick=True, repeats=2, out_dir=tmp_path)
    train = run_bench("mamba-train-step", options, plot=False)["rows"]
    assert {row["impl"] for row in train} == {"zoo mamba", "zoo mamba2"}
    assert all(row["step_s"] > 0 for row in train)
    decode = run_bench("mamba-decode", options, plot=False)["rows"]
    for impl in ("zoo mamba", "zoo mamba2"):
        sizes = {row["state_bytes"] for row in decode if row["impl"] == impl}
        assert len(sizes) == 1, f"{impl}: state grows with the context: {sizes}"
    assert (tmp_path / "mamba-decode.json").exists()
