"""Sparse autoencoders (SAEs) on the residual stream: the model, its files, its features.

An SAE here reads the residual stream after decoder layer `layer` (docs/design.md#layer-
convention; SAELens `blocks.<i>.hook_resid_post`, Gemma Scope `layer_<i>` residual SAEs,
EleutherAI sparsify `layers.<i>`):

    pre(h) = W_enc^T (h - b_dec) + b_enc          (without `- b_dec` when subtract_b_dec is off)
    a(h)   = act(pre(h))                          ReLU, JumpReLU or TopK
    h_hat  = W_dec^T a(h) + b_dec

One feature f's activation, as the spec's ops and readout use it, is computed from that
feature alone: a_f(h) = pre_f(h) if pre_f(h) > theta_f else 0, with theta_f = max(threshold_f,
0) for JumpReLU (Gemma Scope's relu(pre) * (pre > threshold)) and 0 for ReLU. For TopK SAEs
that is ReLU without the top-k competition (which needs every feature's pre-activation);
`encode` applies the full top-k, as the top-k readout does.

Files read: our safetensors (`save_sae`/`load_sae`), Gemma Scope (`params.npz` or
safetensors with W_enc, W_dec, b_enc, b_dec, threshold; its encoder reads h itself, without
`- b_dec`), SAELens v5/v6 (`cfg.json` + `sae_weights.safetensors`: standard/ReLU, jumprelu,
topk) and sparsify (`cfg.json` + `sae.safetensors`: TopK), float32/16 or bfloat16.
`read_any` tells them apart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from steering.spec import ModelShape

FORMAT = "steerserve.sae.v1"
Activation = Literal["relu", "jumprelu", "topk"]
ACTIVATIONS = ("relu", "jumprelu", "topk")


class SaeFileError(ValueError):
    """An SAE that cannot be used; the message names the reason."""


@dataclass(frozen=True)
class FeatureRows:
    """What the engine needs of one feature: pre = <enc, h> + offset, a = pre if pre >
    threshold else 0, and the decoder row it writes along. `digest` hashes all of it (and the
    SAE's activation function), so a spec's fingerprint follows the SAE's content, not its
    name."""

    layer: int
    enc: np.ndarray
    dec: np.ndarray
    offset: float
    threshold: float
    digest: bytes


@dataclass
class SparseAutoencoder:
    w_enc: np.ndarray  # [hidden, width]
    b_enc: np.ndarray  # [width]
    w_dec: np.ndarray  # [width, hidden]
    b_dec: np.ndarray  # [hidden]
    layer: int  # the residual stream after this decoder layer
    activation: Activation = "relu"
    threshold: np.ndarray | None = None  # [width], JumpReLU only
    k: int | None = None  # TopK only
    subtract_b_dec: bool = True  # SAELens apply_b_dec_to_input
    source_format: str = "steerserve"
    architecture: str | None = None
    description: str | None = None
    labels: dict[int, str] = field(default_factory=dict)
    # Typical activation of each feature when it fires (e.g. its mean over a corpus where
    # it is > 0): what `add` with `relative: true` scales by.
    typical: np.ndarray | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        as32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        self.w_enc, self.b_enc = as32(self.w_enc), as32(self.b_enc)
        self.w_dec, self.b_dec = as32(self.w_dec), as32(self.b_dec)
        if self.threshold is not None:
            self.threshold = as32(self.threshold)
        if self.typical is not None:
            self.typical = as32(self.typical)
        self.labels = {int(k): str(v) for k, v in self.labels.items()}
        self.check()

    @property
    def hidden_size(self) -> int:
        return int(self.w_dec.shape[1])

    @property
    def width(self) -> int:
        return int(self.w_dec.shape[0])

    def check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise SaeFileError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.w_dec.ndim != 2:
            raise SaeFileError(f"W_dec has shape {self.w_dec.shape}, expected [width, hidden]")
        width, hidden = self.w_dec.shape
        want = {
            "W_enc": (self.w_enc, (hidden, width)),
            "b_enc": (self.b_enc, (width,)),
            "b_dec": (self.b_dec, (hidden,)),
        }
        if self.threshold is not None:
            want["threshold"] = (self.threshold, (width,))
        if self.typical is not None:
            want["typical"] = (self.typical, (width,))
        for name, (array, shape) in want.items():
            if array.shape != shape:
                raise SaeFileError(
                    f"{name} has shape {list(array.shape)}, expected {list(shape)} "
                    f"(W_dec is [{width}, {hidden}])"
                )
        arrays = {"W_dec": self.w_dec, **{name: array for name, (array, _) in want.items()}}
        for name, array in arrays.items():
            if not np.isfinite(array).all():
                raise SaeFileError(f"{name} holds NaN or Inf")
        if self.layer < 0:
            raise SaeFileError(f"layer {self.layer} is negative")
        if self.activation == "jumprelu" and self.threshold is None:
            raise SaeFileError("a JumpReLU SAE needs a threshold per feature")
        if self.activation != "jumprelu" and self.threshold is not None:
            raise SaeFileError(f"a {self.activation} SAE has no threshold")
        if self.activation == "topk":
            if self.k is None or not 1 <= self.k <= width:
                raise SaeFileError(f"a TopK SAE needs k in 1..{width}, got {self.k}")
        elif self.k is not None:
            raise SaeFileError(f"k belongs to TopK SAEs, this one is {self.activation}")
        bad = [f for f in self.labels if not 0 <= f < width]
        if bad:
            raise SaeFileError(f"labels name feature(s) {bad[:5]} outside 0..{width - 1}")

    def fits(self, shape: ModelShape) -> str | None:
        """Why this SAE cannot be used on a model of `shape`, or None."""
        if self.hidden_size != shape.hidden_size:
            return f"reads hidden size {self.hidden_size}, the model has {shape.hidden_size}"
        if self.layer >= shape.num_layers:
            return f"reads layer {self.layer}, the model has {shape.num_layers} layers"
        return None

    def check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.width:
            raise IndexError(f"feature {feature} is out of range (0..{self.width - 1})")

    # --- one feature, as the ops use it --------------------------------------------------

    @functools.cached_property
    def _encoder_rows(self) -> np.ndarray:
        # W_enc^T once: a spec reads a feature's column many times (compile, fingerprint).
        return np.ascontiguousarray(self.w_enc.T)

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        off = self.b_enc.astype(np.float64)
        if self.subtract_b_dec:
            off = off - self.w_enc.T.astype(np.float64) @ self.b_dec.astype(np.float64)
        return off

    def encoder_row(self, feature: int) -> np.ndarray:
        """W_enc[:, f]: pre_f(h) = <encoder_row, h> + encoder_offset."""
        return self._encoder_rows[feature]

    def encoder_offset(self, feature: int) -> float:
        """b_enc[f] - <W_enc[:, f], b_dec> (the b_dec subtraction folded into the bias)."""
        return float(self._offsets[feature])

    def feature_threshold(self, feature: int) -> float:
        """theta_f: a_f = pre_f if pre_f > theta_f else 0."""
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return max(float(self.threshold[feature]), 0.0)
        return 0.0

    def decoder_row(self, feature: int) -> np.ndarray:
        return np.ascontiguousarray(self.w_dec[feature])

    def feature_rows(self, feature: int) -> FeatureRows:
        """One feature's rows, built once per SAE: every spec naming the feature reuses them
        (validation, compile and fingerprint are per request; the rows are not)."""
        rows = self._feature_rows.get(feature)
        if rows is None:
            enc, dec = self.encoder_row(feature), self.decoder_row(feature)
            enc.flags.writeable = dec.flags.writeable = False  # shared by every spec
            offset, threshold = self.encoder_offset(feature), self.feature_threshold(feature)
            layer = int(self.layer)
            h = hashlib.sha256(repr((layer, self.activation, offset, threshold)).encode())
            h.update(enc.tobytes())
            h.update(dec.tobytes())
            rows = FeatureRows(layer, enc, dec, offset, threshold, h.digest())
            self._feature_rows[feature] = rows
        return rows

    @functools.cached_property
    def _feature_rows(self) -> dict[int, FeatureRows]:
        return {}

    def label(self, feature: int) -> str | None:
        return self.labels.get(feature)

    # --- the whole SAE (readout's top-k, search, training) -------------------------------

    def pre_acts(self, h: np.ndarray) -> np.ndarray:
        x = h.astype(np.float64)
        if self.subtract_b_dec:
            x = x - self.b_dec
        return x @ self.w_enc.astype(np.float64) + self.b_enc

    def activate(self, pre: np.ndarray) -> np.ndarray:
        if self.activation == "jumprelu":
            assert self.threshold is not None
            theta = np.maximum(self.threshold.astype(np.float64), 0.0)
            return np.where(pre > theta, pre, 0.0)
        acts = np.maximum(pre, 0.0)
        if self.activation == "topk":
            assert self.k is not None
            drop = np.argpartition(-acts, self.k - 1, axis=-1)[..., self.k :]
            np.put_along_axis(acts, drop, 0.0, axis=-1)
        return acts

    def encode(self, h: np.ndarray) -> np.ndarray:
        return self.activate(self.pre_acts(h))

    def decode(self, acts: np.ndarray) -> np.ndarray:
        return acts @ self.w_dec.astype(np.float64) + self.b_dec

    def metadata(self) -> dict[str, str]:
        # Extras first: a stray "format" or "layer" among them must not make the file
        # unreadable or change what it reads.
        meta = dict(self.extra)
        meta |= {
            "format": FORMAT,
            "layer": str(self.layer),
            "activation": self.activation,
            "subtract_b_dec": "true" if self.subtract_b_dec else "false",
            "source_format": self.source_format,
            "labels": json.dumps({str(k): v for k, v in sorted(self.labels.items())}),
        }
        if self.k is not None:
            meta["k"] = str(self.k)
        for key in ("architecture", "description"):
            value = getattr(self, key)
            if value is not None:
                meta[key] = value
        return meta


# --- our format ----------------------------------------------------------------------------


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write our safetensors format atomically."""
    from safetensors.numpy import save_file

    from steering.vectors import _atomic_write

    tensors = {"W_enc": sae.w_enc, "b_enc": sae.b_enc, "W_dec": sae.w_dec, "b_dec": sae.b_dec}
    if sae.threshold is not None:
        tensors["threshold"] = sae.threshold
    if sae.typical is not None:
        tensors["typical"] = sae.typical
    path = Path(path)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=sae.metadata()))
    return path


