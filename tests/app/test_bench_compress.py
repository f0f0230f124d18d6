"""`zoo bench compress`: the quick run's rows, the targets its report checks, the read bound it
pairs with each run, the Q8_0 file it writes for llama.cpp, llama.cpp skipped with a reason, and
the rows of torch's aten kernels and of torchao (its test runs only where the optional
`bench-torchao` extra is installed, which `make test` and CI do not install)."""

import json
import sys

import numpy as np
import pytest
import torch

import zoo
from zoo.app.bench import BenchOptions, load_entries, run_bench
from zoo.app.bench import compress as bench
from zoo.compression import QuantizedLinear

gguf = pytest.importorskip("gguf")  # installed by `make test` (transformers' GGUF reader)

DECODE_FIELDS = ("engine", "model", "variant", "weights", "dtype", "ppl", "ppl_tokens",
                 "ppl_change", "weight_bytes", "bytes_per_weight", "context", "step",
                 "ms_per_token", "state_bytes", "read_bytes", "read_GB_per_s", "bound_ms",
                 "x_bound", "threads", "runs")
FAMILY_FIELDS = ("model", "variant", "weights", "ppl", "ppl_change", "kl_nats", "weight_bytes",
                 "bytes_per_weight", "left_float")


def test_quick_run_writes_every_field_of_every_row(tmp_path):
    load_entries()
    record = run_bench("compress", BenchOptions(quick=True, out_dir=tmp_path))
    rows = json.loads((tmp_path / "compress.json").read_text())["rows"]
    every_decode = [r for r in rows if r["kind"] == "decode"]
    decode = [r for r in every_decode if r["engine"] == "zoo"]
    assert [r["variant"] for r in decode] == ["fp32", "int8", "int4 g32 rtn"]
    for row in decode:
        missing = [f for f in DECODE_FIELDS if row.get(f) is None]
        assert not missing, f"{row['variant']}: no {missing}"
        assert row["context"] == 128 and row["engine"] == "zoo"
        # the bound reads the weights a step reads and the KV cache, at the measured bandwidth
        assert row["read_bytes"] > row["state_bytes"] > 0
        assert row["bound_ms"] == pytest.approx(row["read_bytes"] / row["read_GB_per_s"] / 1e6,
                                                rel=0.5)
    by_variant = {r["variant"]: r for r in decode}
    assert by_variant["fp32"]["bytes_per_weight"] == pytest.approx(4.0)
    assert (by_variant["fp32"]["weight_bytes"] > by_variant["int8"]["weight_bytes"]
            > by_variant["int4 g32 rtn"]["weight_bytes"])
    assert by_variant["fp32"]["ppl_change"] == 0.0
    family = [r for r in rows if r["kind"] == "family"]
    assert [(r["model"], r["variant"]) for r in family] == [
        ("attention-tiny", "fp32"), ("attention-tiny", "int8"), ("attention-tiny", "int4 g32 rtn")]
    for row in family:
        missing = [f for f in FAMILY_FIELDS if row.get(f) is None]
        assert not missing, f"{row['variant']}: no {missing}"
    # the same text scored: the tiny model's float rows agree across the two tables
    assert family[0]["ppl"] == pytest.approx(by_variant["fp32"]["ppl"], rel=1e-6)
    assert 0 < family[1]["kl_nats"] < family[2]["kl_nats"]  # int4 moves the logits more
    skipped = [r for r in rows if r["kind"] == "skipped"]
    assert skipped and skipped[0]["engine"] == "llama.cpp" and skipped[0]["reason"]
    # the int8 and int4 models again, on torch's aten kernels: the same weights, eager
    aten = [r for r in every_decode if r["engine"] == "torch aten"]
    assert [r["variant"] for r in aten] == ["int8 aten eager", "int4 g32 rtn aten eager"]
    for row, zoo_variant in zip(aten, ("int8", "int4 g32 rtn")):
        missing = [f for f in DECODE_FIELDS if row.get(f) is None]
        assert not missing, f"{row['variant']}: no {missing}"
        assert row["step"] == "eager" and row["context"] == 128
        for field in ("ppl", "weight_bytes", "bytes_per_weight", "weights"):
            assert row[field] == by_variant[zoo_variant][field], field
    # torchao: its rows where it is installed, else a skipped row saying how to install it
    torchao = [r for r in every_decode if r["engine"] == "torchao"]
    torchao_skipped = [r for r in skipped if r["engine"] == "torchao"]
    assert len(torchao) == 2 or "pip install zoo[bench-torchao]" in torchao_skipped[0]["reason"]
    report = (tmp_path / "compress.md").read_text()
    assert "attention-tiny int8 at 128 context, ms/token: zoo " in report
    assert "## The issue's targets" in report
    assert record.get("png") is None or (tmp_path / "compress.png").stat().st_size > 0


