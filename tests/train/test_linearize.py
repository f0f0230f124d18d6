"""zoo.train.linearize: the student has the teacher's shape, copies what it can, equals the
teacher exactly where no layer was replaced, and attention transfer lowers each layer's MSE."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import zoo
from zoo.testing import relative_error
from zoo.train.linearize import attention_transfer, freeze_copied, linearize, teacher_mixer_io

HEDGEHOG = {"type": "linear_attention", "feature_map": "hedgehog"}


def _teacher(n_layers: int = 4, vocab: int = 256) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    config = zoo.load_config("attention-tiny", n_layers=n_layers, vocab_size=vocab)
    return zoo.ZooForCausalLM(config).eval()


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def test_keep_every_layer_gives_identical_logits():
    teacher = _teacher()
    student = linearize(teacher, HEDGEHOG, keep_attention=range(4))
    assert student.linearization.replaced == [] and student.linearization.kept == [0, 1, 2, 3]
    assert student.linearization.new == []
    ids = torch.randint(0, 256, (2, 33))
    assert torch.equal(student(ids).logits, teacher(ids).logits)


@torch.no_grad()
def test_kept_layers_equal_the_teacher_given_the_same_inputs():
    teacher = _teacher()
    student = linearize(teacher, HEDGEHOG, keep_attention=[1, -1])
    assert student.linearization.kept == [1, 3] and student.linearization.replaced == [0, 2]
    assert student.config.describe_layers() == [
        "linear_attention + swiglu", "attention + swiglu",
        "linear_attention + swiglu", "attention + swiglu"]
    x = torch.randn(2, 21, teacher.config.d_model)
    for i in range(4):
        y_teacher, _ = teacher.model.layers[i](x, None)
        y_student, _ = student.model.layers[i](x, None)
        if i in (1, 3):
            assert torch.equal(y_student, y_teacher), f"kept layer {i}"
        else:
            assert not torch.equal(y_student, y_teacher), f"replaced layer {i}"
    # the embedding output (hidden_states[0]) is identical too: the embedding was copied
    ids = torch.randint(0, 256, (1, 9))
    t = teacher(ids, output_hidden_states=True).hidden_states
    s = student(ids, output_hidden_states=True).hidden_states
    assert torch.equal(s[0], t[0])


def test_report_names_copied_and_new_tensors():
    teacher = _teacher(n_layers=2)
    student = linearize(teacher, HEDGEHOG)
    report = student.linearization
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model.layers.0.mixer.{name}.weight" in report.copied
    assert "model.embed_tokens.weight" in report.copied
    assert "model.layers.1.ffn.gate_proj.weight" in report.copied
    assert "model.layers.0.mixer_norm.weight" in report.copied
    assert sorted(n for n in report.new if n.startswith("model.layers.0.")) == [
        f"model.layers.0.mixer.feature_map.{k}"
        for k in ("key_bias", "key_weight", "query_bias", "query_weight")]
    # the replacement inherited the teacher's head layout
    assert report.mixer["n_heads"] == 4 and report.mixer["n_kv_heads"] == 2
    assert "copied from the teacher" in report.summary()
    # copied tensors are equal, new ones keep their own init (hedgehog: the identity)
    t, s = teacher.state_dict(), student.state_dict()
    q = "model.layers.0.mixer.q_proj.weight"
    assert torch.equal(s[q], t[q])
    assert torch.equal(s["model.layers.0.mixer.feature_map.query_weight"][0], torch.eye(16))


def test_retnet_replacement_copies_only_matching_shapes():
    teacher = _teacher(n_layers=2)  # GQA: k_proj is (32, 64), RetNet's is (64, 64)
    student = linearize(teacher, "retnet")
    report = student.linearization
    assert "model.layers.0.mixer.q_proj.weight" in report.copied
    assert "model.layers.0.mixer.k_proj.weight" in report.new  # shape differs
    assert "model.layers.0.mixer.g_proj.weight" in report.new  # no such teacher tensor
    assert "model.layers.0.ffn.up_proj.weight" in report.copied


@torch.no_grad()
def test_llama_layout_teacher_linearizes():
    hf = _llama()
    kept = linearize(hf, HEDGEHOG, keep_attention=[0, 1, 2])
    ids = torch.randint(0, 120, (2, 15))
    assert relative_error(hf(ids).logits, kept(ids).logits) <= 1e-5
    student = linearize(hf, {"type": "linear_attention", "feature_map": "elu+1"},
                        keep_attention=[2])
    assert student.linearization.replaced == [0, 1]
    assert "model.layers.0.mixer.k_proj.weight" in student.linearization.copied
    assert torch.equal(student.model.layers[0].mixer.q_proj.weight,
                       hf.model.layers[0].self_attn.q_proj.weight)
    assert student(ids).logits.shape == (2, 15, 120)


def test_attention_transfer_lowers_every_layer_mse_and_trains_only_new_parameters():
    teacher = _teacher(n_layers=3)
    student = linearize(teacher, HEDGEHOG, keep_attention=[1])
    copied = {k: v.clone() for k, v in student.state_dict().items()
              if k in student.linearization.copied}
    gen = torch.Generator().manual_seed(1)

    def batches(step):
        return torch.randint(0, 256, (4, 48), generator=gen)

    eval_ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(9))
    result = attention_transfer(teacher, student, batches, steps=60, lr=2e-2, eval_ids=eval_ids,
                                progress=False)
    assert sorted(result.before) == [0, 2]
    # measured on a held-out batch: every layer lower, on average by a fifth or more (the
    # random teacher's rotary positions are out of reach of a position-free linear attention)
    ratios = {i: result.after[i] / result.before[i] for i in (0, 2)}
    assert all(r < 1.0 for r in ratios.values()), ratios
    assert sum(ratios.values()) / 2 < 0.8, ratios
    assert len(result.history) == 60 and set(result.history[-1]["layers"]) == {0, 2}
    assert all(".feature_map." in n for n in result.trained_parameters)
    for name, value in student.state_dict().items():
        if name in copied:
            assert torch.equal(value, copied[name]), f"{name} changed in stage 1"
    assert all(p.requires_grad for p in student.parameters())  # unfrozen on return


def test_attention_ce_teaches_the_teachers_attention_weights():
    """transfer with attention_ce: the cross-entropy of the student's attention rows against
    the teacher's falls, and a student without attention weights is a named error."""
    from zoo.train.linearize import layer_attention_ce, teacher_mixer_io

    teacher = _teacher(n_layers=2)
    window = {"type": "window_linear_attention", "window": 4, "feature_map": "hedgehog"}
    student = linearize(teacher, window)
    gen = torch.Generator().manual_seed(1)
    eval_ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(9))

    def ce() -> float:
        inputs, _ = teacher_mixer_io(teacher, eval_ids, [0, 1])
        with torch.no_grad():
            return float(torch.stack(list(layer_attention_ce(student, teacher, inputs).values()))
                         .mean())

    before = ce()
    result = attention_transfer(teacher, student, lambda s: torch.randint(0, 256, (4, 32),
                                                                          generator=gen),
                                steps=30, lr=2e-2, progress=False, attention_ce=1.0)
    assert "attention_ce" in result.history[-1]
    assert ce() < 0.9 * before, (before, ce())
    linear = linearize(teacher, HEDGEHOG)
    with pytest.raises(ValueError, match="attention_ce: the student's layer 0 mixer"):
        attention_transfer(teacher, linear, lambda s: eval_ids, steps=1, progress=False,
                           attention_ce=1.0)


