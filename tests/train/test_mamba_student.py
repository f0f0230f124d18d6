"""zoo.train.linearize with a Mamba-2 student (Mamba-in-Llama): the shape comes from the teacher's
attention, q/k/v/o land in C/B/x/out_proj head by head, the report says what came from where,
attention transfer lowers every replaced layer's MSE, and the student saves and reloads."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.train.linearize import attention_transfer, linearize, teacher_mixer_io
from zoo.train.mamba_init import GATE_BIAS, NORM_WEIGHT

MAMBA2 = {"type": "mamba2"}
H, H_KV, D = 4, 2, 16  # attention-tiny: d_model 64, 4 heads of 16, 2 KV heads
D_INNER = H * D


def _teacher(n_layers: int = 2) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    config = zoo.load_config("attention-tiny", n_layers=n_layers)
    return zoo.ZooForCausalLM(config).eval()


def _rows(weight: torch.Tensor, part: str) -> torch.Tensor:
    """in_proj's rows (or bias entries) for z, x, B, C or dt of the tiny student."""
    start = {"z": 0, "x": D_INNER, "B": 2 * D_INNER, "C": 3 * D_INNER, "dt": 4 * D_INNER}[part]
    return weight[start: start + (H if part == "dt" else D_INNER)]


def test_shape_is_derived_from_the_teacher_attention():
    student = linearize(_teacher(), {"type": "mamba2", "d_conv": 3, "d_state": D})
    mixer = student.model.layers[0].mixer
    assert student.config.mixer == {"type": "mamba2", "d_conv": 3, "d_state": 16, "head_dim": 16,
                                    "n_groups": 4, "expand": 1, "bias": True}
    assert (mixer.d_inner, mixer.n_heads, mixer.head_dim, mixer.d_state, mixer.n_groups) == (
        64, 4, 16, 16, 4)
    assert mixer.conv1d.weight.shape == (3 * D_INNER, 1, 3)


@torch.no_grad()
def test_mapped_slices_equal_the_teacher_weights():
    teacher = _teacher()
    student = linearize(teacher, MAMBA2)
    for layer in range(2):
        attention = teacher.model.layers[layer].mixer
        mixer = student.model.layers[layer].mixer
        w = mixer.in_proj.weight
        assert torch.equal(_rows(w, "C"), attention.q_proj.weight)
        for h in range(H):  # query head h reads KV head h // 2, as the teacher's GQA does
            kv = slice(h // (H // H_KV) * D, (h // (H // H_KV) + 1) * D)
            head = slice(h * D, (h + 1) * D)
            assert torch.equal(_rows(w, "B")[head], attention.k_proj.weight[kv]), (layer, h)
            assert torch.equal(_rows(w, "x")[head], attention.v_proj.weight[kv]), (layer, h)
        assert torch.equal(mixer.out_proj.weight, attention.o_proj.weight)
        # the fresh parts, as mamba_init chooses them
        assert torch.equal(_rows(w, "z"), torch.zeros(D_INNER, 64))
        bias = mixer.in_proj.bias
        assert torch.equal(_rows(bias, "z"), torch.full((D_INNER,), GATE_BIAS))
        assert not _rows(bias, "x").any() and not _rows(bias, "B").any()
        assert not _rows(bias, "C").any() and not _rows(bias, "dt").any()
        assert not mixer.out_proj.bias.any()
        identity = torch.zeros(3 * D_INNER, 1, 4)
        identity[:, 0, -1] = 1
        assert torch.equal(mixer.conv1d.weight, identity) and not mixer.conv1d.bias.any()
        assert torch.equal(mixer.norm.weight, torch.full((D_INNER,), NORM_WEIGHT))
        assert torch.equal(mixer.D, torch.ones(H))


@torch.no_grad()
def test_mapped_block_is_linear_attention_over_the_teacher_projections():
    """With no decay (A = 0), dt = 1 and D = 0, the SSD before the norm is
    y_t = sum_{s <= t} (silu(q_t) . silu(k_s)) silu(v_s) per query head, from the teacher's own
    q/k/v (without rotary) and the KV head each query head reads: the heads line up."""
    teacher = _teacher()
    student = linearize(teacher, MAMBA2)
    attention, mixer = teacher.model.layers[0].mixer, student.model.layers[0].mixer
    mixer.A_log.fill_(-30.0)
    _rows(mixer.in_proj.weight, "dt").zero_()
    mixer.dt_bias.fill_(float(torch.log(torch.expm1(torch.tensor(1.0)))))  # softplus^-1(1)
    mixer.D.zero_()
    captured = {}

    class Capture(torch.nn.Module):
        def forward(self, y, z):
            captured["y"] = y
            return y

    mixer.norm = Capture()
    x = torch.randn(2, 11, 64)
    out, _ = mixer(x)
    q = F.silu(attention.q_proj(x)).unflatten(-1, (H, D))
    k = F.silu(attention.k_proj(x)).unflatten(-1, (H_KV, D))
    v = F.silu(attention.v_proj(x)).unflatten(-1, (H_KV, D))
    expected = torch.zeros(2, 11, H, D)
    causal = torch.ones(11, 11).tril()
    for h in range(H):
        kv = h // (H // H_KV)
        scores = torch.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kv]) * causal
        expected[:, :, h] = scores @ v[:, :, kv]
    torch.testing.assert_close(captured["y"], expected.flatten(2), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, attention.o_proj(expected.flatten(2)), rtol=1e-4, atol=1e-4)