def _row(variant, ppl, ms=None, context=128, weights=None, engine="zoo", x_bound=None,
         model="smollm2-135m"):
    return {"kind": "decode", "engine": engine, "model": model, "variant": variant,
            "weights": weights or variant.split()[0], "ppl": ppl, "context": context,
            "ms_per_token": ms, "x_bound": x_bound, "threads": 2, "bytes_per_weight": 1.0}


def test_target_sentences_are_computed_from_the_rows():
    rows = [_row("fp32", 10.0, 20.0, weights="fp32"), _row("bf16", 10.01, 10.0, weights="bf16"),
            _row("int8", 10.05, 6.0, x_bound=1.2),
            _row("int4 g32 gptq", 10.6, 5.0, weights="int4", x_bound=1.25),
            _row("gguf q4_1", 10.9, 7.0, weights="q4_1", x_bound=1.4),
            _row("llama.cpp q4_1", 10.9, 7.5, weights="q4_1", engine="llama.cpp", x_bound=1.1)]
    lines = bench.target_sentences(rows)
    assert ("smollm2-135m int8 (RTN) perplexity 10.050 vs fp32 10.000 (+0.50%); within 1%: yes."
            in lines)
    assert ("smollm2-135m int4 g32 (GPTQ) perplexity 10.600 vs fp32 10.000 (+6.00%); within 5%: "
            "NO." in lines)
    assert ("smollm2-135m int8 decode at 128 context: 6.00 ms/token vs bf16 10.00 (x0.60); at "
            "most x0.6: yes." in lines)
    assert ("zoo faster than llama.cpp on the same Q4_1 file at 128 context (2 threads each): zoo "
            "7.00 ms/token, llama.cpp 7.50 (x1.07): yes." in lines)
    assert ("zoo faster than llama.cpp on the same Q8_0 file at 128 context: not measured (no zoo "
            "or llama.cpp row)." in lines)
    # llama.cpp's own x_bound is not a zoo path: only gguf q4_1 is over x1.3
    assert ("every quantised zoo path within x1.3 of its read bound: NO (worst: gguf q4_1 at 128 "
            "context, x1.40; over: gguf q4_1 at 128)." in lines)
    slower = [dict(r, ms_per_token=8.0) if r["variant"] == "gguf q4_1" else r for r in rows]
    assert any(line.endswith("(x0.94): NO.") for line in bench.target_sentences(slower))


def test_llama_cpp_missing_is_a_skipped_row_and_the_targets_say_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    skipped, figures = bench.llama_cpp_rows_or_figures({}, [], (128,), 4, 96, None)
    assert figures == []
    assert skipped[0]["kind"] == "skipped" and skipped[0]["engine"] == "llama.cpp"
    assert "llama-cpp-python is not installed" in skipped[0]["reason"]
    assert "bench-llamacpp" in skipped[0]["reason"]
    rows = [_row("gguf q4_1", 10.9, 7.0, weights="q4_1", x_bound=1.2)] + skipped
    report = bench.compress_report(rows)
    assert "Skipped llama.cpp (smollm2-135m): llama-cpp-python is not installed" in report
    assert ("zoo faster than llama.cpp on the same Q4_1 file at 128 context: not measured "
            "(llama-cpp-python is not installed") in report