def test_elu_student_has_nothing_new_to_train_in_stage_one():
    teacher = _teacher(n_layers=2)
    student = linearize(teacher, {"type": "linear_attention", "feature_map": "elu+1"})
    assert freeze_copied(student, student.linearization) == []
    result = attention_transfer(teacher, student, lambda s: torch.randint(0, 256, (2, 16)),
                                steps=5, progress=False)
    assert result.steps == 0 and result.after == result.before


@torch.no_grad()
def test_teacher_mixer_io_records_the_normed_inputs():
    teacher = _teacher(n_layers=2)
    ids = torch.randint(0, 256, (1, 7))
    inputs, outputs = teacher_mixer_io(teacher, ids, [1])
    hidden = teacher(ids, output_hidden_states=True).hidden_states
    block = teacher.model.layers[1]
    assert torch.equal(inputs[1], block.mixer_norm(hidden[1]))
    assert torch.equal(outputs[1], block.mixer(block.mixer_norm(hidden[1]))[0])


@pytest.mark.parametrize("kwargs,message", [
    ({"keep_attention": [4]}, "keep_attention entry 4 is outside 0..3"),
    ({"keep_attention": ["a"]}, "keep_attention entry 'a'"),
    ({"mixer": {"type": "nope"}}, "mixer.type='nope' is not registered"),
    ({"mixer": {"feature_map": "hedgehog"}}, "must name a 'type'"),
    ({"mixer": {"type": "linear_attention", "feature_map": "cosine"}}, "feature_map"),
])
def test_bad_arguments_are_named(kwargs, message):
    teacher = _teacher()
    kwargs = {"mixer": HEDGEHOG, **kwargs}
    with pytest.raises(ValueError, match=message):
        linearize(teacher, **kwargs)


