"""GGUF control-vector import (llama.cpp/repeng: arch `controlvector`, `direction.<i>`):
every bad file is refused with a VectorFileError naming the file and the problem, never
read as a silently different vector. Needs no engine."""

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import write_llamacpp_gguf

from steering.spec import ModelShape
from steering.vectors import (
    SteeringVector,
    VectorFileError,
    VectorRegistry,
    export_gguf,
    import_gguf,
    parse_upload,
    save_vector,
)

H = 4
VEC = np.array([0.5, -1.25, 2.0, 3.0], dtype=np.float32)
SHAPE = ModelShape("llama", num_layers=4, hidden_size=H, num_heads=2, num_kv_heads=2, head_dim=2)


def _write(path: Path, tensors, arch="controlvector", hint="llama") -> Path:
    """A GGUF written with raw gguf writer calls; tensors: (name, array[, raw_dtype])."""
    writer = gguf.GGUFWriter(str(path), arch)
    if hint is not None:
        writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, arr, *raw in tensors:
        writer.add_tensor(name, arr, raw_dtype=raw[0] if raw else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _refused(path: Path) -> str:
    with pytest.raises(VectorFileError) as e:
        import_gguf(path)
    return str(e.value)


# 1. architecture


def test_wrong_architecture_is_refused(tmp_path):
    path = _write(tmp_path / "llama.gguf", [("direction.1", VEC)], arch="llama")
    assert _refused(path) == "llama.gguf: GGUF architecture is 'llama', not 'controlvector'"


def test_metadata_that_is_not_a_utf8_string_is_refused(tmp_path):
    # Before: a uint32 hint's bytes were decoded as text (architecture '\x07\x00\x00\x00'),
    # and bad UTF-8 escaped as UnicodeDecodeError, which the registry did not catch.
    writer = gguf.GGUFWriter(str(tmp_path / "int.gguf"), "controlvector")
    writer.add_uint32("controlvector.model_hint", 7)
    writer.add_tensor("direction.1", VEC)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert _refused(tmp_path / "int.gguf") == (
        "int.gguf: GGUF key 'controlvector.model_hint' is UINT32, not a string"
    )
    bad = _write(tmp_path / "utf.gguf", [("direction.1", VEC)], hint=b"\xff\xfe")
    assert _refused(bad) == "utf.gguf: GGUF key 'controlvector.model_hint' is not valid UTF-8"
    # A bad file in a vectors directory is reported by name; the others still load.
    write_llamacpp_gguf(tmp_path / "good.gguf", {1: VEC})
    reg = VectorRegistry(tmp_path)
    assert reg.names() == ["good"]
    assert set(reg.errors) == {"int.gguf", "utf.gguf"}


# 2. tensor types: llama.cpp loads F32 only, so every other type is refused, F16 too
# (exactly convertible, but a file llama.cpp refuses should not pass here either).

Q = gguf.GGMLQuantizationType
TYPED = {
    "F16": lambda: (VEC.astype(np.float16),),
    "F64": lambda: (VEC.astype(np.float64),),
    "I8": lambda: (VEC.astype(np.int8),),
    "I16": lambda: (VEC.astype(np.int16),),
    "I32": lambda: (VEC.astype(np.int32),),
    "BF16": lambda: (gguf.quants.quantize(VEC, Q.BF16), Q.BF16),
    "Q8_0": lambda: (
        gguf.quants.quantize(np.linspace(-1, 1, 32, dtype=np.float32), Q.Q8_0),
        Q.Q8_0,
    ),
}


@pytest.mark.parametrize("kind", sorted(TYPED))
def test_non_f32_tensors_are_refused(tmp_path, kind):
    path = _write(tmp_path / "typed.gguf", [("direction.1", VEC), ("direction.2", *TYPED[kind]())])
    assert gguf.GGUFReader(str(path)).tensors[1].tensor_type.name == kind  # written as asked
    assert _refused(path) == (
        f"typed.gguf: direction.2 is {kind}, not F32 (llama.cpp control vectors are F32)"
    )


# 3. lengths


def test_directions_of_mixed_lengths_are_refused_naming_each(tmp_path):
    path = _write(
        tmp_path / "mixed.gguf",
        [
            ("direction.3", np.ones(8, np.float32)),
            ("direction.1", VEC),
            ("direction.2", VEC),
        ],
    )
    assert _refused(path) == (
        "mixed.gguf: directions have different lengths (4 in direction.1, direction.2; "
        "8 in direction.3)"
    )


def test_empty_direction_is_refused(tmp_path):
    path = _write(tmp_path / "empty.gguf", [("direction.1", np.zeros(0, np.float32))])
    assert _refused(path) == "empty.gguf: direction.1 holds no values"


# 4. two tensors naming one layer (llama.cpp adds them, repeng keeps the last)


@pytest.mark.parametrize(
    "first, second", [("direction.01", "direction.1"), ("direction.1", "direction.001")]
)
def test_two_tensors_naming_one_layer_are_refused_naming_both(tmp_path, first, second):
    path = _write(tmp_path / "dup.gguf", [(first, VEC), ("direction.2", VEC), (second, 2 * VEC)])
    assert _refused(path) == f"dup.gguf: tensors {first!r} and {second!r} both name layer 1"


def test_a_zero_padded_index_alone_is_that_layer(tmp_path):
    # llama.cpp's std::stoi reads "01" as 1 too.
    v = import_gguf(_write(tmp_path / "padded.gguf", [("direction.01", VEC)]))
    assert v.layers == [1] and np.array_equal(v.directions[1], VEC)


# 5. NaN / Inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_the_layer(tmp_path, bad):
    poisoned = VEC.copy()
    poisoned[2] = bad
    path = _write(tmp_path / "nan.gguf", [("direction.1", VEC), ("direction.3", poisoned)])
    assert _refused(path) == "nan.gguf: direction.3 (layer 3) holds NaN or Inf"


# 6. shapes: llama.cpp takes a tensor whose GGML dims past the first are all 1 (ggml_n_dims
# 1: numpy shape (1, H)) as its H values, and refuses any other multi-dimensional tensor.


@pytest.mark.parametrize("shape", [(1, H), (1, 1, H)], ids=str)
def test_a_single_row_tensor_is_its_values(tmp_path, shape):
    path = _write(
        tmp_path / "row.gguf", [("direction.1", VEC.reshape(shape)), ("direction.2", VEC)]
    )
    v = import_gguf(path)
    assert v.hidden_size == H and v.layers == [1, 2]
    assert np.array_equal(v.directions[1], VEC)


@pytest.mark.parametrize("shape", [(2, H), (H, 1), (2, 2)], ids=str)
def test_multi_row_tensors_are_refused_not_flattened(tmp_path, shape):
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    path = _write(tmp_path / "rows.gguf", [("direction.1", VEC), ("direction.2", arr)])
    assert _refused(path) == f"rows.gguf: direction.2 has shape {shape}, a direction is 1-D"


def test_all_layers_two_rows_is_refused_not_read_as_twice_the_width(tmp_path):
    # Before: every layer flattened to 2H values, a consistent but wrong hidden size.
    rows = np.ones((2, H), np.float32)
    path = _write(tmp_path / "rows.gguf", [("direction.1", rows), ("direction.2", rows)])
    assert _refused(path) == f"rows.gguf: direction.1 has shape (2, {H}), a direction is 1-D"


def test_a_scalar_tensor_is_refused(tmp_path):
    path = _write(tmp_path / "scalar.gguf", [("direction.1", np.array(1.0, np.float32))])
    assert _refused(path) == "scalar.gguf: direction.1 has shape (), a direction is 1-D"


# 7. not GGUF, truncated, no directions


def test_files_that_are_not_gguf_are_refused(tmp_path):
    (tmp_path / "text.gguf").write_bytes(b"a control vector, honest\n" * 8)
    assert _refused(tmp_path / "text.gguf") == (
        "text.gguf: not a GGUF file (it does not start with b'GGUF')"
    )
    # Our own safetensors format under a .gguf name.
    save_vector(SteeringVector(directions={1: VEC}, hidden_size=H), tmp_path / "st.gguf")
    assert _refused(tmp_path / "st.gguf") == (
        "st.gguf: not a GGUF file (it does not start with b'GGUF')"
    )
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert _refused(tmp_path / "empty.gguf") == "empty.gguf: is empty, not a GGUF file"
    assert _refused(tmp_path / "missing.gguf").startswith("missing.gguf: cannot be read (")


def test_truncated_files_are_refused_at_every_cut(tmp_path):
    good = _write(tmp_path / "good.gguf", [("direction.1", VEC), ("direction.2", 2 * VEC)])
    data = good.read_bytes()
    reader = gguf.GGUFReader(str(good))
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert end < len(data)  # the writer pads the last tensor to the alignment
    cut = tmp_path / "cut.gguf"
    for n in range(1, end):
        cut.write_bytes(data[:n])
        message = _refused(cut)
        assert message.startswith("cut.gguf: truncated"), (n, message)
    # A cut in the trailing alignment padding loses no value: read as written.
    cut.write_bytes(data[:end])
    v = import_gguf(cut)
    assert np.array_equal(v.directions[1], VEC) and np.array_equal(v.directions[2], 2 * VEC)
    # An upload is told apart by its magic; a truncated one is refused the same way.
    with pytest.raises(VectorFileError, match=r"^cut\.gguf: truncated or corrupt GGUF file"):
        parse_upload("cut", data[: end - 1])


def test_no_direction_tensors_is_refused(tmp_path):
    assert _refused(_write(tmp_path / "none.gguf", [])) == (
        "none.gguf: holds no direction.<i> tensors"
    )
    other = _write(tmp_path / "other.gguf", [("direction.1", VEC), ("token_embd.weight", VEC)])
    assert _refused(other) == (
        "other.gguf: unexpected tensor 'token_embd.weight' (want 'direction.<i>')"
    )


@pytest.mark.parametrize("name", ["direction.", "direction.-1", "direction.1a", "direction.\u0661"])
def test_malformed_direction_names_are_refused(tmp_path, name):
    # ASCII digits only: int("\u0661") is 1, llama.cpp's stoi refuses it.
    path = _write(tmp_path / "name.gguf", [(name, VEC)])
    assert _refused(path) == f"name.gguf: unexpected tensor {name!r} (want 'direction.<i>')"


# 8. layer indices: the file knows no model, so range is checked where the model is known


def test_layer_out_of_range_is_refused_against_the_model(tmp_path):
    data_path = _write(tmp_path / "deep.gguf", [("direction.1", VEC), ("direction.9", VEC)])
    v = import_gguf(data_path)  # GGUF carries no layer count of the model
    assert v.layers == [1, 9] and v.num_layers is None
    reg = VectorRegistry(tmp_path / "vectors")
    (tmp_path / "vectors").mkdir()
    with pytest.raises(ValueError) as e:
        reg.store("deep", data_path.read_bytes(), SHAPE)
    assert str(e.value) == "vector 'deep' has layer(s) [9], the model has 4 layers"
    assert not list((tmp_path / "vectors").iterdir()) and "deep" not in reg
    # A file already in the directory is refused when a request uses it.
    (tmp_path / "vectors" / "deep.gguf").write_bytes(data_path.read_bytes())
    reg.reload()
    with pytest.raises(ValueError, match=r"^vector 'deep' has layer\(s\) \[9\], the model has 4"):
        reg.lookup("deep", SHAPE)


def test_absurd_layer_index_is_refused(tmp_path):
    # Before: int() of 5000 digits raised a bare ValueError the registry did not catch.
    path = _write(tmp_path / "huge.gguf", [("direction." + "1" * 5000, VEC)])
    assert _refused(path) == "huge.gguf: direction.11111111111111... names no layer of any model"


def test_direction_zero_is_layer_zero(tmp_path):
    # llama.cpp refuses direction.0, repeng writes it for the output of layers[0], which is
    # our layer 0: import reads it so; export_gguf refuses it for llama.cpp's sake.
    path = _write(tmp_path / "zero.gguf", [("direction.0", VEC), ("direction.1", 2 * VEC)])
    v = import_gguf(path)
    assert v.layers == [0, 1]
    assert np.array_equal(v.directions[0], VEC) and np.array_equal(v.directions[1], 2 * VEC)
    assert v.fits(SHAPE) is None
    with pytest.raises(VectorFileError, match="llama.cpp rejects 'direction.0'"):
        export_gguf(v, tmp_path / "again.gguf")
    assert not (tmp_path / "again.gguf").exists()