def test_kernel_sentences_set_torch_and_torchao_beside_zoos_step():
    rows = [_row("int8", 10.05, 4.0, x_bound=1.2),
            _row("int8 aten eager", 10.05, 6.0, weights="int8", engine="torch aten"),
            _row("int8 aten inductor", 10.05, 5.0, weights="int8", engine="torch aten"),
            _row("torchao int8 inductor", 10.07, 8.0, weights="int8", engine="torchao"),
            _row("int4 g32 rtn", 10.4, 2.0, weights="int4"),
            _row("int4 g32 rtn aten eager", 10.4, 3.0, weights="int4", engine="torch aten")]
    steps = {"int8": "native", "int8 aten eager": "eager", "int8 aten inductor": "inductor",
             "torchao int8 inductor": "inductor", "int4 g32 rtn": "native",
             "int4 g32 rtn aten eager": "eager"}
    rows = [dict(r, step=steps[r["variant"]]) for r in rows]
    rows.append({"kind": "skipped", "engine": "torchao", "model": "smollm2-135m",
                 "reason": "torchao not installed: pip install zoo[bench-torchao]"})
    assert bench.kernel_sentences(rows) == [
        "smollm2-135m int8 at 128 context, ms/token: zoo 4.00 (native); torch aten 6.00 (eager, "
        "x1.50), 5.00 (inductor, x1.25); torchao 8.00 (inductor, x2.00).",
        "smollm2-135m int8 perplexity: zoo 10.050, torchao 10.070.",
        "smollm2-135m int4 g32 rtn at 128 context, ms/token: zoo 2.00 (native); torch aten 3.00 "
        "(eager, x1.50); torchao not measured (torchao not installed: pip install "
        "zoo[bench-torchao])."]


def test_aten_rows_run_eager_and_inductor_never_the_native_step(monkeypatch):
    made = []
    monkeypatch.setattr(bench, "zoo_figure", lambda model, row, context, new_tokens, compile:
                        made.append((row["engine"], row["variant"], row["step"], compile)))

    def load_tiny():
        torch.manual_seed(0)
        return zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).eval()

    batches = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))]
    bench.decode_figures("attention-tiny", bench.QUICK_VARIANTS, load_tiny, None, None, batches,
                         None, (128,), 4, False, "cpu", bench.FULL_STEPS)
    aten = [m for m in made if m[0] == "torch aten"]
    assert aten == [("torch aten", "int8 aten eager", "eager", False),
                    ("torch aten", "int8 aten inductor", "inductor", "inductor"),
                    ("torch aten", "int4 g32 rtn aten eager", "eager", False),
                    ("torch aten", "int4 g32 rtn aten inductor", "inductor", "inductor")]
    assert [m[1] for m in made if m[0] == "zoo"] == ["fp32", "int8", "int4 g32 rtn"]


def test_torchao_missing_is_a_skipped_row_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    skipped, figures = bench.torchao_rows_or_figures("attention-tiny", None, [], (128,), 4, None,
                                                     bench.QUICK_STEPS, "cpu")
    assert figures == []
    assert skipped[0]["kind"] == "skipped" and skipped[0]["engine"] == "torchao"
    assert skipped[0]["reason"].startswith("torchao not installed: pip install zoo[bench-torchao]")
    report = bench.compress_report([dict(_row("int8", 10.0, 4.0, x_bound=1.2), step="native")]
                                   + skipped)
    assert "Skipped torchao (attention-tiny): torchao not installed: pip install" in report
    assert "torchao not measured (torchao not installed: pip install zoo[bench-torchao]" in report