def test_report_lists_copied_mapped_and_new_tensors():
    student = linearize(_teacher(n_layers=3), MAMBA2, keep_attention=[1])
    report = student.linearization
    p = "model.layers.0.mixer."
    assert p + "out_proj.weight" in report.copied
    assert "model.layers.1.mixer.q_proj.weight" in report.copied  # the kept attention, by name
    assert "model.layers.0.ffn.gate_proj.weight" in report.copied
    assert sorted(n[len(p):] for n in report.new if n.startswith(p)) == [
        "A_log", "D", "conv1d.bias", "conv1d.weight", "dt_bias", "in_proj.bias",
        "in_proj.weight", "norm.weight", "out_proj.bias"]
    assert report.sources == {
        f"model.layers.{i}.mixer.{name}": [f"model.layers.{i}.mixer.{s}" for s in sources]
        for i in (0, 2)
        for name, sources in (("in_proj.weight", ["q_proj.weight", "k_proj.weight",
                                                  "v_proj.weight"]),
                              ("out_proj.weight", ["o_proj.weight"]))}
    assert not set(report.copied) & set(report.new)
    assert set(report.copied) | set(report.new) == set(student.state_dict())
    assert "in_proj.weight <- q_proj.weight, k_proj.weight, v_proj.weight" in report.summary()
    # stage 1 trains in_proj (z and dt live there) but not the copied out_proj
    trainable = report.new_parameters(student)
    assert p + "in_proj.weight" in trainable and p + "out_proj.weight" not in trainable


@torch.no_grad()
def test_teacher_biases_map_to_in_proj_and_out_proj_biases():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=H, num_key_value_heads=H_KV, tie_word_embeddings=True,
        attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    hf = LlamaForCausalLM(config).eval()
    student = linearize(hf, MAMBA2)
    attention, mixer = hf.model.layers[1].self_attn, student.model.layers[1].mixer
    bias = mixer.in_proj.bias
    assert torch.equal(_rows(bias, "C"), attention.q_proj.bias)
    assert torch.equal(_rows(bias, "B"), attention.k_proj.bias.unflatten(0, (H_KV, D))
                       .repeat_interleave(H // H_KV, 0).flatten())
    assert torch.equal(_rows(bias, "x"), attention.v_proj.bias.unflatten(0, (H_KV, D))
                       .repeat_interleave(H // H_KV, 0).flatten())
    assert torch.equal(mixer.out_proj.bias, attention.o_proj.bias)
    report = student.linearization
    assert "model.layers.1.mixer.out_proj.bias" in report.copied
    assert report.sources["model.layers.1.mixer.in_proj.bias"][0] == (
        "model.layers.1.mixer.q_proj.bias")


def test_attention_transfer_lowers_every_replaced_layer_mse():
    teacher = _teacher(n_layers=3)
    student = linearize(teacher, MAMBA2, keep_attention=[1])
    out_proj = student.model.layers[0].mixer.out_proj.weight.clone()
    gen = torch.Generator().manual_seed(1)

    def batches(step):
        return torch.randint(0, 256, (4, 48), generator=gen)

    eval_ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(9))
    result = attention_transfer(teacher, student, batches, steps=60, eval_ids=eval_ids,
                                progress=False)
    assert sorted(result.before) == [0, 2]
    # on the held-out batch every layer ends lower (measured: about half), and below what
    # outputting nothing scores (the mean square of the teacher attention's output)
    ratios = {i: result.after[i] / result.before[i] for i in (0, 2)}
    assert all(r < 0.8 for r in ratios.values()), ratios
    _, outputs = teacher_mixer_io(teacher, eval_ids, [0, 2])
    for i in (0, 2):
        assert result.after[i] < 0.75 * float(outputs[i].square().mean()), (i, result.after)
    assert "model.layers.0.mixer.in_proj.weight" in result.trained_parameters
    assert torch.equal(student.model.layers[0].mixer.out_proj.weight, out_proj)  # copied: frozen


@torch.no_grad()
def test_student_saves_and_reloads_with_identical_logits(tmp_path):
    student = linearize(_teacher(n_layers=3), MAMBA2, keep_attention=[2])
    student.save_pretrained(tmp_path)
    loaded = zoo.ZooForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mixer == student.config.mixer
    assert loaded.config.describe_layers() == [
        "mamba2 + swiglu", "mamba2 + swiglu", "attention + swiglu"]
    ids = torch.randint(0, 256, (2, 19))
    assert torch.equal(loaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize("option,value,allowed", [
    ("d_state", 32, "d_state=16"),
    ("n_groups", 2, "n_groups=4"),  # one group per KV head cannot hold four heads' q in C
    ("head_dim", 32, "head_dim=16"),
    ("expand", 2, "expand=1"),
])
def test_options_that_break_the_mapping_are_named(option, value, allowed):
    with pytest.raises(ValueError, match=rf"mixer\.{option}={value} does not fit .* allowed: "
                                         rf"{allowed}, or leave it out"):
        linearize(_teacher(), {"type": "mamba2", option: value})


def test_bias_false_drops_teacher_biases_and_is_refused():
    config = zoo.load_config("attention-tiny")
    config.mixer = {**config.mixer, "qkv_bias": True}
    teacher = zoo.ZooForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"mixer\.bias=False would drop the teacher's attention "
                                         r"biases .* allowed: bias=True"):
        linearize(teacher, {"type": "mamba2", "bias": False})


@torch.no_grad()
def test_bias_false_on_a_bias_free_teacher_starts_the_block_at_zero():
    """Without an in_proj bias z's gate starts at silu(0) = 0: the replaced block adds nothing
    to the residual stream until z learns, rather than a random gate's noise."""
    student = linearize(_teacher(), {"type": "mamba2", "bias": False})
    mixer = student.model.layers[0].mixer
    assert mixer.in_proj.bias is None
    assert torch.equal(mixer.out_proj.weight, _teacher().model.layers[0].mixer.o_proj.weight)
    y, _ = mixer(torch.randn(1, 7, 64))
    assert not y.any()
