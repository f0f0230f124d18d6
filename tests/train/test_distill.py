"""Distillation: every loss decreases on a tiny teacher/student pair, the run config names its
bad fields, a vocabulary mismatch is refused, and `zoo distill` runs both stages end to end
(teacher logits online and from the memory-mapped cache)."""

import json
import shutil

import pytest
import torch
import yaml

import zoo
from zoo.train import losses as L
from zoo.train.config import RunConfigError
from zoo.train.distill import (
    Distiller,
    TeacherLogitsCache,
    load_distill_config,
    load_teacher,
    teacher_generate,
)

TEXT = "".join(
    f"def function_{i}(x, y={i}):\n    '''Return x times {i} plus y.'''\n"
    f"    return x * {i} + y  # line {i}\n\n" for i in range(400)
)


def _model(d_model=32, n_layers=2, vocab=256, seed=0):
    torch.manual_seed(seed)
    config = zoo.load_config("attention-tiny", d_model=d_model, n_layers=n_layers,
                             vocab_size=vocab, mixer={"type": "attention", "n_heads": 2})
    return zoo.ZooForCausalLM(config)


@pytest.fixture(scope="module")
def teacher_model():
    """A small attention teacher with a little training on the text, so it has opinions."""
    model = _model(d_model=48, n_layers=2, seed=1)
    data = torch.tensor(list(TEXT.encode()))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        ids = torch.stack([data[s: s + 64] for s in starts])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _batch(n=4, t=48, seed=3):
    data = torch.tensor(list(TEXT.encode()))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - t - 1, (n,), generator=gen)
    return torch.stack([data[s: s + t] for s in starts])


@pytest.mark.parametrize("loss_name", ["forward_kl", "forward_kl_topk", "reverse_kl", "ce",
                                       "hidden", "seq_kd"])
def test_each_loss_decreases_on_a_tiny_pair(teacher_model, loss_name):
    teacher = load_teacher(teacher_model)
    student = _model(d_model=32, n_layers=2, seed=5)  # narrower: hidden needs a projection
    ids = _batch()
    with torch.no_grad():
        t_logits, t_hidden = teacher.forward(ids, hidden=True)
    projection = L.HiddenProjection(L.parse_layer_map(None, 2, 2), 32, 48)
    assert len(projection.maps) == 2
    if loss_name == "seq_kd":
        generated = teacher_generate(teacher, ids[:, :16], 48, temperature=1.0,
                                     generator=torch.Generator().manual_seed(0))
        assert generated.shape == (4, 48) and torch.equal(generated[:, :16], ids[:, :16])
        seq_labels = generated.clone()
        seq_labels[:, :16] = L.IGNORE
    params = list(student.parameters()) + list(projection.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)

    def compute():
        out = student(ids, use_cache=False, output_hidden_states=True)
        if loss_name == "forward_kl":
            return L.forward_kl(out.logits, t_logits, temperature=2.0)
        if loss_name == "forward_kl_topk":
            values, indices = t_logits.topk(8, dim=-1)
            return L.forward_kl(out.logits, (indices, values), temperature=2.0)
        if loss_name == "reverse_kl":
            return L.reverse_kl(out.logits, t_logits, temperature=2.0)
        if loss_name == "ce":
            return L.cross_entropy(out.logits, ids)
        if loss_name == "hidden":
            return L.hidden_mse(out.hidden_states, t_hidden, projection)
        return L.cross_entropy(student(generated, use_cache=False).logits, seq_labels)

    first = float(compute().detach())
    for _ in range(25):
        loss = compute()
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(compute().detach())
    assert last < 0.7 * first, (loss_name, first, last)