def _tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118
    except SaeFileError:
        raise
    except Exception as e:
        widened = _bfloat16_tensors(path)
        if widened is not None:
            return widened
        raise SaeFileError(f"{path.name}: not a readable safetensors file ({e})") from None


_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def _bfloat16_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """A safetensors file with bfloat16 tensors (as many released SAEs are), read by hand:
    numpy has no bfloat16, so safetensors' numpy side refuses them. bfloat16 is the top
    half of a float32, which is what it is widened to. None when the file is something
    else (the caller then reports the library's own error)."""
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
            meta = header.pop("__metadata__", None) or {}
            if not any(info.get("dtype") == "BF16" for info in header.values()):
                return None
            body = f.read()
        tensors = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(n) for n in info["shape"])
            if not 0 <= start <= end <= len(body) or end - start != dtype.itemsize * int(
                np.prod(shape, dtype=np.int64)
            ):
                return None
            array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
            if info["dtype"] == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = array
        return tensors, {str(k): str(v) for k, v in meta.items()}
    except Exception:
        return None


def _float_tensors(tensors: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    out = {}
    for name, t in tensors.items():
        if t.dtype.kind != "f":
            raise SaeFileError(f"{where}: tensor {name} has dtype {t.dtype}, expected floats")
        out[name] = t.astype(np.float32)
    return out


def _need(tensors: dict[str, np.ndarray], names: tuple[str, ...], where: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SaeFileError(f"{where}: missing tensor(s) {missing} (has {sorted(tensors)})")


def load_sae(path: str | Path) -> SparseAutoencoder:
    """Our safetensors file."""
    path = Path(path)
    raw, meta = _tensors(path)
    if meta.get("format") != FORMAT:
        raise SaeFileError(
            f"{path.name}: not a steerserve SAE file (format {meta.get('format')!r})"
        )
    tensors = _float_tensors(raw, path.name)
    _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path.name)
    known = {"format", "layer", "activation", "subtract_b_dec", "source_format", "labels", "k"}
    known |= {"architecture", "description"}
    try:
        return SparseAutoencoder(
            tensors["W_enc"],
            tensors["b_enc"],
            tensors["W_dec"],
            tensors["b_dec"],
            layer=int(meta["layer"]),
            activation=meta.get("activation", "relu"),  # type: ignore[arg-type]
            threshold=tensors.get("threshold"),
            k=int(meta["k"]) if "k" in meta else None,
            subtract_b_dec=meta.get("subtract_b_dec", "true") == "true",
            source_format=meta.get("source_format", "steerserve"),
            architecture=meta.get("architecture"),
            description=meta.get("description"),
            labels=json.loads(meta.get("labels", "{}")),
            typical=tensors.get("typical"),
            extra={k: v for k, v in meta.items() if k not in known},
        )
    except SaeFileError as e:
        raise SaeFileError(f"{path.name}: {e}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise SaeFileError(f"{path.name}: bad metadata ({e})") from None


# --- Gemma Scope ---------------------------------------------------------------------------

_LAYER_IN_PATH = re.compile(r"layer_(\d+)")


def load_gemma_scope(path: str | Path, layer: int | None = None) -> SparseAutoencoder:
    """Gemma Scope residual SAE: `params.npz` (or safetensors) with W_enc [d_model, width],
    W_dec [width, d_model], b_enc, b_dec, threshold (JumpReLU). The layer is not in the
    file: give it, or let it come from a `layer_<i>` directory in the path (as Gemma
    Scope's own release is laid out)."""
    path = Path(path)
    if path.is_dir():
        for name in ("params.npz", "params.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise SaeFileError(f"{path}: no params.npz or params.safetensors")
    if path.suffix == ".npz":
        try:
            with np.load(path) as z:
                raw = {k: z[k] for k in z.files}
        except Exception as e:
            raise SaeFileError(f"{path.name}: not a readable .npz file ({e})") from None
    else:
        raw, _ = _tensors(path)
    tensors = _float_tensors(raw, path.name)
    _need(tensors, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path.name)
    if layer is None:
        found = _LAYER_IN_PATH.findall(str(path))
        if not found:
            raise SaeFileError(
                f"{path}: Gemma Scope files do not record their layer; give it (layer=...) "
                "or keep the release's layer_<i> directory in the path"
            )
        layer = int(found[-1])
    try:
        return SparseAutoencoder(
            tensors["W_enc"],
            tensors["b_enc"],
            tensors["W_dec"],
            tensors["b_dec"],
            layer=layer,
            activation="jumprelu",
            threshold=tensors["threshold"],
            # Gemma Scope's reference encoder is relu(h @ W_enc + b_enc) * mask: b_dec only
            # enters the decoder (SAELens loads it with apply_b_dec_to_input=False).
            subtract_b_dec=False,
            source_format="gemma-scope",
        )
    except SaeFileError as e:
        raise SaeFileError(f"{path.name}: {e}") from None


# --- SAELens -------------------------------------------------------------------------------

_HOOK = re.compile(r"^(?:blocks|model\.layers|layers)\.(\d+)\.hook_resid_(post|pre)$")


def _hook_layer(hook: str, where: str) -> int:
    """Our layer of a transformer-lens residual hook: resid_post of block i is the output of
    layer i; resid_pre of block i is the output of layer i - 1."""
    m = _HOOK.match(hook or "")
    if m is None:
        raise SaeFileError(
            f"{where}: hook {hook!r} is not a residual-stream hook (blocks.<i>.hook_resid_post "
            "or hook_resid_pre); only residual SAEs can steer"
        )
    block, kind = int(m.group(1)), m.group(2)
    if kind == "post":
        return block
    if block == 0:
        raise SaeFileError(f"{where}: {hook} reads the embeddings, before any decoder layer")
    return block - 1


def _saelens_field(cfg: dict[str, Any], key: str) -> Any:
    """SAELens v6 keeps the hook and model under cfg["metadata"] ("meta" in some
    pre-releases); v5 and earlier at the top level."""
    for where in (cfg, cfg.get("metadata"), cfg.get("meta")):
        if isinstance(where, dict) and where.get(key) is not None:
            return where[key]
    return None


def load_saelens(directory: str | Path) -> SparseAutoencoder:
    """SAELens: `cfg.json` + `sae_weights.safetensors` (standard/ReLU, jumprelu, topk)."""
    directory = Path(directory)
    cfg_path, weights = directory / "cfg.json", directory / "sae_weights.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise SaeFileError(f"{directory}: an SAELens SAE is cfg.json + sae_weights.safetensors")
    cfg = _read_json(cfg_path)
    arch = cfg.get("architecture") or "standard"
    activation = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}.get(
        arch
    )
    if activation is None:
        raise SaeFileError(
            f"{directory.name}: SAELens architecture {arch!r} is not supported "
            "(standard, jumprelu or topk)"
        )
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch == "standard" and fn not in ("relu", None):
        activation = "topk" if fn == "topk" else None
        if activation is None:
            raise SaeFileError(f"{directory.name}: activation_fn {fn!r} is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SaeFileError(
            f"{directory.name}: normalize_activations={norm!r} rescales the stream before "
            "encoding; only 'none' is supported"
        )
    tensors = _float_tensors(_tensors(weights)[0], weights.name)
    needed = ("W_enc", "b_enc", "W_dec", "b_dec", *(("threshold",) if arch == "jumprelu" else ()))
    _need(tensors, needed, weights.name)
    for key, axis in (("d_in", 1), ("d_sae", 0)):
        if cfg.get(key) is not None and cfg[key] != tensors["W_dec"].shape[axis]:
            raise SaeFileError(
                f"{directory.name}: cfg.json says {key}={cfg[key]}, W_dec is "
                f"{list(tensors['W_dec'].shape)}"
            )
    w_dec = tensors["W_dec"]
    if cfg.get("finetuning_scaling_factor") and "scaling_factor" in tensors:
        # SAELens v5 scales the activations by it before decoding: fold it into W_dec.
        w_dec = w_dec * tensors["scaling_factor"].reshape(-1, 1)
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    layer = _hook_layer(_saelens_field(cfg, "hook_name") or "", directory.name)
    try:
        return SparseAutoencoder(
            tensors["W_enc"],
            tensors["b_enc"],
            w_dec,
            tensors["b_dec"],
            layer=layer,
            activation=activation,  # type: ignore[arg-type]
            threshold=tensors["threshold"] if activation == "jumprelu" else None,
            k=int(k) if activation == "topk" and k is not None else None,
            subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
            source_format="saelens",
            architecture=_saelens_field(cfg, "model_name"),
        )
    except SaeFileError as e:
        raise SaeFileError(f"{directory.name}: {e}") from None
    except (TypeError, ValueError) as e:
        raise SaeFileError(f"{directory.name}: cfg.json: bad value ({e})") from None


# --- EleutherAI sparsify -------------------------------------------------------------------

_SPARSIFY_HOOK = re.compile(r"(?:^|\.)layers\.(\d+)$")


def load_sparsify(directory: str | Path, layer: int | None = None) -> SparseAutoencoder:
    """sparsify: `cfg.json` + `sae.safetensors` with encoder.weight [width, d_in],
    encoder.bias, W_dec [width, d_in], b_dec; TopK of ReLU(encoder(x - b_dec)). The layer
    comes from the hookpoint directory name (`layers.<i>`) unless given."""
    directory = Path(directory)
    cfg_path, weights = directory / "cfg.json", directory / "sae.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise SaeFileError(f"{directory}: a sparsify SAE is cfg.json + sae.safetensors")
    cfg = _read_json(cfg_path)
    if cfg.get("transcode") or cfg.get("skip_connection"):
        raise SaeFileError(f"{directory.name}: transcoders are not residual SAEs")
    if cfg.get("activation", "topk") != "topk":
        # groupmax takes the max of each of k groups: a different sparsity than TopK.
        raise SaeFileError(
            f"{directory.name}: sparsify activation {cfg['activation']!r} is not supported "
            "(only topk)"
        )
    for key in ("embed_skip", "gram_lookup"):
        if cfg.get(key):
            raise SaeFileError(
                f"{directory.name}: {key}=true changes what the coder reads or writes beyond "
                "an SAE of the stream; not supported"
            )
    tensors = _float_tensors(_tensors(weights)[0], weights.name)
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights.name)
    if cfg.get("d_in") is not None and cfg["d_in"] != tensors["W_dec"].shape[-1]:
        raise SaeFileError(
            f"{directory.name}: cfg.json says d_in={cfg['d_in']}, W_dec is "
            f"{list(tensors['W_dec'].shape)}"
        )
    if layer is None:
        m = _SPARSIFY_HOOK.search(directory.name)
        if m is None:
            raise SaeFileError(
                f"{directory.name}: the layer comes from the hookpoint directory name "
                "(layers.<i>); give it (layer=...)"
            )
        layer = int(m.group(1))
    try:
        return SparseAutoencoder(
            tensors["encoder.weight"].T,
            tensors["encoder.bias"],
            tensors["W_dec"],
            tensors["b_dec"],
            layer=layer,
            activation="topk",
            k=int(cfg["k"]),
            source_format="sparsify",
        )
    except SaeFileError as e:
        raise SaeFileError(f"{directory.name}: {e}") from None
    except KeyError as e:
        raise SaeFileError(f"{directory.name}: cfg.json has no {e}") from None
    except (TypeError, ValueError) as e:
        raise SaeFileError(f"{directory.name}: cfg.json: bad value ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except Exception as e:
        raise SaeFileError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise SaeFileError(f"{path}: expected a JSON object")
    return data


def read_any(path: str | Path, layer: int | None = None) -> SparseAutoencoder:
    """Any supported SAE: our .safetensors, Gemma Scope params.npz/.safetensors, or an
    SAELens / sparsify directory (or Gemma Scope directory)."""
    path = Path(path)
    if path.is_dir():
        if (path / "sae_weights.safetensors").exists():
            sae = load_saelens(path)
            if layer is not None and layer != sae.layer:
                raise SaeFileError(
                    f"{path.name}: its hook reads layer {sae.layer}, not the layer {layer} given"
                )
            return sae
        if (path / "sae.safetensors").exists():
            return load_sparsify(path, layer)
        if (path / "params.npz").exists() or (path / "params.safetensors").exists():
            return load_gemma_scope(path, layer)
        raise SaeFileError(
            f"{path}: not an SAE directory (SAELens cfg.json + sae_weights.safetensors, "
            "sparsify cfg.json + sae.safetensors, or Gemma Scope params.npz)"
        )
    if not path.exists():
        raise SaeFileError(f"{path}: no such file")
    if path.suffix == ".npz":
        return load_gemma_scope(path, layer)
    if path.suffix == ".safetensors":
        _, meta = _tensors(path)
        if meta.get("format") == FORMAT:
            sae = load_sae(path)
            if layer is not None and layer != sae.layer:
                raise SaeFileError(f"{path.name}: reads layer {sae.layer}, not {layer}")
            return sae
        return load_gemma_scope(path, layer)
    raise SaeFileError(f"{path.name}: unknown SAE file type (.safetensors, .npz or a directory)")


# --- uploads and the registry ----------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MAX_ZIP_MEMBERS = 16
# An archive may unpack to at most this many times its own size (and at least the floor):
# SAE tensors hardly compress, so a larger ratio is a zip bomb, not an SAE.
MAX_UNZIP_RATIO = 32
MIN_UNZIP_LIMIT = 64 << 20


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def parse_upload(data: bytes, layer: int | None = None) -> SparseAutoencoder:
    """An uploaded SAE: our .safetensors, a Gemma Scope params.npz / .safetensors (with
    `layer`), or a .zip of an SAELens, sparsify or Gemma Scope directory. A zip keeps the
    directory the files sit in as their layer hint (sparsify's `layers.<i>/`, Gemma Scope's
    `layer_<i>/...`)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="steerserve-sae-") as d:
        root = Path(d)
        try:
            if data[:4] == b"PK\x03\x04":
                return _parse_zip(data, root, layer)
            path = root / "upload.safetensors"
            path.write_bytes(data)
            return read_any(path, layer)
        except SaeFileError as e:
            # The temporary directory means nothing to whoever uploaded the file.
            message = str(e).replace(f"{root}/", "").replace(str(root), "upload")
            raise SaeFileError(message) from None


def _kept_member(filename: str) -> bool:
    """Archive members worth unpacking: not macOS resource forks, not hidden files."""
    parts = Path(filename).parts
    return bool(parts) and not any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _parse_zip(data: bytes, root: Path, layer: int | None) -> SparseAutoencoder:
    import io
    import zipfile
    import zlib

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in archive.infolist() if not m.is_dir()]
        if members and all(m.filename.endswith(".npy") for m in members):
            path = root / "params.npz"  # a Gemma Scope params.npz (an .npz is a zip)
            path.write_bytes(data)
            return load_gemma_scope(path, layer)
        kept = [m for m in members if _kept_member(m.filename)]
        if len(kept) > MAX_ZIP_MEMBERS:
            raise SaeFileError(f"the archive holds {len(kept)} files, at most {MAX_ZIP_MEMBERS}")
        unpacked = sum(m.file_size for m in kept)
        limit = max(MIN_UNZIP_LIMIT, MAX_UNZIP_RATIO * len(data))
        if unpacked > limit:
            raise SaeFileError(f"the archive unpacks to {unpacked} bytes, at most {limit}")
        names = [Path(m.filename).name for m in kept]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SaeFileError(
                f"the archive holds more than one {repeated[0]}: upload one SAE per archive"
            )
        # Flattened into one folder (no paths out of it), named after the members' own
        # directory when they share one: that name is sparsify's only record of the layer.
        parents = {Path(m.filename).parent.parts for m in kept}
        hint = [p for p in next(iter(parents)) if p != "/"] if len(parents) == 1 else []
        hint = [re.sub(r"[^A-Za-z0-9_.\-]", "_", p) for p in hint]
        folder = root / (hint[-1] if hint else "upload")
        folder.mkdir()
        for m, name in zip(kept, names, strict=True):
            (folder / name).write_bytes(archive.read(m))
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError) as e:
        raise SaeFileError(f"not a readable zip archive ({e})") from None
    gemma = any((folder / n).exists() for n in ("params.npz", "params.safetensors"))
    if layer is None and gemma:
        found = _LAYER_IN_PATH.findall("/".join(hint))
        if found:
            layer = int(found[-1])
    return read_any(folder, layer)


def same_sae(a: SparseAutoencoder | None, b: SparseAutoencoder | None) -> bool:
    """Whether two SAEs encode and decode alike (weights, layer, activation, k)."""
    if a is None or b is None:
        return a is b

    def kind(s: SparseAutoencoder) -> tuple:
        return (s.layer, s.activation, s.k, s.subtract_b_dec)

    if kind(a) != kind(b):
        return False
    pairs = [(a.w_enc, b.w_enc), (a.w_dec, b.w_dec), (a.b_enc, b.b_enc), (a.b_dec, b.b_dec)]
    if (a.threshold is None) != (b.threshold is None):
        return False
    if a.threshold is not None:
        pairs.append((a.threshold, b.threshold))
    return all(np.array_equal(x, y) for x, y in pairs)


def sae_paths(directory: Path) -> list[tuple[str, Path]]:
    """(name, path) of each candidate SAE in `directory`, in path order: `<name>.safetensors`,
    `<name>.npz` or a directory `<name>/`."""
    if not directory.is_dir():
        return []
    out = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            out.append((path.name, path))
        elif path.suffix in (".safetensors", ".npz"):
            out.append((path.stem, path))
    return out


def load_named(directory: str | Path, name: str) -> SparseAutoencoder:
    """The SAE a registry of `directory` serves as `name` (the first file of that name),
    read alone; KeyError if there is none, SaeFileError if it does not load."""
    for found, path in sae_paths(Path(directory)):
        if found == name:
            return read_any(path)
    raise KeyError(f"no SAE {name!r} in {directory}")


class SaeRegistry:
    """Named SAEs from a directory: `<name>.safetensors` (ours or Gemma Scope's, the latter
    with a layer_<i> in its name) or `<name>/` (an SAELens, sparsify or Gemma Scope
    directory). Every SAE is validated at load; a bad one is reported in `errors` by file
    name and does not stop the others. Uploads are stored in our format."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.saes: dict[str, SparseAutoencoder] = {}
        self.errors: dict[str, str] = {}
        if self.directory is not None:
            self.reload()

    def reload(self) -> None:
        import logging

        self.saes, self.errors = {}, {}
        if self.directory is None:
            return
        for name, path in sae_paths(self.directory):
            if not valid_name(name):
                self.errors[path.name] = f"{name!r} is not a valid SAE name"
            elif name in self.saes:
                self.errors[path.name] = f"name {name!r} is already taken by another file"
            else:
                try:
                    self.saes[name] = read_any(path)
                except SaeFileError as e:
                    self.errors[path.name] = str(e)
        for file, reason in self.errors.items():
            logging.getLogger(__name__).error("SAE %s skipped: %s", file, reason)

    def add(self, name: str, sae: SparseAutoencoder) -> None:
        if not valid_name(name):
            raise ValueError(f"{name!r} is not a valid SAE name")
        self.saes[name] = sae

    def store(
        self, name: str, data: bytes, shape: ModelShape, layer: int | None = None
    ) -> tuple[SparseAutoencoder, bool]:
        """Validate an upload against the model, write it atomically as `<name>.safetensors`
        (our format) and serve it from now on. Returns the SAE and whether it replaced one."""
        import shutil

        if self.directory is None:
            raise ValueError("the server has no SAE directory to store SAEs in")
        if not valid_name(name):
            raise ValueError(f"{name!r} is not a valid SAE name ({_NAME.pattern})")
        sae = parse_upload(data, layer)
        problem = sae.fits(shape)
        if problem is not None:
            raise ValueError(f"SAE {name!r} {problem}")
        save_sae(sae, self.directory / f"{name}.safetensors")
        for other in (self.directory / name, self.directory / f"{name}.npz"):
            if other.is_dir():
                shutil.rmtree(other)
            else:
                other.unlink(missing_ok=True)
        replaced = name in self.saes
        self.saes[name] = sae
        for key in [k for k in self.errors if Path(k).stem == name or k == name]:
            del self.errors[key]
        return sae, replaced

    def delete(self, name: str) -> None:
        import shutil

        if not valid_name(name):
            # "." or ".." would name the registry directory or its parent, which the
            # rmtree below would then remove.
            raise KeyError(name)
        files = []
        if self.directory is not None:
            files = [
                p
                for p in (self.directory / f"{name}.safetensors", self.directory / f"{name}.npz")
                if p.exists()
            ]
            if (self.directory / name).is_dir():
                files.append(self.directory / name)
        if name not in self.saes and not files:
            raise KeyError(name)
        for f in files:
            shutil.rmtree(f) if f.is_dir() else f.unlink()
            self.errors.pop(f.name, None)
        self.saes.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.saes)

    def lookup(self, name: str, shape: ModelShape) -> SparseAutoencoder:
        sae = self.saes.get(name)
        if sae is None:
            for file, reason in self.errors.items():
                if Path(file).stem == name or file == name:
                    raise KeyError(f"SAE {name!r} failed to load ({file}: {reason})")
            known = ", ".join(self.names()[:20]) or "none are registered"
            raise KeyError(f"unknown SAE {name!r} (registered: {known})")
        problem = sae.fits(shape)
        if problem is not None:
            raise ValueError(f"SAE {name!r} {problem}")
        return sae