def test_torchao_rows_quantise_zoos_linears_and_count_their_stored_bytes(monkeypatch):
    pytest.importorskip("torchao")  # the optional bench-torchao extra: not in make test or CI
    from zoo.compression import decode_read_bytes, linear_targets, weight_bytes

    made = []

    def record(model, row, context, new_tokens, compile, read_bytes=None):
        made.append((model, row, compile, read_bytes))

    monkeypatch.setattr(bench, "zoo_figure", record)
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    models = []

    def load_tiny():
        torch.manual_seed(0)
        models.append(zoo.ZooForCausalLM(zoo.load_config("attention-tiny")).eval())
        return models[-1]

    batches = [torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))]
    skipped, _ = bench.torchao_rows_or_figures("attention-tiny", load_tiny, batches, (128,), 4,
                                               None, bench.FULL_STEPS, "cpu")
    assert skipped == []
    # torchao's quantize_ left inductor's process-wide options as zoo's compiled steps have them
    assert inductor_config.coordinate_descent_tuning is False
    assert [(row["variant"], row["step"], compile) for _, row, compile, _ in made] == [
        ("torchao int8 eager", "eager", False), ("torchao int8 inductor", "inductor", "inductor"),
        ("torchao int4 g32 eager", "eager", False),
        ("torchao int4 g32 inductor", "inductor", "inductor")]
    for (model, row, _, read_bytes), variant in zip(made[::2], bench.TORCHAO_VARIANTS):
        missing = [f for f in ("ppl", "weight_bytes", "bytes_per_weight", "torchao")
                   if row.get(f) is None]
        assert not missing, f"{row['variant']}: no {missing}"
        assert row["engine"] == "torchao" and row["dtype"] == "bfloat16"
        assert model.model.embed_tokens.weight.dtype == torch.bfloat16
        # every linear zoo quantises holds torchao's codes; the embedding table stays float
        quantised = [name for name, linear in linear_targets(model)
                     if type(linear.weight).__name__ != "Parameter"]
        assert quantised == [name for name, _ in linear_targets(model)]
        # stored bytes: int8 codes about 1 byte a weight, int4 about half (float tensors beside)
        zoo_model = load_tiny().to(torch.bfloat16)
        bench.compress_variant(zoo_model, bench.Variant(variant.label, variant.weights,
                                                        variant.group_size, "rtn"), None)
        assert row["weight_bytes"] == pytest.approx(weight_bytes(zoo_model), rel=0.05)
        assert read_bytes == pytest.approx(decode_read_bytes(zoo_model), rel=0.05)
        # the same round-to-nearest grids as zoo's: perplexity within a rounding of zoo's
        zoo_scored = load_tiny()
        bench.compress_variant(zoo_scored, bench.Variant(variant.label, variant.weights,
                                                         variant.group_size, "rtn"), None)
        zoo_ppl = bench.held_out_scores(zoo_scored, batches)["ppl"]
        assert row["ppl"] == pytest.approx(zoo_ppl, rel=1e-3)
        assert row["ppl"] != pytest.approx(bench.held_out_scores(load_tiny(), batches)["ppl"],
                                           rel=1e-7)  # the scored model was quantised


def test_a_figure_sets_each_run_against_the_bandwidth_measured_before_it(monkeypatch):
    bandwidths = iter([100e9, 50e9, 100e9])
    monkeypatch.setattr(bench, "read_bandwidth", lambda device: next(bandwidths))
    times = iter([20.0, 30.0, 12.0])
    figure = bench.Figure({"variant": "int4"}, read_bytes=900_000_000,
                          measure=lambda: (next(times), 100_000_000))
    (row,) = bench.time_figures([figure], 3, "cpu")
    # 1 GB read: 10 ms at 100 GB/s, 20 ms at 50 GB/s; x2.0, x1.5, x1.2 -> median x1.5
    assert row["read_bytes"] == 1_000_000_000
    assert row["ms_per_token"] == 20.0
    assert row["bound_ms"] == pytest.approx(10.0)
    assert row["x_bound"] == pytest.approx(1.5)
    assert row["runs"] == [(100.0, 20.0), (50.0, 30.0), (100.0, 12.0)]


def test_int4_leaves_float_only_the_layers_a_group_cannot_divide():
    torch.manual_seed(0)
    model = zoo.ZooForCausalLM(zoo.load_config("mamba-tiny")).eval()
    left = bench.compress_variant(model, bench.Variant("int4", "int4", 32, "rtn"), None)
    assert left and all(name.endswith("dt_proj") for name in left)
    modules = dict(model.named_modules())
    assert all(not isinstance(modules[name], QuantizedLinear) for name in left)
    assert isinstance(modules["model.layers.0.mixer.in_proj"], QuantizedLinear)


