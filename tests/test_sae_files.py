"""SAE files (steering/sae.py) without an engine: every format written here the way its own
library writes it, read back, and checked against that library's definition of the
encoder, computed independently below; our format's round trips; uploads; the registry;
`steerserve features info|convert`; and every refusal with the reason it names."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import steering.sae as sae_module
from server.feature_commands import main as features_main
from steering.sae import (
    SaeFileError,
    SaeRegistry,
    SparseAutoencoder,
    load_gemma_scope,
    load_sae,
    load_saelens,
    load_sparsify,
    parse_upload,
    read_any,
    save_sae,
)
from steering.spec import ModelShape

HIDDEN, WIDTH = 16, 64
SHAPE = ModelShape("LlamaForCausalLM", 4, HIDDEN, 4, 2, 4)


def weights(seed: int = 0, hidden: int = HIDDEN, width: int = WIDTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "W_enc": rng.standard_normal((hidden, width)),
        "b_enc": 0.5 * rng.standard_normal(width),
        "W_dec": rng.standard_normal((width, hidden)),
        "b_dec": rng.standard_normal(hidden),
        # Mostly positive, some negative: theta_f = max(threshold_f, 0) is then exercised.
        "threshold": rng.uniform(-0.5, 2.0, width),
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


def stream(seed: int = 1, hidden: int = HIDDEN) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((32, hidden)).astype(np.float32)


# --- the formats' own encoders, written out from their libraries' definitions -------------


def gemma_scope_encode(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    # Gemma Scope's reference JumpReLUSAE.encode: no b_dec on the way in.
    pre = x.astype(np.float64) @ w["W_enc"] + w["b_enc"]
    return np.maximum(pre, 0) * (pre > w["threshold"])


def saelens_pre(w: dict[str, np.ndarray], x: np.ndarray, apply_b_dec: bool = True) -> np.ndarray:
    sae_in = x.astype(np.float64) - (w["b_dec"] if apply_b_dec else 0.0)
    return sae_in @ w["W_enc"] + w["b_enc"]


def topk_of(values: np.ndarray, k: int) -> np.ndarray:
    # torch.topk(x, k) then scatter into zeros, row by row.
    out = np.zeros_like(values)
    for i, row in enumerate(values):
        top = np.argsort(-row, kind="stable")[:k]
        out[i, top] = row[top]
    return out


def saelens_encode(arch: str, w: dict[str, np.ndarray], x: np.ndarray, k: int = 0, **kw):
    pre = saelens_pre(w, x, **kw)
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":  # activation_fn (ReLU) times the (pre > threshold) mask
        return np.maximum(pre, 0) * (pre > w["threshold"])
    return np.maximum(topk_of(pre, k), 0)  # TopK: top k of pre, then ReLU


def sparsify_encode(t: dict[str, np.ndarray], x: np.ndarray, k: int) -> np.ndarray:
    pre = (x.astype(np.float64) - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]
    return topk_of(np.maximum(pre, 0), k)


def per_feature(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    """a_f from each feature's own quantities, as the spec's ops compute it."""
    cols = []
    for f in range(sae.width):
        pre = x.astype(np.float64) @ sae.encoder_row(f) + sae.encoder_offset(f)
        cols.append(np.where(pre > sae.feature_threshold(f), pre, 0.0))
    return np.stack(cols, axis=-1)


def assert_fires_sometimes(acts: np.ndarray) -> None:
    # Otherwise a comparison with all zeros on both sides would prove nothing.
    assert 0 < np.count_nonzero(acts) < acts.size


# --- writers, as each library lays its files out -------------------------------------------


def write_gemma_scope(root: Path, w: dict[str, np.ndarray], layer: int = 2) -> Path:
    path = root / f"layer_{layer}" / f"width_{WIDTH}" / "average_l0_10" / "params.npz"
    path.parent.mkdir(parents=True)
    np.savez(path, **w)
    return path


def write_saelens(
    directory: Path,
    arch: str = "standard",
    w: dict[str, np.ndarray] | None = None,
    *,
    hook: str = "blocks.1.hook_resid_post",
    v5: bool = False,
    **cfg_extra,
) -> Path:
    w = dict(weights(3) if w is None else w)
    if arch != "jumprelu":
        w.pop("threshold", None)
    directory.mkdir(parents=True)
    save_file(w, str(directory / "sae_weights.safetensors"))
    d_in, d_sae = w["W_dec"].shape[1], w["W_dec"].shape[0]
    if v5:  # SAELens <= 5: everything at the top level
        cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "hook_name": hook}
        cfg |= {"model_name": "tiny", "apply_b_dec_to_input": True}
        cfg |= {"normalize_activations": "none", "activation_fn_str": "relu"}
    else:  # SAELens 6: SAEConfig.to_dict(), the hook under "metadata"
        cfg = {
            "architecture": arch,
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"model_name": "tiny", "hook_name": hook, "sae_lens_version": "6.5.1"},
        }
    cfg |= cfg_extra
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def sparsify_tensors(seed: int = 5) -> dict[str, np.ndarray]:
    w = weights(seed)
    return {
        "encoder.weight": np.ascontiguousarray(w["W_enc"].T),  # nn.Linear(d_in, num_latents)
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }


def write_sparsify(
    directory: Path, k: int = 4, tensors: dict[str, np.ndarray] | None = None, **cfg_extra
) -> Path:
    """SparseCoder.save_to_disk: sae.safetensors + cfg.json ({**cfg.to_dict(), "d_in"})."""
    directory.mkdir(parents=True)
    save_file(
        sparsify_tensors() if tensors is None else tensors, str(directory / "sae.safetensors")
    )
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": WIDTH,
        "k": k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": HIDDEN,
    }
    (directory / "cfg.json").write_text(json.dumps(cfg | cfg_extra))
    return directory


def zip_of(directory: Path, under: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(directory.rglob("*")):
            if f.is_file():
                z.write(f, str(Path(under) / f.relative_to(directory.parent)))
    return buf.getvalue()


def ours(seed: int = 7, **kw) -> SparseAutoencoder:
    w = weights(seed)
    kw.setdefault("layer", 1)
    kw.setdefault("activation", "jumprelu")
    if kw["activation"] == "jumprelu":
        kw.setdefault("threshold", w["threshold"])
    return SparseAutoencoder(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], **kw)


# --- Gemma Scope ---------------------------------------------------------------------------


def test_gemma_scope_params_npz_layer_from_path_and_encoder(tmp_path):
    w = weights(0)
    path = write_gemma_scope(tmp_path, w, layer=2)
    sae = load_gemma_scope(path)
    assert (sae.layer, sae.activation, sae.k, sae.source_format) == (
        2,
        "jumprelu",
        None,
        "gemma-scope",
    )
    assert (sae.hidden_size, sae.width) == (HIDDEN, WIDTH)
    assert not sae.subtract_b_dec
    x = stream()
    want = gemma_scope_encode(w, x)
    assert_fires_sometimes(want)
    np.testing.assert_allclose(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_feature(sae, x), want, rtol=1e-5, atol=1e-5)
    # Per feature: the offset is b_enc itself, theta the threshold clipped at 0.
    np.testing.assert_allclose([sae.encoder_offset(f) for f in range(WIDTH)], w["b_enc"])
    assert [sae.feature_threshold(f) for f in range(WIDTH)] == pytest.approx(
        np.maximum(w["threshold"], 0)
    )
    np.testing.assert_array_equal(sae.encoder_row(5), w["W_enc"][:, 5])
    # Decoding: acts @ W_dec + b_dec.
    np.testing.assert_allclose(sae.decode(want), want @ w["W_dec"] + w["b_dec"], rtol=1e-5)
    # The directory form, and an explicit layer that overrides the path's.
    assert load_gemma_scope(path.parent).layer == 2
    assert read_any(path.parent).layer == 2
    assert load_gemma_scope(path, layer=3).layer == 3


def test_gemma_scope_safetensors_and_explicit_layer(tmp_path):
    w = weights(1)
    save_file(w, str(tmp_path / "params.safetensors"))
    with pytest.raises(SaeFileError, match="do not record their layer"):
        read_any(tmp_path / "params.safetensors")
    sae = read_any(tmp_path / "params.safetensors", layer=0)
    assert sae.layer == 0 and sae.source_format == "gemma-scope"
    np.testing.assert_allclose(sae.encode(stream()), gemma_scope_encode(w, stream()), atol=1e-5)
    no_threshold = {k: v for k, v in w.items() if k != "threshold"}
    np.savez(tmp_path / "layer_1.npz", **no_threshold)
    with pytest.raises(SaeFileError, match=r"layer_1.npz: missing tensor\(s\) \['threshold'\]"):
        read_any(tmp_path / "layer_1.npz")
    np.savez(tmp_path / "layer_2.npz", **{**w, "threshold": np.ones(WIDTH, dtype=np.int64)})
    with pytest.raises(SaeFileError, match="tensor threshold has dtype int64, expected floats"):
        read_any(tmp_path / "layer_2.npz")


# --- SAELens -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_saelens_architectures(tmp_path, arch):
    w = weights(3)
    extra = {"k": 5} if arch == "topk" else {}
    sae = load_saelens(write_saelens(tmp_path / "sae", arch, w, **extra))
    activation = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}[arch]
    assert (sae.layer, sae.activation, sae.source_format) == (1, activation, "saelens")
    assert sae.k == (5 if arch == "topk" else None)
    assert sae.architecture == "tiny" and sae.subtract_b_dec
    x = stream()
    want = saelens_encode(arch, w, x, k=5)
    assert_fires_sometimes(want)
    np.testing.assert_allclose(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    if arch == "topk":
        assert (np.count_nonzero(sae.encode(x), axis=-1) <= 5).all()
        # One feature alone is ReLU without the top-k competition.
        np.testing.assert_allclose(
            per_feature(sae, x), np.maximum(saelens_pre(w, x), 0), rtol=1e-5, atol=1e-5
        )
    else:
        np.testing.assert_allclose(per_feature(sae, x), want, rtol=1e-5, atol=1e-5)
    # The offset folds b_dec into the bias: b_enc - W_enc^T b_dec.
    f = 9
    assert sae.encoder_offset(f) == pytest.approx(
        float(w["b_enc"][f] - w["W_enc"][:, f].astype(np.float64) @ w["b_dec"]), rel=1e-6
    )


def test_saelens_v5_config_topk_and_no_b_dec_on_input(tmp_path):
    w = weights(4)
    d = write_saelens(
        tmp_path / "v5",
        "standard",
        w,
        v5=True,
        hook="blocks.3.hook_resid_pre",
        activation_fn_str="topk",
        activation_fn_kwargs={"k": 3},
        apply_b_dec_to_input=False,
    )
    sae = load_saelens(d)
    assert (sae.layer, sae.activation, sae.k) == (2, "topk", 3)  # resid_pre of block 3
    assert not sae.subtract_b_dec
    x = stream()
    want = np.maximum(topk_of(saelens_pre(w, x, apply_b_dec=False), 3), 0)
    assert_fires_sometimes(want)
    np.testing.assert_allclose(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    assert sae.encoder_offset(2) == pytest.approx(float(w["b_enc"][2]))


def test_saelens_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path):
    w = weights(6)
    scale = np.linspace(0.5, 2.0, WIDTH).astype(np.float32)
    scaled = {**w, "scaling_factor": scale}
    d = write_saelens(tmp_path / "s", "standard", scaled, v5=True, finetuning_scaling_factor=True)
    sae = load_saelens(d)
    acts = saelens_encode("standard", w, stream())
    np.testing.assert_allclose(
        sae.decode(acts), (acts * scale) @ w["W_dec"] + w["b_dec"], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
        ({"normalize_activations": "layer_norm"}, "only 'none' is supported"),
        ({"hook": "blocks.1.attn.hook_z"}, "is not a residual-stream hook"),
        ({"hook": "blocks.1.hook_mlp_out"}, "only residual SAEs can steer"),
        ({"hook": "blocks.0.hook_resid_pre"}, "reads the embeddings"),
        ({"hook": "hook_embed"}, "not a residual-stream hook"),
        ({"architecture": "topk"}, "a TopK SAE needs k"),
        ({"d_in": HIDDEN + 1}, "cfg.json says d_in=17"),
        ({"d_sae": 8}, "cfg.json says d_sae=8"),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu' is not supported"),
    ],
)
def test_saelens_refusals_name_the_reason(tmp_path, change, words):
    change = dict(change)
    arch = change.pop("architecture", "standard")
    hook = change.pop("hook", "blocks.1.hook_resid_post")
    d = write_saelens(tmp_path / "bad", arch, hook=hook, **change)
    with pytest.raises(SaeFileError, match=words) as e:
        read_any(d)
    assert str(e.value).startswith("bad:")  # names the directory


def test_saelens_missing_and_broken_tensors(tmp_path):
    w = weights(3)
    no_bias = {k: v for k, v in w.items() if k != "b_dec"}
    with pytest.raises(SaeFileError, match=r"missing tensor\(s\) \['b_dec'\]"):
        load_saelens(write_saelens(tmp_path / "a", "standard", no_bias))
    no_threshold = write_saelens(tmp_path / "b", "standard", w)
    cfg = json.loads((no_threshold / "cfg.json").read_text())
    (no_threshold / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SaeFileError, match=r"missing tensor\(s\) \['threshold'\]"):
        load_saelens(no_threshold)
    nan = {**w, "W_enc": w["W_enc"].copy()}
    nan["W_enc"][3, 4] = np.nan
    with pytest.raises(SaeFileError, match="W_enc holds NaN or Inf"):
        load_saelens(write_saelens(tmp_path / "c", "standard", nan))
    short = {**w, "b_enc": w["b_enc"][:-1]}
    with pytest.raises(SaeFileError, match=r"b_enc has shape \[63\], expected \[64\]"):
        load_saelens(write_saelens(tmp_path / "d", "standard", short, d_sae=None))
    ints = {**w, "b_dec": np.arange(HIDDEN, dtype=np.int32)}
    with pytest.raises(SaeFileError, match="tensor b_dec has dtype int32, expected floats"):
        load_saelens(write_saelens(tmp_path / "e", "standard", ints))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "cfg.json").write_text("{not json")
    (tmp_path / "f" / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(SaeFileError, match="not readable JSON"):
        read_any(tmp_path / "f")
    # A layer given for an SAELens SAE must agree with its hook.
    good = write_saelens(tmp_path / "g", "standard", w)
    assert read_any(good, layer=1).layer == 1
    with pytest.raises(SaeFileError, match="its hook reads layer 1, not the layer 2 given"):
        read_any(good, layer=2)


# --- sparsify ------------------------------------------------------------------------------


def test_sparsify_layer_from_directory_and_topk_encoder(tmp_path):
    t = sparsify_tensors()
    d = write_sparsify(tmp_path / "layers.1", k=4, tensors=t)
    sae = read_any(d)
    assert (sae.layer, sae.activation, sae.k, sae.source_format) == (1, "topk", 4, "sparsify")
    assert (sae.hidden_size, sae.width) == (HIDDEN, WIDTH)
    np.testing.assert_array_equal(sae.encoder_row(7), t["encoder.weight"][7])
    x = stream()
    want = sparsify_encode(t, x, 4)
    assert_fires_sometimes(want)
    np.testing.assert_allclose(sae.encode(x), want, rtol=1e-5, atol=1e-5)
    pre = (x - t["b_dec"]).astype(np.float64) @ t["encoder.weight"].T + t["encoder.bias"]
    relu = np.maximum(pre, 0)
    np.testing.assert_allclose(per_feature(sae, x), relu, rtol=1e-5, atol=1e-5)
    # A hookpoint named after the model's module path, and an explicit layer.
    assert read_any(write_sparsify(tmp_path / "model.layers.3")).layer == 3
    assert load_sparsify(write_sparsify(tmp_path / "renamed"), layer=2).layer == 2
    with pytest.raises(SaeFileError, match="hookpoint directory name"):
        read_any(tmp_path / "renamed")


def test_sparsify_bfloat16_weights(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    t = sparsify_tensors()
    d = write_sparsify(tmp_path / "layers.2")
    save_torch(
        {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in t.items()},
        str(d / "sae.safetensors"),
    )
    sae = read_any(d)
    back = torch.from_numpy(t["W_dec"]).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(sae.w_dec, back)  # widened exactly
    assert sae.layer == 2 and sae.w_dec.dtype == np.float32


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"activation": "groupmax"}, "activation 'groupmax' is not supported"),
        ({"transcode": True}, "transcoders are not residual SAEs"),
        ({"skip_connection": True}, "transcoders"),
        ({"embed_skip": True}, "embed_skip=true"),
        ({"d_in": 12}, "cfg.json says d_in=12"),
        ({"k": WIDTH + 1}, "needs k in 1..64"),
        ({"k": "many"}, "cfg.json: bad value"),
    ],
)
def test_sparsify_refusals(tmp_path, cfg, words):
    d = write_sparsify(tmp_path / "layers.1", **cfg)
    with pytest.raises(SaeFileError, match=words) as e:
        read_any(d)
    assert str(e.value).startswith("layers.1:")


def test_sparsify_without_k_or_tensors(tmp_path):
    d = write_sparsify(tmp_path / "layers.1")
    raw = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "k"}))
    with pytest.raises(SaeFileError, match="cfg.json has no 'k'"):
        read_any(d)
    t = {k: v for k, v in sparsify_tensors().items() if k != "encoder.bias"}
    with pytest.raises(SaeFileError, match=r"missing tensor\(s\) \['encoder.bias'\]"):
        read_any(write_sparsify(tmp_path / "layers.2", tensors=t))


# --- our format ----------------------------------------------------------------------------


def _same(a: SparseAutoencoder, b: SparseAutoencoder) -> None:
    for key in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold", "typical"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=key)
    for key in ("layer", "activation", "k", "subtract_b_dec", "source_format", "labels"):
        assert getattr(a, key) == getattr(b, key), key
    assert (a.architecture, a.description, a.extra) == (b.architecture, b.description, b.extra)


def test_our_format_round_trip_every_field(tmp_path):
    typical = np.linspace(1, 2, WIDTH).astype(np.float32)
    sae = ours(
        labels={3: "cats", 10: "rivers"},
        typical=typical,
        description="test SAE",
        architecture="LlamaForCausalLM",
        extra={"trained_on": "corpus", "format": "not ours"},  # cannot override the format
    )
    path = save_sae(sae, tmp_path / "s.safetensors")
    back = load_sae(path)
    assert back.extra == {"trained_on": "corpus"}  # the stray "format" key is dropped
    sae.extra = {"trained_on": "corpus"}
    _same(sae, back)
    _same(sae, read_any(path))
    _same(sae, parse_upload(path.read_bytes()))
    topk = ours(activation="topk", k=3, subtract_b_dec=False)
    _same(topk, load_sae(save_sae(topk, tmp_path / "t.safetensors")))
    # A converted SAE keeps its encoder exactly.
    gemma = load_gemma_scope(write_gemma_scope(tmp_path / "g", weights(2)))
    again = load_sae(save_sae(gemma, tmp_path / "g.safetensors"))
    _same(gemma, again)
    assert again.source_format == "gemma-scope" and not again.subtract_b_dec
    with pytest.raises(SaeFileError, match="reads layer 1, not 2"):
        read_any(path, layer=2)


def test_our_format_refusals(tmp_path):
    w = weights(0)
    save_file({"W_enc": w["W_enc"]}, str(tmp_path / "plain.safetensors"), metadata={"format": "x"})
    with pytest.raises(SaeFileError, match="not a steerserve SAE file"):
        load_sae(tmp_path / "plain.safetensors")
    meta = {"format": sae_module.FORMAT, "layer": "1", "activation": "relu", "labels": "[1, 2]"}
    tensors = {k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(tensors, str(tmp_path / "labels.safetensors"), metadata=meta)
    with pytest.raises(SaeFileError, match="bad metadata"):
        load_sae(tmp_path / "labels.safetensors")
    save_file(
        tensors, str(tmp_path / "nolayer.safetensors"), metadata={"format": sae_module.FORMAT}
    )
    with pytest.raises(SaeFileError, match=r"bad metadata \('layer'\)"):
        load_sae(tmp_path / "nolayer.safetensors")
    with pytest.raises(SaeFileError, match="a TopK SAE needs k in 1..64, got None"):
        ours(activation="topk")
    with pytest.raises(SaeFileError, match="a JumpReLU SAE needs a threshold"):
        ours(threshold=None)
    with pytest.raises(SaeFileError, match="a relu SAE has no threshold"):
        ours(activation="relu", threshold=w["threshold"])
    with pytest.raises(SaeFileError, match="k belongs to TopK SAEs"):
        ours(activation="relu", k=3)
    with pytest.raises(SaeFileError, match=r"labels name feature\(s\) \[64\]"):
        ours(labels={64: "past the end"})
    with pytest.raises(SaeFileError, match=r"W_enc has shape \[16, 63\], expected \[16, 64\]"):
        SparseAutoencoder(w["W_enc"][:, 1:], w["b_enc"], w["W_dec"], w["b_dec"], layer=0)
    with pytest.raises(SaeFileError, match="layer -1 is negative"):
        ours(layer=-1)
    (tmp_path / "x.pt").write_bytes(b"x")
    with pytest.raises(SaeFileError, match="unknown SAE file type"):
        read_any(tmp_path / "x.pt")
    with pytest.raises(SaeFileError, match="no such file"):
        read_any(tmp_path / "absent.safetensors")


def test_fits_names_hidden_size_and_layer():
    assert ours().fits(SHAPE) is None
    assert "reads hidden size 16, the model has 32" in ours().fits(
        ModelShape("LlamaForCausalLM", 4, 32, 4, 2, 8)
    )
    assert ours(layer=4).fits(SHAPE) == "reads layer 4, the model has 4 layers"
    with pytest.raises(IndexError, match="feature 64 is out of range"):
        ours().check_feature(64)


# --- uploads -------------------------------------------------------------------------------


def test_parse_upload_raw_files_and_zips(tmp_path):
    w = weights(0)
    npz = write_gemma_scope(tmp_path / "gs", w, layer=2)
    # A bare params.npz carries no path: the layer must be given.
    with pytest.raises(SaeFileError, match="do not record their layer") as e:
        parse_upload(npz.read_bytes())
    assert "steerserve-sae-" not in str(e.value)  # no temporary paths in messages
    sae = parse_upload(npz.read_bytes(), layer=3)
    assert sae.layer == 3 and sae.source_format == "gemma-scope"
    np.testing.assert_allclose(sae.encode(stream()), gemma_scope_encode(w, stream()), atol=1e-5)
    # A zip of the release's directory keeps layer_<i> in its paths.
    assert parse_upload(zip_of(tmp_path / "gs" / "layer_2")).layer == 2
    assert parse_upload(zip_of(tmp_path / "gs" / "layer_2"), layer=1).layer == 1
    # SAELens and sparsify directories, zipped (sparsify's layer is its directory name).
    lens = write_saelens(tmp_path / "lens", "jumprelu", weights(3))
    got = parse_upload(zip_of(lens))
    _same(got, load_saelens(lens))
    sp = write_sparsify(tmp_path / "layers.1")
    _same(parse_upload(zip_of(sp)), read_any(sp))
    # Members under extra folders, and macOS's resource forks, are fine.
    _same(parse_upload(zip_of(sp, under="export/run")), read_any(sp))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(sp / "cfg.json", "layers.1/cfg.json")
        z.write(sp / "sae.safetensors", "layers.1/sae.safetensors")
        z.writestr("__MACOSX/layers.1/._cfg.json", b"\x00junk")
    assert parse_upload(buf.getvalue()).layer == 1


def test_parse_upload_refusals(tmp_path, monkeypatch):
    with pytest.raises(SaeFileError, match="upload.safetensors: not a readable safetensors"):
        parse_upload(b"not an SAE at all")
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as z:
        for layer in (0, 1):
            z.writestr(f"layers.{layer}/cfg.json", "{}")
            z.writestr(f"layers.{layer}/sae.safetensors", b"")
    with pytest.raises(SaeFileError, match="more than one cfg.json: upload one SAE"):
        parse_upload(two.getvalue())
    empty = io.BytesIO()
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(SaeFileError, match="not an SAE directory") as e:
        parse_upload(empty.getvalue())
    assert "steerserve-sae-" not in str(e.value)
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for i in range(sae_module.MAX_ZIP_MEMBERS + 1):
            z.writestr(f"f{i}.txt", "x")
    with pytest.raises(SaeFileError, match="at most 16"):
        parse_upload(many.getvalue())
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("sae/cfg.json", b"0" * 200_000)
    monkeypatch.setattr(sae_module, "MIN_UNZIP_LIMIT", 10_000)
    with pytest.raises(SaeFileError, match="unpacks to 200000 bytes"):
        parse_upload(bomb.getvalue())
    data = zip_of(write_sparsify(tmp_path / "layers.1"))
    member = zipfile.ZipFile(io.BytesIO(data)).getinfo("layers.1/sae.safetensors")
    start = member.header_offset + 30 + len(member.filename) + 8
    corrupt = data[:start] + bytes(64) + data[start + 64 :]  # its compressed bytes, zeroed
    with pytest.raises(SaeFileError, match="not a readable zip archive"):
        parse_upload(corrupt)


# --- the registry --------------------------------------------------------------------------


def test_registry_reports_bad_files_and_keeps_the_others(tmp_path):
    d = tmp_path / "saes"
    d.mkdir()
    save_sae(ours(labels={1: "one"}), d / "good.safetensors")
    write_saelens(d / "lens", "standard")
    write_sparsify(d / "sp")  # no layers.<i> in its name: fails, says why
    (d / "broken.safetensors").write_bytes(b"junk")
    (d / "notes.txt").write_text("ignored")
    reg = SaeRegistry(d)
    assert reg.names() == ["good", "lens"]
    assert set(reg.errors) == {"broken.safetensors", "sp"}
    assert "not a readable safetensors file" in reg.errors["broken.safetensors"]
    assert "hookpoint directory name" in reg.errors["sp"]
    assert reg.lookup("good", SHAPE).labels == {1: "one"}
    with pytest.raises(KeyError, match=r"SAE 'broken' failed to load \(broken.safetensors: "):
        reg.lookup("broken", SHAPE)
    with pytest.raises(KeyError, match=r"unknown SAE 'nope' \(registered: good, lens\)"):
        reg.lookup("nope", SHAPE)
    with pytest.raises(ValueError, match="reads hidden size 16, the model has 32"):
        reg.lookup("good", ModelShape("LlamaForCausalLM", 4, 32, 4, 2, 8))


def test_registry_store_replace_delete(tmp_path):
    d = tmp_path / "saes"
    d.mkdir()
    write_saelens(d / "lens", "standard")
    (d / "broken.safetensors").write_bytes(b"junk")
    reg = SaeRegistry(d)
    data = save_sae(ours(), tmp_path / "up.safetensors").read_bytes()
    sae, replaced = reg.store("fresh", data, SHAPE)
    assert not replaced and (d / "fresh.safetensors").exists()
    _same(load_sae(d / "fresh.safetensors"), sae)
    # Replacing a directory-form SAE with an upload leaves one file, in our format.
    _, replaced = reg.store("lens", data, SHAPE)
    assert replaced and not (d / "lens").exists() and (d / "lens.safetensors").exists()
    # Replacing a broken file clears its error.
    reg.store("broken", data, SHAPE)
    assert "broken.safetensors" not in reg.errors and "broken" in reg.saes
    wide = ModelShape("LlamaForCausalLM", 4, 32, 4, 2, 8)
    before = sorted(p.name for p in d.iterdir())
    with pytest.raises(ValueError, match="SAE 'x' reads hidden size 16, the model has 32"):
        reg.store("x", data, wide)
    with pytest.raises(ValueError, match="reads layer 1, the model has 1 layers"):
        reg.store("x", data, ModelShape("LlamaForCausalLM", 1, HIDDEN, 4, 2, 4))
    with pytest.raises(ValueError, match="not a valid SAE name"):
        reg.store("../escape", data, SHAPE)
    with pytest.raises(SaeFileError, match="not a readable safetensors"):
        reg.store("x", b"junk", SHAPE)
    assert sorted(p.name for p in d.iterdir()) == before  # nothing written
    # What is on disk is what a fresh registry serves.
    again = SaeRegistry(d)
    assert again.names() == ["broken", "fresh", "lens"] and again.errors == {}
    reg.delete("fresh")
    assert not (d / "fresh.safetensors").exists() and "fresh" not in reg.saes
    with pytest.raises(KeyError):
        reg.delete("fresh")
    for name in (".", "..", "missing"):
        with pytest.raises(KeyError):
            reg.delete(name)
    assert d.is_dir() and (d / "lens.safetensors").exists()  # "." and ".." removed nothing
    assert SaeRegistry(tmp_path / "absent").names() == []
    with pytest.raises(ValueError, match="no SAE directory"):
        SaeRegistry().store("x", data, SHAPE)


# --- steerserve features info|convert --------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        features_main(list(argv))
    out = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else 1) if code else 0, out.out, out.err


def test_features_info_and_convert(tmp_path, capsys):
    lens = write_saelens(tmp_path / "lens", "topk", weights(3), k=5)
    code, out, _ = _cli(capsys, "info", str(lens))
    assert code == 0
    assert "saelens" in out and "topk, k=5" in out and "layer        1" in out
    assert f"width        {WIDTH} features" in out and "encodes      h - b_dec" in out

    npz = write_gemma_scope(tmp_path / "gs", weights(0), layer=2)
    dst = tmp_path / "converted.safetensors"
    code, out, _ = _cli(capsys, "convert", str(npz), str(dst))
    assert code == 0 and "layer 2" in out and "jumprelu" in out
    _same(load_sae(dst), load_gemma_scope(npz))
    code, out, _ = _cli(capsys, "convert", str(npz), str(dst), "--layer", "3")
    assert code == 0 and load_sae(dst).layer == 3

    labelled = save_sae(
        ours(labels={i: f"label {i}" for i in range(12)}), tmp_path / "l.safetensors"
    )
    code, out, _ = _cli(capsys, "info", str(labelled))
    assert "labelled     12 of 64 features" in out and "label 9" in out and "2 more" in out
    code, out, _ = _cli(capsys, "info", "--json", str(labelled), str(dst))
    first, second = json.loads(out)
    assert first["labels"]["11"] == "label 11" and first["activation"] == "jumprelu"
    assert (second["format"], second["layer"], second["width"]) == ("gemma-scope", 3, WIDTH)
    assert second["threshold"]["max"] == pytest.approx(float(weights(0)["threshold"].max()))


def test_features_commands_name_the_failure(tmp_path, capsys):
    bare = tmp_path / "params.npz"
    np.savez(bare, **weights(0))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    good = save_sae(ours(), tmp_path / "good.safetensors")
    code, out, err = _cli(capsys, "info", str(tmp_path / "junk.safetensors"), str(good))
    assert code == 1 and "junk.safetensors" in err and "good.safetensors" in out
    with pytest.raises(SystemExit, match="do not record their layer"):
        features_main(["convert", str(bare), str(tmp_path / "out.safetensors")])
    with pytest.raises(SystemExit, match="write a .safetensors file"):
        features_main(["convert", str(good), str(tmp_path / "out.npz")])
    with pytest.raises(SystemExit, match="is the input itself"):
        features_main(["convert", str(good), str(good)])
    assert not (tmp_path / "out.safetensors").exists()
    assert (
        _cli(capsys, "convert", str(bare), str(tmp_path / "out.safetensors"), "--layer", "1")[0]
        == 0
    )
