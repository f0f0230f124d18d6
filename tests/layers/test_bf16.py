"""bf16 end to end: every shipped tiny model cast with `.to(torch.bfloat16)` gives the logits of
its float32 self, and the fixed tables a cast must not round (rotary frequencies) stay float32.
The per-mixer bounds are in test_contract.py."""

import copy

import pytest
import torch

import zoo
from zoo.layers.base import at_least_float32
from zoo.layers.moe import MoE
from zoo.layers.rotary import Rotary

U = 2.0**-8  # bf16's unit roundoff: one rounding moves a value by at most this fraction
TINY_CONFIGS = sorted(name for name in zoo.shipped_configs() if name.endswith("-tiny"))
# Random roundings add in quadrature: the ~60 on a 2-block tiny model's path (embedding, norms,
# the mixer's 5-20, the FFN's 5, residual sums, head) come to about sqrt(60) U = 0.03 in norm;
# the bound doubles that (measured 0.005-0.015).
LOGITS_BOUND = 16 * U
# A token whose top-2 expert set flips (router logits within bf16's rounding of each other:
# 1-3% of the tokens here) gets another expert's output, an O(1) change of its logits
# (measured 0.03-0.06 over four seeds).
MOE_LOGITS_BOUND = 40 * U
# A top token changes only where the top two logits lie closer than the logits' error, a few
# tokens in a hundred at random initialisation (measured 0.95-0.99).
ARGMAX_AGREEMENT = 0.9


def test_every_tiny_config_is_checked():
    assert {"hyena-tiny", "mixtral-tiny", "attention-tiny"} <= set(TINY_CONFIGS)


@pytest.mark.parametrize("name", TINY_CONFIGS)
@torch.no_grad()
def test_bf16_model_logits_match_float32(name):
    torch.manual_seed(0)
    config = zoo.load_config(name)
    model = zoo.ZooForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits.double()
    got = copy.deepcopy(model).to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    got = got.double()
    error = ((got - want).norm() / want.norm()).item()
    agreement = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    routed = any(isinstance(module, MoE) for module in model.modules())
    bound = MOE_LOGITS_BOUND if routed else LOGITS_BOUND
    assert error <= bound, f"{name}: bf16 logits off float32 by {error:.3e} > {bound:.3e}"
    assert agreement >= ARGMAX_AGREEMENT, (
        f"{name}: bf16 picks float32's top token at {agreement:.1%} of positions"
    )


@torch.no_grad()
def test_hyena_loaded_in_bf16_keeps_its_filter_network_float32(tmp_path):
    # from_pretrained(dtype=...) builds the model in bf16 without a .to() cast
    torch.manual_seed(0)
    config = zoo.load_config("hyena-tiny")
    zoo.ZooForCausalLM(config).save_pretrained(tmp_path)
    model = zoo.ZooForCausalLM.from_pretrained(tmp_path).eval()
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    filters = [p for n, p in loaded.named_parameters() if ".filter_ffn." in n]
    assert filters and all(p.dtype == torch.float32 for p in filters)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    want, got = model(ids).logits.double(), loaded(ids).logits.double()
    error = ((got - want).norm() / want.norm()).item()
    assert error <= LOGITS_BOUND, f"hyena-tiny loaded in bf16: off float32 by {error:.3e}"


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_rotary_frequencies_stay_float32_through_a_cast(cast):
    # a bf16 frequency is off by up to 0.37%: 1.8 radians at position 4096 for head_dim 64
    rotary = Rotary(64)
    low = copy.deepcopy(rotary).to(cast)
    assert low.inv_freq.dtype == torch.float32
    assert torch.equal(low.inv_freq, rotary.inv_freq)
    for want, got in zip(rotary.cos_sin(4000, 96, torch.float32),
                         low.cos_sin(4000, 96, torch.float32)):
        assert torch.equal(want, got)
    assert low.double().inv_freq.dtype == torch.float64


def test_at_least_float32_keeps_exact_values_and_follows_devices():
    exact = torch.tensor([1 / 3, 0.1, 1e-3])
    to_bf16 = at_least_float32(lambda t: t.to(torch.bfloat16))
    assert torch.equal(to_bf16(exact), exact)
    assert at_least_float32(lambda t: t.double())(exact).dtype == torch.float64
    assert at_least_float32(lambda t: t.to("meta", torch.float16))(exact).device.type == "meta"
    with torch.device("meta"):
        rotary = Rotary(16)
    assert rotary.to(torch.bfloat16).to_empty(device="cpu").inv_freq.dtype == torch.float32