def test_non_attention_layers_cannot_be_kept():
    teacher = linearize(_teacher(n_layers=2), HEDGEHOG, keep_attention=[1])
    with pytest.raises(ValueError, match="layer 0 is not an attention layer"):
        linearize(teacher, HEDGEHOG, keep_attention=[0])


@pytest.mark.slow
@torch.no_grad()
def test_smollm2_keep_all_equals_teacher_and_hedgehog_student_builds(smollm2_read_once):
    """Slow (SmolLM2-135M, read once per session): the real teacher through linearize."""
    teacher = zoo.from_hf("smollm2-135m")
    ids = torch.randint(0, 49152, (1, 12))
    expected = teacher(ids).logits
    same = linearize(teacher, HEDGEHOG, keep_attention=range(30))
    assert torch.equal(same(ids).logits, expected)
    del same
    student = linearize(teacher, HEDGEHOG, keep_attention=[0, 15, 29])
    assert student.linearization.replaced == [i for i in range(30) if i not in (0, 15, 29)]
    assert student.config.vocab_size == 49152 and student.tokenizer is not None
    assert torch.isfinite(student(ids).logits).all()


@torch.no_grad()
@pytest.mark.parametrize("rope_theta", [10000.0, 500.0])
def test_window_student_equals_the_teacher_while_the_window_holds_every_token(rope_theta):
    """Sliding-window + linear attention with W >= T is the teacher's softmax exactly: the
    copied q/k/v/o, and the teacher's rotary base, inherited."""
    torch.manual_seed(0)
    config = zoo.load_config("attention-tiny", n_layers=2)
    config.mixer = {**config.mixer, "rope_theta": rope_theta}
    teacher = zoo.ZooForCausalLM(config).eval()
    student = linearize(teacher, {"type": "window_linear_attention", "window": 64})
    assert student.config.mixer["rope_theta"] == rope_theta
    ids = torch.randint(0, 256, (2, 40))
    assert relative_error(teacher(ids).logits, student(ids).logits) < 1e-5
    longer = torch.randint(0, 256, (1, 150))  # past the window the linear part takes over
    assert relative_error(teacher(longer).logits, student(longer).logits) > 1e-4


@pytest.mark.parametrize("teacher_theta,spec,expected", [
    ("omitted", {}, 10000.0),  # Attention's default, which the teacher's layers rotate with
    (500.0, {}, 500.0),
    (None, {}, None),  # a position-free teacher gives a position-free student
    ("omitted", {"rope_theta": None}, None),  # the caller's explicit null keeps it free
    (500.0, {"rope_theta": 2000.0}, 2000.0),
    ("omitted", {"feature_maps_after_rotary": False}, 10000.0),
])
def test_linear_attention_student_inherits_the_teachers_effective_rotary_base(
        teacher_theta, spec, expected):
    config = zoo.load_config("attention-tiny", n_layers=2)
    assert "rope_theta" not in config.mixer  # the shipped config relies on the default
    if teacher_theta != "omitted":
        config.mixer = {**config.mixer, "rope_theta": teacher_theta}
    teacher = zoo.ZooForCausalLM(config).eval()
    student = linearize(teacher, {**HEDGEHOG, **spec})
    assert student.config.mixer["rope_theta"] == expected
    assert student.linearization.mixer["rope_theta"] == expected
    for i in student.linearization.replaced:
        mixer = student.model.layers[i].mixer
        theta = None if mixer.rotary is None else mixer.rotary.theta
        assert theta == expected, f"layer {i}"
        teacher_rotary = teacher.model.layers[i].mixer.rotary
        if expected is not None and "rope_theta" not in spec:
            assert theta == teacher_rotary.theta


@torch.no_grad()
def test_rotary_student_decodes_token_by_token_to_its_full_forward():
    """The inherited rotary positions ride in the state: the student's logits one token at a
    time equal its whole-sequence logits."""
    student = linearize(_teacher(n_layers=2), HEDGEHOG)
    assert student.model.layers[0].mixer.rotary is not None
    ids = torch.randint(0, 256, (2, 19))
    full = student(ids, use_cache=False).logits
    cache, pieces = None, []
    for t in range(ids.shape[1]):
        out = student(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache, pieces = out.cache, [*pieces, out.logits]
    assert relative_error(full, torch.cat(pieces, dim=1)) < 1e-5
