import math

import pytest
import torch

from zoo.layers import build_ffn
from zoo.layers.moe import MoE, apply_capacity, load_balancing_loss, router_z_loss
from zoo.testing import assert_close

BACKENDS = ["torch", "triton", "reference"]


def _mixtral_block(d_model=32, hidden=48, n_experts=8, top_k=2):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=d_model, intermediate_size=hidden,
                           num_local_experts=n_experts, num_experts_per_tok=top_k)
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_transformers_mixtral_block_with_its_weights(backend):
    block = _mixtral_block()
    moe = MoE(32, n_experts=8, top_k=2, hidden_size=48, backend=backend).eval()
    moe.load_state_dict(block.state_dict(), strict=True)  # same names, same shapes
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        expected = block(x.clone())  # Mixtral's block may scale its input in place
    y, state = moe(x)
    assert state is None
    assert_close("y vs MixtralSparseMoeBlock", expected, y, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [
    {"n_experts": 6, "top_k": 2},
    {"n_experts": 4, "top_k": 1, "expert_type": "mlp"},
    {"n_experts": 8, "top_k": 3, "hidden_size": 16, "n_shared_experts": 2},
])
def test_backends_match_reference_with_router_gradients(backend, options):
    torch.manual_seed(0)
    ref = MoE(32, backend="reference", **options)
    fast = MoE(32, backend=backend, **options)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    dy = torch.randn(2, 9, 32, dtype=torch.float64)
    results = []
    for module, dtype in ((ref.double(), torch.float64), (fast, torch.float32)):
        module.zero_grad()
        xi = x.detach().to(dtype).clone().requires_grad_()
        y, _ = module(xi)
        ((y * dy.to(dtype)).sum() + module.aux_loss).backward()
        results.append((y, xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y_ref, dx_ref, g_ref), (y, dx, g) = results
    assert_close("y", y_ref, y, 1e-5)
    assert_close("dx", dx_ref, dx, 1e-5)
    for name in g_ref:
        assert_close(f"d{name}", g_ref[name], g[name], 1e-5)
    assert g["gate.weight"].abs().sum() > 0


def _all_to_expert_zero(moe: MoE) -> None:
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0] = 1.0  # with x > 0, expert 0 has the largest logit for every token


def test_capacity_drops_overflow_tokens_to_zero_output():
    moe = MoE(16, n_experts=4, top_k=1, hidden_size=16, capacity_factor=1.0).train()
    _all_to_expert_zero(moe)
    x = torch.rand(1, 8, 16) + 0.1
    y, _ = moe(x)
    stats = moe.last_stats
    # capacity = ceil(1.0 * 8 tokens * 1 / 4 experts) = 2: tokens 0 and 1 kept, 6 dropped
    assert stats["tokens_per_expert"].tolist() == [8, 0, 0, 0]
    assert stats["dropped_per_expert"].tolist() == [6, 0, 0, 0]
    assert stats["dropped_tokens"].item() == 6
    assert torch.all(y[0, 2:] == 0)
    assert torch.all(y[0, :2] != 0)
    # the kept tokens get expert 0's output times their raw probability (top-1: not renormalised)
    moe.eval()
    y_eval, _ = moe(x)
    assert moe.last_stats["dropped_tokens"].item() == 0, "capacity applies in training only"
    assert_close("kept tokens", y_eval[0, :2], y[0, :2], 1e-6)
    p = torch.softmax(moe.gate(x[0, :2]), -1)[:, 0:1]
    expert0 = MoE(16, n_experts=1, top_k=1, hidden_size=16, normalize_weights=False)
    expert0.experts.gate_up_proj.data = moe.experts.gate_up_proj.data[:1]
    expert0.experts.down_proj.data = moe.experts.down_proj.data[:1]
    assert_close("kept = p * expert0(x)", p * expert0(x[:, :2])[0][0], y[0, :2], 1e-5)


def test_dropped_tokens_still_get_the_shared_experts():
    moe = MoE(16, n_experts=4, top_k=1, hidden_size=16, capacity_factor=1.0,
              n_shared_experts=1).train()
    _all_to_expert_zero(moe)
    x = torch.rand(1, 8, 16) + 0.1
    y, _ = moe(x)
    assert_close("dropped = shared only", moe.shared_experts(x[:, 2:])[0], y[:, 2:], 1e-6)


def test_capacity_serves_first_choices_before_second_choices():
    ids = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    kept = apply_capacity(ids, 3, capacity=2)
    # first choices: t0->0, t1->0 fill expert 0; t2->0 dropped; t3->1. Second choices: t0->1
    # fills expert 1; t1->1 dropped; t2->2 kept; t3->0 dropped (expert 0 already full)
    assert kept.tolist() == [[0, 1], [0, -1], [-1, 2], [1, -1]]


