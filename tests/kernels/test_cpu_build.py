"""kernels/cpu_build: how zoo's C++ CPU kernels are compiled, and how a failed build falls back."""

import pytest
import torch

from zoo.kernels import cpu_build


def test_sources_are_joined_in_order_with_the_machines_vector_flags(tmp_path, monkeypatch):
    header, kernel = tmp_path / "shared.h", tmp_path / "kernel.cpp"
    header.write_text("// the shared header\n")
    kernel.write_text("// the kernel\n")
    calls = []
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda name, **kwargs: calls.append((name, kwargs)))
    assert cpu_build.build("zoo_test_kernel", [header, kernel], "the test kernel")
    (name, kwargs), = calls
    capability = torch.backends.cpu.get_cpu_capability()
    key = cpu_build._build_key(kwargs["cpp_sources"][0], kwargs["extra_cflags"])
    assert name == f"zoo_test_kernel_{capability.lower()}_{key}"
    # one text, the header first: editing the header changes the text, so every kernel that
    # includes it is rebuilt
    assert kwargs["cpp_sources"] == ["// the shared header\n\n// the kernel\n"]
    assert "-fopenmp" in kwargs["extra_cflags"] and kwargs["extra_ldflags"] == ["-fopenmp"]
    if capability in ("AVX512", "AVX2"):
        assert f"-DCPU_CAPABILITY={capability}" in kwargs["extra_cflags"]


def test_a_library_built_for_the_same_text_is_loaded_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    source = tmp_path / "kernel.cpp"
    source.write_text("// the kernel\n")
    built, loaded = [], []
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda name, **kwargs: built.append(name))
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    assert cpu_build.build("zoo_test_kernel", [source], "the test kernel")
    (name,) = built
    folder = tmp_path / "extensions" / name
    (folder / f"{name}.so").write_bytes(b"")  # what the first build leaves
    assert cpu_build.build("zoo_test_kernel", [source], "the test kernel")
    assert built == [name] and loaded == [str(folder / f"{name}.so")]
    # while another process builds it (its lock file), load_inline waits for that build
    (folder / "lock").touch()
    assert cpu_build.build("zoo_test_kernel", [source], "the test kernel")
    assert built == [name, name]
    (folder / "lock").unlink()
    # another text is another library, in its own folder
    source.write_text("// the kernel, edited\n")
    assert cpu_build.build("zoo_test_kernel", [source], "the test kernel")
    assert len(built) == 3 and built[2] != name and len(loaded) == 1


def test_a_failed_build_warns_with_the_compilers_error_and_returns_false(tmp_path, monkeypatch):
    source = tmp_path / "kernel.cpp"
    source.write_text("int main() { return }\n")

    def failing_build(name, **kwargs):
        raise RuntimeError("c++ -O3 ... kernel.cpp\nkernel.cpp:1:21: error: expected expression\n"
                           "ninja: build stopped")

    monkeypatch.setattr("torch.utils.cpp_extension.load_inline", failing_build)
    with pytest.warns(RuntimeWarning, match=r"zoo: the test kernel did not build \(RuntimeError: "
                      r"kernel.cpp:1:21: error: expected expression\); the PyTorch path"):
        assert cpu_build.build("zoo_test_kernel", [source], "the test kernel") is False


def test_a_real_compiler_error_is_caught_and_quoted(tmp_path_factory, monkeypatch):
    # a flag the compiler rejects (as an old one rejects -mavx512f) fails before any parsing,
    # where an error in the source would first cost a parse of torch's headers (~20 s); the
    # build folder's name holds no "error", which would put the command line in the warning
    tmp_path = tmp_path_factory.mktemp("broken_kernel")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(cpu_build, "_CAPABILITY_FLAGS", {capability: ["-mno-such-vector-unit"]})
    source = tmp_path / "kernel.cpp"
    source.write_text("// the kernel\n")
    with pytest.warns(RuntimeWarning, match=r"the broken kernel did not build \(RuntimeError: "
                      r".*error: .*-mno-such-vector-unit"):
        assert cpu_build.build("zoo_test_broken_kernel", [source], "the broken kernel") is False


def test_zoo_cpu_kernels_0_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_CPU_KERNELS", "0")
    monkeypatch.setattr("torch.utils.cpp_extension.load_inline",
                        lambda *args, **kwargs: pytest.fail("built with ZOO_CPU_KERNELS=0"))
    assert not cpu_build.cpu_kernels_enabled()
    assert cpu_build.build("zoo_test_kernel", [tmp_path / "missing.cpp"], "the kernel") is False