def test_kl_properties():
    torch.manual_seed(0)
    z = torch.randn(2, 5, 11)
    w = torch.randn(2, 5, 11)
    assert float(L.forward_kl(z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(L.reverse_kl(z, z)) == pytest.approx(0.0, abs=1e-6)
    # top-k with k = the whole vocabulary is the full forward KL
    values, indices = w.topk(11, dim=-1)
    assert float(L.forward_kl(z, (indices, values), temperature=3.0)) == pytest.approx(
        float(L.forward_kl(z, w, temperature=3.0)), rel=1e-5)
    # the T^2 factor: a temperature-T KL equals T^2 times the plain KL of the softened logits
    assert float(L.forward_kl(z, w, temperature=2.0)) == pytest.approx(
        4.0 * float(L.forward_kl(z / 2, w / 2)), rel=1e-5)
    # the mask scores only the chosen positions
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :2] = True
    assert float(L.forward_kl(z, w, mask=mask)) == pytest.approx(
        float(L.forward_kl(z[:, :2], w[:, :2])), rel=1e-5)
    with pytest.raises(ValueError, match="share the vocabulary"):
        L.forward_kl(z, torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="full distribution"):
        L.reverse_kl(z, (indices, values))


# ---------------------------------------------------------------------------------------------
# Run configs and the distiller


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(8):
        (folder / f"doc{i}.py").write_text(TEXT[i * 3000: (i + 1) * 3000 + 2000])
    return folder


def _run(tmp_path, corpus, **sections):
    base = {
        "name": "t", "out_dir": str(tmp_path / "out"),
        "teacher": {"source": "unused-when-passed"},
        "student": {"linearize": {"mixer": {"type": "linear_attention",
                                            "feature_map": "hedgehog"},
                                  "keep_attention": [1]}},
        "distill": {"forward_kl": 1.0, "ce": 0.5, "temperature": 2.0},
        "transfer": {"steps": 4, "batch_size": 2},
        "data": {"paths": [str(corpus)], "tokenizer": "teacher", "val_fraction": 0.25,
                 "cache_dir": str(tmp_path / "tokens")},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 32, "eval_interval": 3,
                  "eval_batches": 1, "device": "cpu"},
        "checkpoint": {"interval": 0, "keep_last": 1},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and isinstance(base.get(key), dict) and key != "student"
        base[key] = {**base[key], **value} if merge else value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_distill_runs_both_stages_and_writes_its_outputs(tmp_path, corpus, teacher_model):
    run = load_distill_config(_run(tmp_path, corpus))
    distiller = Distiller(run, teacher=teacher_model, progress=False)
    assert distiller.report.replaced == [0] and distiller.report.kept == [1]
    summary = distiller.fit()
    out = tmp_path / "out"
    assert (out / "final" / "config.json").exists() and (out / "distill.png").exists()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["kd_steps"] == 6 and saved["kd_tokens"] == 6 * 4 * 32
    assert saved["tokens_seen"] == 6 * 4 * 32 + 4 * 2 * 32
    assert summary["teacher_val_ppl"] > 1 and summary["student_val_ppl"] > 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"teacher_eval", "transfer", "transfer_end", "train", "eval", "end"} <= kinds
    train = [r for r in records if r["kind"] == "train"]
    assert {"forward_kl", "ce", "loss"} <= set(train[0])
    # the saved student loads as a hybrid zoo model
    loaded = zoo.ZooForCausalLM.from_pretrained(out / "final")
    assert loaded.config.describe_layers() == ["linear_attention + swiglu", "attention + swiglu"]