def _write_llama_gguf(path, rng):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    writer.add_token_list([f"t{i}" for i in range(96)])
    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    tensors = {"token_embd.weight": (rng.normal(size=(96, 64)), q8_0),
               "blk.0.attn_q.weight": (rng.normal(size=(64, 64)), q4_1),
               "blk.0.ffn_down.weight": (rng.normal(size=(64, 128)), q4_1)}
    for name, (weight, qtype) in tensors.items():
        writer.add_tensor(name, gguf.quants.quantize(weight.astype(np.float32), qtype),
                          raw_dtype=qtype)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_the_q8_0_file_requantises_the_4_bit_matrices_and_keeps_the_rest(tmp_path):
    source = tmp_path / "q4_1.gguf"
    _write_llama_gguf(source, np.random.default_rng(0))
    out = bench.write_q8_0_gguf(source, tmp_path / "q8_0.gguf")
    before = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    after_reader = gguf.GGUFReader(str(out))
    after = {t.name: t for t in after_reader.tensors}
    assert list(after) == list(before)
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        assert after[name].tensor_type == q8_0
        assert list(after[name].shape) == list(before[name].shape)
        values = gguf.quants.dequantize(before[name].data, before[name].tensor_type)
        expected = gguf.quants.quantize(values, q8_0)
        np.testing.assert_array_equal(after[name].data, expected)
    for name in ("token_embd.weight", "blk.0.attn_norm.weight"):
        assert after[name].tensor_type == before[name].tensor_type
        np.testing.assert_array_equal(after[name].data, before[name].data)
    fields = after_reader.fields
    assert int(fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
    sizes = bench.gguf_file_sizes(out)
    assert sizes["weight_bytes"] == sum(int(t.n_bytes) for t in after.values())
    assert sizes["read_bytes"] == sizes["weight_bytes"]  # no output.weight: the table is the head
    # keys and values, f16, per layer: 2 kv heads x 16 dims each
    assert sizes["kv_bytes_per_token"] == 2 * 1 * 2 * 16 * 2


class _FakeLlama:
    """llama_cpp.Llama's surface the bench uses: eval appends at n_tokens (dropping what lay
    past it, as the real one does), scores hold uniform logits when logits_all."""

    n_vocab = 96
    made: list = []

    def __init__(self, model_path, n_ctx, n_batch, n_threads, n_threads_batch, logits_all,
                 verbose):
        self.n_ctx, self.threads, self.n_tokens, self.tokens = n_ctx, n_threads, 0, []
        self.scores = np.zeros((n_ctx, self.n_vocab), dtype=np.float32)
        self.evals: list[tuple[int, list[int]]] = []
        _FakeLlama.made.append(self)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        self.evals.append((self.n_tokens, list(tokens)))
        self.tokens = self.tokens[:self.n_tokens] + list(tokens)
        self.n_tokens += len(tokens)
        assert self.n_tokens <= self.n_ctx


def test_llama_cpp_is_timed_after_its_prompt_and_scored_on_zoos_windows(monkeypatch, tmp_path):
    import types

    fake = types.SimpleNamespace(Llama=_FakeLlama, __version__="fake")
    monkeypatch.setitem(sys.modules, "llama_cpp", fake)
    _FakeLlama.made = []
    batches = [torch.arange(16)[None], torch.arange(16, 32)[None]]
    # uniform logits: perplexity is the vocabulary size, over exactly the windows given
    assert bench.llama_cpp_perplexity(tmp_path / "m.gguf", batches, 2) == pytest.approx(96.0)
    scorer = _FakeLlama.made[-1]
    assert scorer.evals == [(0, list(range(16))), (0, list(range(16, 32)))]
    sizes = {"read_bytes": 1000, "kv_bytes_per_token": 10}
    figure = bench.llama_cpp_figure(tmp_path / "m.gguf", {}, 8, 4, 2, sizes, 96)
    timer = _FakeLlama.made[-1]
    assert timer.threads == 2 and timer.evals[0][0] == 0 and len(timer.evals[0][1]) == 8
    for _ in range(2):  # each run starts again right after the prompt, one token per eval
        ms, state = figure.measure()
        assert state == 80 and ms >= 0
    runs = timer.evals[1:]
    assert [start for start, _ in runs] == [8, 9, 10, 11, 8, 9, 10, 11]
    assert all(len(tokens) == 1 for _, tokens in runs)
    assert runs[:4] == runs[4:]  # the same tokens each run
