"""The package's shape: every submodule imports on its own and no two import each other
(directly or through others), and each decision has one home: whether a file's tensors are
mapped is the native policy's, asked alike by loads and lazy reads."""

import ast
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import weightlift

PACKAGE = os.path.dirname(weightlift.__file__)
MODULES = sorted(
    f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and f != "__init__.py"
)


def relative_imports(path):
    """The package's modules a module imports (``from . import x``, ``from .x import y``)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = {"__init__": relative_imports(os.path.join(PACKAGE, "__init__.py"))}
    for m in MODULES:
        graph[m] = relative_imports(os.path.join(PACKAGE, m + ".py"))
    graph = {m: {d for d in deps if d in graph or d == "_native"} for m, deps in graph.items()}

    def visit(node, path):
        if node in path:
            raise AssertionError("import loop: " + " -> ".join(path[path.index(node):] + [node]))
        for dep in graph.get(node, ()):
            visit(dep, path + [node])

    for m in graph:
        visit(m, [])
    # The facade imports everything; nothing imports the facade back.
    assert all("__init__" not in deps for deps in graph.values())


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_and_alone(module):
    if module == "_distributed":
        pytest.importorskip("torch.distributed")
    out = subprocess.run(
        [sys.executable, "-c", f"import weightlift.{module}"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def write(path):
    save_file({"w": np.arange(4096 * 4, dtype=np.float32).reshape(64, 256)}, str(path))
    return str(path)


def mapped_in(path, **open_args):
    """(lazy read mapped?, load mapped?) for `path` opened with `open_args`."""
    with weightlift.safe_open(path, "np", **open_args) as f:
        memory, _ = f._h().get("w")
        lazy = memory.mapped
    loaded = weightlift.load_checkpoint(path, **open_args)
    placements = {r["placement"] for r in loaded.report}
    assert len(placements) == 1, placements
    return lazy, placements == {"mapped"}


def test_loads_and_lazy_reads_ask_the_one_policy(tmp_path):
    path = write(tmp_path / "m.safetensors")
    # A local disk: mapped, unless the caller asks for copies or a read backend.
    assert mapped_in(path) == (True, True)
    assert mapped_in(path, backend="mmap") == (True, True)
    assert mapped_in(path, backend="pread") == (False, False)
    with weightlift.safe_open(path, "np") as f:
        assert f._h().get("w")[0].mapped
    assert {r["placement"] for r in weightlift.load_checkpoint(path, copy=True).report} == {"owned"}


def test_a_fuse_mount_is_read_not_mapped(tmp_path):
    if shutil.which("bindfs") is None:
        pytest.skip("bindfs is not installed (bash .ci/run installs it)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    write(src / "m.safetensors")
    mounted = subprocess.run(["bindfs", "--no-allow-other", str(src), str(mnt)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"bindfs cannot mount here: {mounted.stderr.decode().strip()}")
    try:
        path = str(mnt / "m.safetensors")
        assert mapped_in(path) == (False, False)
        report = weightlift.load_checkpoint(path).report
        assert "fuse" in report[0]["reason"], report
        with weightlift.safe_open(path, "np") as f:
            local = weightlift.load_file(str(src / "m.safetensors"))["w"]
            np.testing.assert_array_equal(f.get_tensor("w"), local)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_missing_paths_and_model_ids_raise_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        weightlift.safe_open("notafile", "np")
    assert str(e.value) == "No such file or directory: notafile"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        weightlift.load_checkpoint("org/not-there")


def test_dtype_sizes_come_from_the_format():
    from weightlift._native import byte_len

    assert byte_len("BF16", 3) == 6
    assert byte_len("F4", 4) == 2
    assert byte_len("F8_E4M3", 5) == 5
    assert byte_len("NOPE", 1) is None