def test_load_balancing_loss_is_one_when_uniform_and_n_experts_when_collapsed():
    E, N = 4, 12
    uniform = load_balancing_loss(torch.full((N, E), 1 / E), torch.full((E,), N // E))
    assert uniform.item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(N, E)
    collapsed_probs[:, 2] = 1.0
    collapsed = load_balancing_loss(collapsed_probs, torch.tensor([0, 0, N, 0]))
    assert collapsed.item() == pytest.approx(E)
    # two experts shared evenly: f = (1/2, 1/2, 0, 0), P likewise -> E * 1/2 = 2
    half = torch.zeros(N, E)
    half[:, :2] = 0.5
    assert load_balancing_loss(half, torch.tensor([N, N, 0, 0])).item() == pytest.approx(2.0)


def test_z_loss_is_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    expected = (math.log(4) ** 2 + torch.logsumexp(logits[1], 0).item() ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)


def test_aux_loss_on_a_uniform_router_has_its_minimum_value():
    moe = MoE(16, n_experts=8, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001)
    with torch.no_grad():
        moe.gate.weight.zero_()  # every probability 1/8: P uniform, so the loss is 1 whatever f
    moe(torch.randn(2, 5, 16))
    assert moe.last_stats["load_balancing_loss"].item() == pytest.approx(1.0)
    assert moe.last_stats["z_loss"].item() == pytest.approx(math.log(8) ** 2)
    assert moe.aux_loss.item() == pytest.approx(0.01 + 0.001 * math.log(8) ** 2)
    assert moe.last_stats["tokens_per_expert"].sum().item() == 2 * 5 * 2


def test_load_balancing_loss_pushes_the_router_towards_balance():
    moe = MoE(16, n_experts=4, top_k=1, hidden_size=16, aux_loss_coef=1.0, z_loss_coef=0.0)
    x = torch.randn(4, 16, 16)
    with torch.no_grad():
        moe.gate.weight[0] = 8 * x.reshape(-1, 16).mean(0)  # most tokens prefer expert 0
    opt = torch.optim.SGD(moe.gate.parameters(), lr=0.2)
    moe(x)
    start_loss, start_max = moe.aux_loss.item(), moe.last_stats["tokens_per_expert"].max()
    for _ in range(40):
        moe(x)
        opt.zero_grad()
        moe.aux_loss.backward()
        opt.step()
    moe(x)
    assert moe.aux_loss.item() < start_loss - 0.1
    assert moe.last_stats["tokens_per_expert"].max() < start_max


def test_top1_keeps_raw_probability_and_top2_renormalises():
    x = torch.randn(10, 16)
    top1 = MoE(16, n_experts=4, top_k=1)
    _, probs, _, w = top1.route(x)
    assert_close("top-1 weight = max p", probs.max(-1).values[:, None], w, 1e-7)
    top2 = MoE(16, n_experts=4, top_k=2)
    _, _, _, w = top2.route(x)
    assert_close("top-2 weights sum to 1", torch.ones(10), w.sum(-1), 1e-6)


def test_jitter_noise_only_in_training():
    moe = MoE(16, n_experts=4, jitter_noise=0.5)
    x = torch.randn(20, 16)
    clean = moe.gate(x).float()
    moe.eval()
    assert torch.equal(moe.route(x)[0], clean)
    moe.train()
    assert not torch.equal(moe.route(x)[0], clean)


def test_shared_experts_add_a_dense_ffn():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2, hidden_size=8, n_shared_experts=2)
    assert moe.shared_experts.gate_proj.weight.shape == (16, 16)  # 2 experts x 8 hidden
    routed_only = MoE(16, n_experts=4, top_k=2, hidden_size=8)
    routed_only.load_state_dict(
        {k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    x = torch.randn(2, 3, 16)
    expected = routed_only(x)[0] + moe.shared_experts(x)[0]
    assert_close("routed + shared", expected, moe(x)[0], 1e-6)


def test_registered_and_options_validated():
    ffn = build_ffn({"type": "moe", "n_experts": 4, "top_k": 1, "expert_type": "mlp"}, 16)
    assert isinstance(ffn, MoE) and ffn.experts.up_proj.shape == (4, 64, 16)
    with pytest.raises(ValueError, match="expert_type"):
        MoE(16, expert_type="relu")
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, capacity_factor=0.0)
    with pytest.raises(ValueError, match="no option"):
        build_ffn({"type": "moe", "experts": 4}, 16)


# Through the model: the shipped MoE configs train (with the aux loss in the output) and decode.
# (tests/zoo/test_model.py also runs every *-tiny config through save/load and generate.)
MOE_CONFIGS = ["moe-tiny", "mixtral-tiny"]


def _model(name):
    import zoo

    torch.manual_seed(0)
    return zoo.ZooForCausalLM(zoo.load_config(name))


@pytest.mark.parametrize("name", MOE_CONFIGS)
def test_config_trains_with_aux_loss_in_the_output(name):
    model = _model(name).train()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes, f"{name} has no moe layer"
    # a learnable synthetic sequence: a repeating pattern of 7 tokens
    ids = torch.arange(64).remainder(7).add(40).repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        assert out.aux_loss is not None and out.aux_loss.item() > 0
        aux = sum(m.aux_loss for m in moes)
        assert_close("aux_loss = sum over moe layers", aux, out.aux_loss, 1e-6)
        ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                               ids[:, 1:].flatten())
        assert_close("loss = ce + aux_loss", ce + out.aux_loss, out.loss, 1e-5)
        opt.zero_grad()
        out.loss.backward()
        assert moes[0].gate.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    stats = moes[0].last_stats
    assert stats["tokens_per_expert"].sum().item() == ids.numel() * moes[0].top_k


@pytest.mark.parametrize("name", MOE_CONFIGS)
@torch.no_grad()
def test_config_decodes_token_by_token_equal_to_full_forward(name):
    model = _model(name).eval()
    ids = torch.randint(0, 256, (2, 10))
    full = model(ids).logits
    out = model(ids[:, :1], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(1, 10):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    assert_close(f"{name} stepped logits", full, torch.cat(pieces, dim=1), 1e-4)


def test_compiled_inference_skips_the_losses_and_stats_but_not_the_output():
    torch.manual_seed(0)
    moe = MoE(16, n_experts=4, top_k=2, hidden_size=16, n_shared_experts=1).eval()
    x = torch.randn(2, 1, 16)  # a decode step's shape: two rows, one token each
    with torch.no_grad():
        expected, _ = moe(x)
        assert moe.aux_loss is not None and moe.last_stats, "eager inference keeps them"
        got, _ = torch.compile(moe, fullgraph=True)(x)
    assert_close("y", expected, got, 1e-5)
    assert moe.aux_loss is None and moe.last_stats == {}


def _qwen3_next_block(norm_topk_prob: bool):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    config = Qwen3NextConfig(hidden_size=32, num_experts=6, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=40,
                             norm_topk_prob=norm_topk_prob)
    torch.manual_seed(0)
    block = Qwen3NextSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block.eval()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_equals_transformers_qwen3_next_block_with_its_weights(backend, norm_topk_prob):
    """Softmax top-k routing, plus one shared expert of its own size whose output is scaled
    per token by sigmoid(shared_expert_gate x)."""
    block = _qwen3_next_block(norm_topk_prob)
    moe = MoE(32, n_experts=6, top_k=2, hidden_size=16, n_shared_experts=1,
              shared_expert_hidden_size=40, shared_expert_gate=True,
              normalize_weights=norm_topk_prob, backend=backend).eval()
    state = {name.replace("shared_expert.", "shared_experts."): p
             for name, p in block.state_dict().items()}
    moe.load_state_dict(state, strict=True)
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        expected = block(x)
    y, _ = moe(x)
    assert_close("y vs Qwen3NextSparseMoeBlock", expected, y, 1e-5)


def test_the_shared_expert_gate_scales_the_shared_output_alone():
    torch.manual_seed(0)
    gated = MoE(16, n_experts=4, top_k=2, hidden_size=8, n_shared_experts=1,
                shared_expert_hidden_size=24, shared_expert_gate=True).eval()
    assert gated.shared_experts.down_proj.weight.shape == (16, 24)
    with torch.no_grad():
        gated.shared_expert_gate.weight.fill_(-1e4)  # sigmoid = 0: the shared expert is off
    x = torch.rand(2, 5, 16) + 0.1
    y, _ = gated(x)
    flat = x.reshape(-1, 16)
    _, _, ids, weights = gated.route(flat)
    assert_close("routed experts only", gated.experts(flat, ids, weights).view_as(y), y, 1e-6)


@pytest.mark.parametrize("options", [{"shared_expert_gate": True},
                                     {"shared_expert_hidden_size": 32}])
def test_shared_expert_options_without_a_shared_expert_are_refused(options):
    with pytest.raises(ValueError, match="moe: shared_expert_hidden_size and shared_expert_gate "
                       r"need n_shared_experts >= 1, got n_shared_experts=0"):
        MoE(16, n_experts=4, **options)
