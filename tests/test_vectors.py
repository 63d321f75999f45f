"""Vector files: safetensors format, GGUF control vectors (llama.cpp/repeng), registry."""

from __future__ import annotations

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
    load_vector,
    save_vector,
)

SHAPE = ModelShape(
    "LlamaForCausalLM", num_layers=4, hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8
)


def _vec(**kw) -> SteeringVector:
    rng = np.random.default_rng(0)
    dirs = {1: rng.standard_normal(16), 3: rng.standard_normal(16)}
    return SteeringVector(
        dirs,
        hidden_size=16,
        architecture="LlamaForCausalLM",
        num_layers=4,
        method="pca_diff",
        description="a test",
        **kw,
    )


def test_safetensors_round_trip(tmp_path):
    v = _vec()
    back = load_vector(save_vector(v, tmp_path / "v.safetensors"))
    assert back.layers == [1, 3]
    for layer in v.layers:
        np.testing.assert_array_equal(back.directions[layer], v.directions[layer])
    assert (back.architecture, back.num_layers, back.method, back.description, back.site) == (
        "LlamaForCausalLM",
        4,
        "pca_diff",
        "a test",
        "residual",
    )


def test_gguf_round_trip_and_llamacpp_layout(tmp_path):
    v = _vec()
    back = import_gguf(export_gguf(v, tmp_path / "v.gguf"))
    assert back.layers == v.layers and back.hidden_size == 16
    for layer in v.layers:
        np.testing.assert_array_equal(back.directions[layer], v.directions[layer])
    # A file written with gguf exactly as llama.cpp/repeng write it reads the same.
    write_llamacpp_gguf(tmp_path / "cpp.gguf", v.directions)
    cpp = import_gguf(tmp_path / "cpp.gguf")
    assert cpp.architecture == "llama"
    for layer in v.layers:
        np.testing.assert_array_equal(cpp.directions[layer], v.directions[layer])
    # Our export is readable by gguf's own reader with llama.cpp's keys.
    import gguf

    reader = gguf.GGUFReader(str(tmp_path / "v.gguf"))
    assert sorted(t.name for t in reader.tensors) == ["direction.1", "direction.3"]
    assert "controlvector.layer_count" in reader.fields


def test_gguf_export_refuses_layer_zero(tmp_path):
    v = SteeringVector({0: np.ones(16)}, hidden_size=16)
    with pytest.raises(VectorFileError, match="direction.0"):
        export_gguf(v, tmp_path / "zero.gguf")
    assert not (tmp_path / "zero.gguf").exists()


def test_head_site_vectors_round_trip_and_registry(tmp_path):
    heads = _vec(site="heads", num_heads=2, head_dim=8)
    back = load_vector(save_vector(heads, tmp_path / "iti.safetensors"))
    assert (back.site, back.num_heads, back.head_dim, back.hidden_size) == ("heads", 2, 8, 16)
    np.testing.assert_array_equal(back.directions[3], heads.directions[3])
    with pytest.raises(VectorFileError, match="act on the residual stream"):
        export_gguf(heads, tmp_path / "iti.gguf")
    save_vector(_vec(), tmp_path / "resid.safetensors")
    save_vector(_vec(site="heads", num_heads=4, head_dim=4), tmp_path / "split4.safetensors")
    reg = VectorRegistry(tmp_path)
    assert reg.lookup("iti", SHAPE, "heads")[1].shape == (16,)
    with pytest.raises(ValueError, match="is a site 'heads' vector, the entry asks for site 're"):
        reg.lookup("iti", SHAPE)
    with pytest.raises(ValueError, match="is a site 'residual' vector"):
        reg.lookup("resid", SHAPE, "heads")
    # Same width, other head split: refused rather than silently re-sliced.
    with pytest.raises(ValueError, match="made for 4 heads x 4 dims, the model has 2 x 8"):
        reg.lookup("split4", SHAPE, "heads")


@pytest.mark.parametrize(
    "dirs, kw, reason",
    [
        ({1: np.ones(16)}, {"site": "heads"}, "needs num_heads and head_dim"),
        (
            {1: np.ones(16)},
            {"site": "heads", "num_heads": 3, "head_dim": 8},
            "is not its length 16",
        ),
        ({1: np.ones(16)}, {"num_heads": 2, "head_dim": 8}, "site 'heads' vectors only"),
        ({1: np.ones(16)}, {"site": "mlp"}, "site 'mlp' is not one of"),
        ({1: np.ones(15)}, {}, "shape (15,)"),
        ({1: np.full(16, np.nan)}, {}, "NaN"),
        ({5: np.ones(16)}, {"num_layers": 4}, "out of range"),
        ({}, {}, "no layers"),
    ],
)
def test_invalid_vectors_rejected(dirs, kw, reason):
    with pytest.raises(VectorFileError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        SteeringVector(dirs, hidden_size=16, **kw)


def test_registry_reports_bad_files_by_name(tmp_path):
    save_vector(_vec(), tmp_path / "good.safetensors")
    export_gguf(_vec(), tmp_path / "good_gguf.gguf")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    (tmp_path / "notcv.gguf").write_bytes(b"GGUF nonsense")
    save_vector(SteeringVector({1: np.ones(8)}, hidden_size=8), tmp_path / "small.safetensors")
    save_vector(_vec(), tmp_path / "good.gguf.safetensors")  # odd but valid name
    export_gguf(_vec(), tmp_path / "good.gguf")  # same stem as good.safetensors
    (tmp_path / "notes.txt").write_text("ignored")

    reg = VectorRegistry(tmp_path)
    assert set(reg.names()) == {"good", "good_gguf", "small", "good.gguf"}
    # Files load in name order, so good.gguf claims the name "good" first.
    assert set(reg.errors) == {"corrupt.safetensors", "notcv.gguf", "good.safetensors"}
    assert "already provided by good.gguf" in reg.errors["good.safetensors"]
    assert "not a readable safetensors file" in reg.errors["corrupt.safetensors"]
    assert reg.lookup("good", SHAPE)[1].shape == (16,)
    with pytest.raises(ValueError, match="hidden size 8"):
        reg.lookup("small", SHAPE)
    with pytest.raises(KeyError, match="failed to load"):
        reg.lookup("corrupt", SHAPE)
    with pytest.raises(KeyError, match="unknown vector 'nope'"):
        reg.lookup("nope", SHAPE)


def test_missing_registry_directory_is_empty(tmp_path):
    reg = VectorRegistry(tmp_path / "absent")
    assert reg.names() == [] and reg.errors == {}