def test_teacher_logits_cache_is_filled_once_and_reused(tmp_path, corpus, teacher_model):
    cache_dir = tmp_path / "logits"
    run = load_distill_config(_run(
        tmp_path, corpus, transfer={"steps": 0},
        distill={"teacher_logits": "cache", "cache_top_k": 16, "cache_dir": str(cache_dir),
                 "ce": 0.0}))
    distiller = Distiller(run, teacher=teacher_model, progress=False)
    cache = distiller.logits_cache
    assert cache.filled_fraction == 0.0
    distiller.fit()
    filled = int(cache.filled.sum())
    assert filled > 0
    # cached top-k equals the teacher's own top-k (float16 storage)
    window = int(cache.filled.nonzero()[0][0])
    ids = torch.from_numpy(
        distiller.dataset.cache.train[window * 32: (window + 1) * 32].astype("int64"))[None]
    with torch.no_grad():
        values, _ = teacher_model(ids, use_cache=False).logits.topk(16, dim=-1)
    cached = torch.from_numpy(cache.values[window].astype("float32"))
    assert torch.allclose(cached, values[0], atol=2e-2)
    # a second student (another mixer) on the same teacher and data finds the cache filled
    run2 = load_distill_config(_run(
        tmp_path, corpus, out_dir=str(tmp_path / "out2"), transfer={"steps": 0},
        student={"linearize": {"mixer": "retnet"}},
        distill={"teacher_logits": "cache", "cache_top_k": 16, "cache_dir": str(cache_dir),
                 "ce": 0.0}))
    second = Distiller(run2, teacher=teacher_model, progress=False)
    assert second.logits_cache.folder == cache.folder
    assert int(second.logits_cache.filled.sum()) == filled


def test_full_logits_cache_round_trips(tmp_path):
    cache = TeacherLogitsCache(tmp_path, {"k": 1}, num_windows=3, seq_len=4, top_k=0,
                               vocab_size=10)
    logits = torch.randn(2, 4, 10)
    calls = []

    def compute(rows):
        calls.append(rows)
        return logits[rows]

    import numpy as np

    first = cache.get(np.array([2, 0]), compute)
    again = cache.get(np.array([2, 0]), compute)
    assert calls == [[0, 1]]
    assert torch.allclose(first, logits, atol=1e-2) and torch.equal(first, again)


def test_vocabulary_mismatch_is_a_clear_error(tmp_path, corpus, teacher_model):
    run = load_distill_config(_run(
        tmp_path, corpus, student={"config": "attention-tiny",
                                   "overrides": {"vocab_size": 512}},
        transfer={"steps": 0}))
    with pytest.raises(RunConfigError, match="vocabulary mismatch.*vocab_size=512.*256"):
        Distiller(run, teacher=teacher_model, progress=False)


def test_a_tokenizer_other_than_the_teachers_is_refused(tmp_path, corpus, teacher_model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): c - 32 for c in range(32, 127)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    run = load_distill_config(_run(tmp_path, corpus, data={"tokenizer": str(path)}))
    with pytest.raises(RunConfigError, match="not the teacher's tokenizer"):
        Distiller(run, teacher=teacher_model, progress=False)


@pytest.mark.parametrize("override,field", [
    ("distill.temperature=0", "distill.temperature"),
    ("distill.teacher_logits=disk", "distill.teacher_logits"),
    ("distill.forward_kl=-1", "distill.forward_kl"),
    ("distill.forward_kl=0;distill.ce=0", "at least one positive loss weight"),
    ("distill.bogus=1", "distill.bogus"),
    ("student.config=attention-tiny", "exactly one of student.config"),
    ("student.linearize.keep=[1]", "student.linearize.keep"),
    ("student.linearize.keep_attention=one", "student.linearize.keep_attention"),
    ("transfer.steps=-1", "transfer.steps"),
    ("transfer.attention_ce=-1", "transfer.attention_ce"),
    ("transfer.attention_ce=1", "transfer.attention_ce"),  # linear_attention has no weights
    ("train.seq_len=0", "train.seq_len"),
    ("teacher.source=", "teacher.source"),
    ("teacher.dtype=int8", "teacher.dtype"),
    ("distill.trainable=some", "distill.trainable"),
    ("distill.seq_kd=1;distill.seq_kd_prompt_tokens=32", "distill.seq_kd_prompt_tokens"),
])
def test_bad_run_config_fields_are_named(tmp_path, corpus, override, field):
    path = _run(tmp_path, corpus)
    overrides = override.split(";")
    with pytest.raises(RunConfigError, match=field.replace("[", r"\[")):
        load_distill_config(path, overrides)


def test_cache_refuses_losses_that_need_the_live_teacher(tmp_path, corpus):
    path = _run(tmp_path, corpus)
    with pytest.raises(RunConfigError, match="distill.hidden"):
        load_distill_config(path, ["distill.teacher_logits=cache", "distill.hidden=1"])
    with pytest.raises(RunConfigError, match="distill.reverse_kl"):
        load_distill_config(path, ["distill.teacher_logits=cache", "distill.reverse_kl=1"])


def test_teacher_from_a_zoo_directory_and_a_missing_source(tmp_path, teacher_model):
    teacher_model.save_pretrained(tmp_path / "zoo-teacher")
    teacher = load_teacher(str(tmp_path / "zoo-teacher"))
    assert teacher.is_zoo and teacher.vocab_size == 256
    with pytest.raises(RunConfigError, match="teacher.source='nowhere'"):
        load_teacher("nowhere")


def test_hf_directory_teacher_of_another_layout_distils_into_a_config(tmp_path, corpus):
    """A transformers causal LM zoo cannot convert (GPT-2) is still a KD teacher."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=1,
                                    n_head=2)).eval()
    hf.save_pretrained(tmp_path / "gpt2")
    path = _run(tmp_path, corpus, teacher={"source": str(tmp_path / "gpt2")},
                student={"config": "attention-tiny"}, transfer={"steps": 0},
                data={"tokenizer": "byte"},
                distill={"forward_kl": 1.0, "ce": 0.0, "hidden": 0.5},
                train={"steps": 2})
    run = load_distill_config(path)
    distiller = Distiller(run, progress=False)
    assert not distiller.teacher.is_zoo
    summary = distiller.fit()
    assert summary["kd_steps"] == 2
    with pytest.raises(RunConfigError, match="not an attention model zoo can convert"):
        load = load_distill_config(_run(tmp_path, corpus, out_dir=str(tmp_path / "o3"),
                                        teacher={"source": str(tmp_path / "gpt2")},
                                        data={"tokenizer": "byte"}))
        Distiller(load, progress=False)


def test_cli_distill(tmp_path, corpus, teacher_model, capsys):
    from zoo.app.cli import main

    teacher_model.save_pretrained(tmp_path / "teacher")
    path = _run(tmp_path, corpus, teacher={"source": str(tmp_path / "teacher")},
                data={"tokenizer": "byte"}, train={"steps": 2}, transfer={"steps": 2})
    code = main(["distill", str(path), "--no-progress", "--set", "distill.seq_kd=0.5",
                 "--set", "distill.seq_kd_prompt_tokens=8", "--report",
                 str(tmp_path / "report" / "r"), "--contexts", "16,64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "teacher ppl" in printed and "student ppl" in printed
    report = (tmp_path / "report" / "r.md").read_text()
    assert "decode ms/token at 64 context" in report and "Gap" in report
    data = json.loads((tmp_path / "report" / "r.json").read_text())
    assert {(r["model"], r["context"]) for r in data["decode"]} == {
        ("student", 16), ("student", 64), ("teacher", 16), ("teacher", 64)}
    train = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text()
             .splitlines() if '"train"' in line]
    assert "seq_kd" in train[0]
    # bad fields through the CLI: exit code 2 and the field in the message
    assert main(["distill", str(path), "--set", "distill.temperature=-1"]) == 2
    assert "distill.temperature" in capsys.readouterr().err


def test_sigterm_stops_kd_with_a_checkpoint_and_the_resumed_run_ends_as_uninterrupted(
        tmp_path, corpus, teacher_model):
    """Stage 2 runs in the training loop: SIGTERM ends it after the current step with a
    checkpoint of that step; --resume from there ends with the weights and losses of the run
    that was never stopped (the same loop, resume and RNG handling as `zoo train`)."""
    import os
    import signal
    import threading
    import time

    from zoo.train.metrics import read_metrics, train_losses

    sections = {"distill": LORA, "transfer": {"steps": 6},
                "train": {"steps": 8, "eval_interval": 0, "log_interval": 1}}
    reference = load_distill_config(_run(tmp_path, corpus, out_dir=str(tmp_path / "ref"),
                                         **sections))
    Distiller(reference, teacher=teacher_model, progress=False).fit()

    run = load_distill_config(_run(tmp_path, corpus, out_dir=str(tmp_path / "cut"), **sections))
    first = Distiller(run, teacher=teacher_model, progress=False)

    def terminate():
        while first.step < 2:
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate, daemon=True).start()
    summary = first.fit()
    assert summary["interrupted"] == "SIGTERM" and 2 <= summary["step"] < 8
    assert summary["checkpoint"].name == f"step_{summary['step']:06d}"
    assert not (tmp_path / "cut" / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    resumed = Distiller(run, resume=True, teacher=teacher_model, progress=False)
    assert resumed.fit()["step"] == 8
    expected, got = _safetensors(tmp_path / "ref" / "final"), _safetensors(tmp_path / "cut" /
                                                                          "final")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "ref")
    # stage 1 counts its own steps: a resume at KD step < 6 keeps all six of its records
    transfer = [r["step"] for r in read_metrics(tmp_path / "cut") if r["kind"] == "transfer"]
    assert transfer == [1, 2, 3, 4, 5, 6]


def test_one_distillation_per_out_dir_and_the_lock_is_released_after_fit(
        tmp_path, corpus, teacher_model):
    run = load_distill_config(_run(tmp_path, corpus, transfer={"steps": 0},
                                   train={"steps": 1, "eval_interval": 0}))
    first = Distiller(run, teacher=teacher_model, progress=False)
    with pytest.raises(RunConfigError, match="in use by another running zoo distill"):
        Distiller(run, overwrite=True, teacher=teacher_model, progress=False)
    first.fit()
    Distiller(run, overwrite=True, teacher=teacher_model, progress=False).fit()


# ---------------------------------------------------------------------------------------------
# LoRA in stage 2 (distill.lora)

LORA = {"lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1}}  # trainable: adapters by default


def _safetensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_distill_with_lora_trains_only_the_adapters_and_saves_a_merged_student(
        tmp_path, corpus, teacher_model):
    from transformers import AutoModelForCausalLM

    from zoo.train.checkpoint import list_checkpoints
    from zoo.train.lora import tuner_layers

    run = load_distill_config(_run(tmp_path, corpus, distill=LORA, transfer={"steps": 2},
                                   train={"steps": 3, "eval_interval": 0}))
    distiller = Distiller(run, teacher=teacher_model, progress=False)
    summary = distiller.fit()
    assert summary["lora"]["rank"] == 4 and summary["lora"]["targets"] == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    out = tmp_path / "out"
    # the last KD checkpoint holds the adapters, unmerged (what --resume continues from)
    held = _safetensors(list_checkpoints(out / "checkpoints")[-1])
    assert "model.layers.0.mixer.q_proj.lora_B.default.weight" in held
    assert not any(".lora_" in k for k in held if ".layers.1." in k)  # kept layer: no adapters
    # final/ is the merged student: the plain zoo keys, nothing of peft
    final = _safetensors(out / "final")
    assert not any("lora" in k or "base_layer" in k for k in final)
    new = set(distiller.report.new)  # the linearisation's own tensors (Hedgehog's maps)
    assert new and set(final) <= set(teacher_model.state_dict()) | new
    # the in-memory student was merged too, and AutoModelForCausalLM loads what was saved
    assert not tuner_layers(distiller.student)
    loaded = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    assert isinstance(loaded, zoo.ZooForCausalLM)
    ids = _batch(n=2, t=40)
    with torch.no_grad():
        expected = distiller.student.eval()(ids, use_cache=False).logits
        assert torch.equal(loaded(ids, use_cache=False).logits, expected)
    # what trained: the adapted projections (merged into them) and nothing else; everything
    # stage 1 did not touch is still the teacher's, bit for bit
    teacher = teacher_model.state_dict()
    for key, value in final.items():
        if ".layers.0.mixer." in key and key.rsplit(".", 2)[-2] in (
                "q_proj", "k_proj", "v_proj", "o_proj"):
            assert not torch.equal(value, teacher[key]), key
        elif key not in new:
            assert torch.equal(value, teacher[key]), key


def test_distill_with_lora_resumes_exactly(tmp_path, corpus, teacher_model):
    """A run stopped after KD step 4 (newest checkpoint: step 3), resumed, ends with the
    weights and losses of the same run uninterrupted (dropout on: the RNG is restored too)."""
    from zoo.train.metrics import train_losses

    sections = {"distill": LORA, "transfer": {"steps": 2},
                "train": {"steps": 6, "eval_interval": 0, "log_interval": 1},
                "checkpoint": {"interval": 3, "keep_last": 2}}
    reference = load_distill_config(_run(tmp_path, corpus, out_dir=str(tmp_path / "ref"),
                                         **sections))
    Distiller(reference, teacher=teacher_model, progress=False).fit()

    run = load_distill_config(_run(tmp_path, corpus, out_dir=str(tmp_path / "cut"),
                                   **sections))
    first = Distiller(run, teacher=teacher_model, progress=False)
    step = first.train_step

    def stop_after_four():
        if first.step == 4:
            raise KeyboardInterrupt  # a kill mid-KD, after the step-3 checkpoint
        return step()

    first.train_step = stop_after_four
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert not (tmp_path / "cut" / "final").exists()
    resumed = Distiller(run, resume=True, teacher=teacher_model, progress=False)
    assert resumed.resume_from.name == "step_000003" and resumed.adapters
    resumed.fit()

    expected, got = _safetensors(tmp_path / "ref" / "final"), _safetensors(tmp_path / "cut" /
                                                                          "final")
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "ref")


def test_resume_refuses_a_checkpoint_whose_adapters_do_not_fit(tmp_path, corpus, teacher_model):
    from zoo.train.checkpoint import CheckpointError

    path = _run(tmp_path, corpus, distill=LORA, transfer={"steps": 0},
                train={"steps": 2, "eval_interval": 0}, checkpoint={"interval": 1})
    Distiller(load_distill_config(path), teacher=teacher_model, progress=False).fit()
    changed = load_distill_config(path, ["distill.lora.rank=2"])
    with pytest.raises(CheckpointError, match="distill.lora"):
        Distiller(changed, resume=True, teacher=teacher_model, progress=False)


@pytest.mark.parametrize("override,field", [
    ("distill.lora.rank=0", "distill.lora.rank"),
    ("distill.lora.alpha=-1", "distill.lora.alpha"),
    ("distill.lora.dropout=1", "distill.lora.dropout"),
    ("distill.lora.targets=q_proj", "distill.lora.targets"),
    ("distill.lora.layers=[]", "distill.lora.layers"),
    ("distill.lora.bogus=1", "distill.lora.bogus"),
    ("distill.lora=4", "distill.lora"),
    ("distill.trainable=all", "distill.trainable='all' with distill.lora"),
    ("distill.lora=null;distill.trainable=adapters",
     "distill.trainable='adapters' needs distill.lora"),
    ("student={config: attention-tiny};distill.trainable=all",
     "distill.lora=.* needs a linearised student"),
])
def test_bad_lora_fields_are_named(tmp_path, corpus, override, field):
    path = _run(tmp_path, corpus, distill=LORA)
    with pytest.raises(RunConfigError, match=field):
        load_distill_config(path, override.split(";"))


@pytest.mark.parametrize("trainable,extra", [(None, set()), ("new", {"feature_map"}),
                                              ("mixers", {"feature_map"})])
def test_what_trains_in_stage_two_with_lora(tmp_path, corpus, teacher_model, trainable, extra):
    """The adapters always; the adapted projections' own weights never; beside them what
    distill.trainable names (the default with LoRA: nothing else)."""
    run = load_distill_config(_run(tmp_path, corpus, distill={
        **LORA, "trainable": trainable}, transfer={"steps": 0}))
    distiller = Distiller(run, teacher=teacher_model, progress=False)
    distiller._add_lora()
    params = distiller._set_trainable()
    trained = [n for n, p in distiller.student.named_parameters() if p.requires_grad]
    assert len(params) == len(trained)
    adapters = [n for n in trained if ".lora_" in n]
    assert adapters == distiller.adapters and len(adapters) == 8  # q/k/v/o of layer 0, A and B
    # model.layers.0.mixer.<module>...: the Hedgehog feature maps are the new parameters
    assert {n.split(".")[4] for n in trained if n not in adapters} == extra
    assert all(n.startswith("model.layers.0.mixer.") for n in trained)


def test_lora_targets_the_student_lacks_fail_before_stage_one(tmp_path, corpus, teacher_model):
    run = load_distill_config(_run(tmp_path, corpus, distill={
        **LORA, "lora": {"targets": ["q_proj", "wq"]}}))
    with pytest.raises(RunConfigError, match=r"distill.lora.targets.*'wq'.*allowed"):
        Distiller(run, teacher=teacher_model, progress=False)


def test_shipped_run_configs_leave_lora_off():
    from zoo.train.config import shipped_runs

    names = [n for n in shipped_runs() if n.startswith("smollm2")]
    assert names
    for name in names:
        config = load_distill_config(name)
        assert config.distill.lora is None and config.distill.trainable != "adapters"


# ---------------------------------------------------------------------------------------------
# The run folder (shared with zoo train): refusals come before the teacher is loaded

def test_distill_refuses_a_folder_it_did_not_make_before_loading_the_teacher(tmp_path, corpus):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "results"}')
    run = load_distill_config(_run(tmp_path, corpus, out_dir=str(mine)))
    for overwrite in (False, True):  # no teacher given: reaching its loading would fail
        with pytest.raises(RunConfigError, match="not a zoo run folder: it holds summary.json"):
            Distiller(run, overwrite=overwrite, progress=False)
    assert (mine / "summary.json").read_text() == '{"my": "results"}'


def test_distill_resume_refuses_a_changed_loss_and_restarts_a_run_without_checkpoints(
        tmp_path, corpus, teacher_model):
    from zoo.train.checkpoint import CheckpointError
    from zoo.train.metrics import read_metrics

    path = _run(tmp_path, corpus, transfer={"steps": 0}, train={"steps": 2, "eval_interval": 0},
                checkpoint={"interval": 1})
    Distiller(load_distill_config(path), teacher=teacher_model, progress=False).fit()
    changed = load_distill_config(path, ["distill.temperature=1.0"])
    with pytest.raises(CheckpointError, match=r"distill.temperature: checkpoint 2.0, this run "
                                              r"1.0\)"):
        Distiller(changed, resume=True, progress=False)  # before the teacher: none is given
    # a run stopped before its first checkpoint: --resume starts it again from step 0
    out = tmp_path / "out"
    shutil.rmtree(out / "checkpoints")
    shutil.rmtree(out / "final")
    resumed = Distiller(load_distill_config(path), resume=True, teacher=teacher_model,
                        progress=False)
    assert resumed.resume_from is None
    assert resumed.fit()["step"] == 2
    assert [r["kind"] for r in read_metrics(out)][0] == "start"
