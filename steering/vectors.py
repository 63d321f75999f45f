"""Steering-vector files: our safetensors format, llama.cpp/repeng GGUF, and a directory registry.

Our file: safetensors with one 1-D float32 tensor per layer named `layer.<i>` (i = the layer
whose *output* the vector applies to: docs/design.md#layer-convention) and string
metadata (format, architecture, hidden_size, num_layers, method, description, site).

`site` says where a vector applies: "residual" (the residual stream after layer i; each
tensor has hidden_size floats) or "heads" (the attention output of layer i, the input of
o_proj; each tensor has num_heads * head_dim floats, and `hidden_size` is that width, with
`num_heads`/`head_dim` in the metadata so that a model with another head split is refused).

GGUF control vectors (llama.cpp `--control-vector`, repeng `export_gguf`) use arch
`controlvector`, tensors `direction.<i>` with the same layer convention, and the keys
`controlvector.model_hint` / `controlvector.layer_count`. llama.cpp rejects `direction.0`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steering.spec import ModelShape

log = logging.getLogger(__name__)

FORMAT = "steerserve.vector.v1"
_LAYER_KEY = re.compile(r"^layer\.(\d+)$")
_GGUF_KEY = re.compile(r"^direction\.([0-9]+)$")  # ASCII digits, as llama.cpp
SUFFIXES = (".safetensors", ".gguf")  # our format, llama.cpp/repeng control vectors
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
SITES = ("residual", "heads")


class VectorFileError(ValueError):
    """A vector file that cannot be used; the message names the file and the reason."""


@dataclass
class SteeringVector:
    """Per-layer directions plus what they were made for."""

    directions: dict[int, np.ndarray]
    hidden_size: int  # the length of each layer's vector (o_proj input width at site heads)
    architecture: str | None = None
    num_layers: int | None = None
    method: str | None = None
    description: str | None = None
    site: str = "residual"
    num_heads: int | None = None  # site "heads" only
    head_dim: int | None = None  # site "heads" only
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directions = {
            int(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in self.directions.items()
        }
        self.check()

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    def check(self) -> None:
        if self.site not in SITES:
            raise VectorFileError(f"site {self.site!r} is not one of {SITES}")
        if self.site == "heads":
            if self.num_heads is None or self.head_dim is None:
                raise VectorFileError("a site 'heads' vector needs num_heads and head_dim")
            if self.num_heads * self.head_dim != self.hidden_size:
                raise VectorFileError(
                    f"num_heads * head_dim = {self.num_heads} * {self.head_dim} is not its "
                    f"length {self.hidden_size}"
                )
        elif self.num_heads is not None or self.head_dim is not None:
            raise VectorFileError("num_heads/head_dim belong to site 'heads' vectors only")
        if not self.directions:
            raise VectorFileError("holds no layers")
        for layer, vec in self.directions.items():
            if layer < 0:
                raise VectorFileError(f"layer {layer} is negative")
            if self.num_layers is not None and layer >= self.num_layers:
                raise VectorFileError(
                    f"layer {layer} is out of range for num_layers={self.num_layers}"
                )
            if vec.ndim != 1 or vec.shape[0] != self.hidden_size:
                raise VectorFileError(
                    f"layer {layer} has shape {tuple(vec.shape)}, expected ({self.hidden_size},)"
                )
            if not np.all(np.isfinite(vec)):
                raise VectorFileError(f"layer {layer} holds NaN or Inf")

    def metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "hidden_size": str(self.hidden_size), "site": self.site}
        for key in ("architecture", "num_layers", "method", "description", "num_heads", "head_dim"):
            value = getattr(self, key)
            if value is not None:
                meta[key] = str(value)
        meta.update(self.extra)
        return meta

    def fits(self, shape: ModelShape, site: str = "residual") -> str | None:
        """Why this vector cannot be used at `site` of a model of `shape`, or None."""
        if self.site != site:
            return f"is a site {self.site!r} vector, the entry asks for site {site!r}"
        if site == "heads" and (self.num_heads, self.head_dim) != (shape.num_heads, shape.head_dim):
            return (
                f"was made for {self.num_heads} heads x {self.head_dim} dims, the model has "
                f"{shape.num_heads} x {shape.head_dim}"
            )
        if self.hidden_size != shape.hidden_size and site == "residual":
            return f"was made for hidden size {self.hidden_size}, the model has {shape.hidden_size}"
        too_deep = [layer for layer in self.layers if layer >= shape.num_layers]
        if too_deep:
            return f"has layer(s) {too_deep}, the model has {shape.num_layers} layers"
        return None


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a vector file is for every reader
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_vector(vector: SteeringVector, path: str | Path) -> Path:
    """Write our safetensors format atomically (a reader never sees a half-written file)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {f"layer.{layer}": vector.directions[layer] for layer in vector.layers}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=vector.metadata()))
    return path


def load_vector(path: str | Path) -> SteeringVector:
    """Read our safetensors format; raises VectorFileError naming the reason."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises several types for a corrupt header
        raise VectorFileError(f"{path.name}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise VectorFileError(f"{path.name}: metadata 'format' is not {FORMAT!r}")
    directions = {}
    for key, arr in tensors.items():
        m = _LAYER_KEY.match(key)
        if not m:
            raise VectorFileError(f"{path.name}: unexpected tensor {key!r} (want 'layer.<i>')")
        directions[int(m.group(1))] = arr
    known = {"format", "hidden_size", "architecture", "num_layers", "method", "description", "site"}
    known |= {"num_heads", "head_dim"}

    def opt_int(key: str) -> int | None:
        return int(meta[key]) if key in meta else None

    try:
        return SteeringVector(
            directions=directions,
            hidden_size=int(meta["hidden_size"]),
            architecture=meta.get("architecture"),
            num_layers=opt_int("num_layers"),
            method=meta.get("method"),
            description=meta.get("description"),
            site=meta.get("site", "residual"),
            num_heads=opt_int("num_heads"),
            head_dim=opt_int("head_dim"),
            extra={k: v for k, v in meta.items() if k not in known},
        )
    except (KeyError, ValueError) as e:
        raise VectorFileError(f"{path.name}: {e}") from e


def export_gguf(vector: SteeringVector, path: str | Path, model_hint: str | None = None) -> Path:
    """Write a llama.cpp/repeng control vector (arch `controlvector`, tensors `direction.<i>`)."""
    import gguf

    if vector.site != "residual":
        raise VectorFileError(
            f"a site {vector.site!r} vector cannot be exported: GGUF control vectors "
            "(llama.cpp, repeng) act on the residual stream"
        )
    if 0 in vector.directions:
        raise VectorFileError(
            "layer 0 cannot be exported: llama.cpp rejects 'direction.0' control vectors"
        )
    path = Path(path)
    hint = model_hint or vector.architecture or "unknown"

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", hint)
        writer.add_uint32("controlvector.layer_count", len(vector.directions))
        for layer in vector.layers:
            writer.add_tensor(f"direction.{layer}", vector.directions[layer])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    _atomic_write(path, write)
    return path


def import_gguf(path: str | Path) -> SteeringVector:
    """Read a llama.cpp/repeng control vector; raises VectorFileError naming the reason.

    As strict as llama.cpp's loader (common.cpp, llama_control_vector_load_one): only
    `direction.<i>` tensors, F32, 1-D, one length. Stricter where llama.cpp or repeng would
    quietly pick a meaning: two tensors naming one layer ("direction.01", "direction.1";
    llama.cpp adds them, repeng keeps the last) are refused. `direction.0` is read as layer 0's
    output, as repeng writes it; only llama.cpp cannot load it, so export_gguf refuses it.
    """
    import gguf

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise VectorFileError(f"{path.name}: cannot be read ({e.strerror})") from e
    if magic != b"GGUF":  # the magic is these 4 bytes in either byte order
        if not magic:
            raise VectorFileError(f"{path.name}: is empty, not a GGUF file")
        if b"GGUF".startswith(magic):
            raise VectorFileError(f"{path.name}: truncated GGUF file ({len(magic)} bytes)")
        raise VectorFileError(f"{path.name}: not a GGUF file (it does not start with b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a cut-off file fails with ValueError, IndexError, ... from numpy
        raise VectorFileError(f"{path.name}: truncated or corrupt GGUF file ({e})") from e
    arch = _gguf_string(path, reader, "general.architecture")
    if arch != "controlvector":
        raise VectorFileError(f"{path.name}: GGUF architecture is {arch!r}, not 'controlvector'")
    hint = _gguf_string(path, reader, "controlvector.model_hint")
    directions: dict[int, np.ndarray] = {}
    names: dict[int, str] = {}
    for tensor in reader.tensors:
        name = tensor.name
        m = _GGUF_KEY.match(name)
        if not m:
            raise VectorFileError(
                f"{path.name}: unexpected tensor {name[:64]!r} (want 'direction.<i>')"
            )
        if len(m.group(1)) > 9:  # no model has that many layers; int() of 4300+ digits raises
            raise VectorFileError(f"{path.name}: {name[:24]}... names no layer of any model")
        layer = int(m.group(1))
        if layer in names:
            raise VectorFileError(
                f"{path.name}: tensors {names[layer]!r} and {name!r} both name layer {layer}"
            )
        names[layer] = name
        # llama.cpp loads F32 only; converting F16 (exact) or dequantizing would accept a
        # file llama.cpp refuses, and a quantized direction is not the vector that was made.
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise VectorFileError(
                f"{path.name}: {name} is {tensor.tensor_type.name}, not F32 "
                "(llama.cpp control vectors are F32)"
            )
        # GGML order, ne[0] the row length. Like llama.cpp (ggml_n_dims), [H, 1, ...] (numpy
        # (1, H)) is H values; flattening any other shape would give a wrong-length vector.
        ne = [int(n) for n in tensor.shape]
        if not ne or any(n != 1 for n in ne[1:]):
            shape = tuple(reversed(ne))
            raise VectorFileError(f"{path.name}: {name} has shape {shape}, a direction is 1-D")
        if ne[0] == 0:
            raise VectorFileError(f"{path.name}: {name} holds no values")
        vec = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vec)):
            raise VectorFileError(f"{path.name}: {name} (layer {layer}) holds NaN or Inf")
        directions[layer] = vec
    if not directions:
        raise VectorFileError(f"{path.name}: holds no direction.<i> tensors")
    by_size: dict[int, list[str]] = {}
    for layer in sorted(directions):
        by_size.setdefault(directions[layer].shape[0], []).append(names[layer])
    if len(by_size) != 1:
        listed = "; ".join(f"{n} in {', '.join(ts)}" for n, ts in sorted(by_size.items()))
        raise VectorFileError(f"{path.name}: directions have different lengths ({listed})")
    try:
        return SteeringVector(
            directions=directions,
            hidden_size=next(iter(by_size)),
            architecture=hint,
            method="gguf-import",
        )
    except VectorFileError as e:
        raise VectorFileError(f"{path.name}: {e}") from e


def _gguf_string(path: Path, reader, key: str) -> str | None:
    """The string value of `key`, None if absent; another type or bad UTF-8 is refused
    (reading its bytes as text would invent an architecture or model hint)."""
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    if f.types != [gguf.GGUFValueType.STRING]:
        kind = "/".join(t.name for t in f.types) or "empty"
        raise VectorFileError(f"{path.name}: GGUF key {key!r} is {kind}, not a string")
    try:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise VectorFileError(f"{path.name}: GGUF key {key!r} is not valid UTF-8") from e


def read_any(path: str | Path) -> SteeringVector:
    path = Path(path)
    if path.suffix == ".gguf":
        return import_gguf(path)
    if path.suffix == ".safetensors":
        return load_vector(path)
    raise VectorFileError(f"{path.name}: unknown extension (want .safetensors or .gguf)")


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def parse_upload(name: str, data: bytes) -> tuple[SteeringVector, str]:
    """A vector file sent as bytes (GGUF by its magic, else our safetensors format):
    the vector and the suffix it is stored under. Raises VectorFileError naming the reason."""
    suffix = ".gguf" if data[:4] == b"GGUF" else ".safetensors"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{name}{suffix}"
        path.write_bytes(data)
        return read_any(path), suffix


class VectorRegistry:
    """Named vectors from a directory (`<name>.safetensors` or `<name>.gguf`).

    Every file is validated at load; a bad file is reported in `errors` by name and does
    not stop the others from loading.
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.vectors: dict[str, SteeringVector] = {}
        self.errors: dict[str, str] = {}
        if self.directory is not None:
            self.reload()

    def reload(self) -> None:
        self.vectors, self.errors = {}, {}
        if self.directory is None or not self.directory.is_dir():
            return
        sources: dict[str, str] = {}
        for path in sorted(self.directory.iterdir()):
            if path.suffix not in SUFFIXES or path.name.startswith("."):
                continue
            name = path.stem
            if not _NAME.match(name):
                self.errors[path.name] = f"file name {name!r} is not a valid vector name"
            elif name in sources:
                self.errors[path.name] = f"name {name!r} is already provided by {sources[name]}"
            else:
                try:
                    self.vectors[name] = read_any(path)
                    sources[name] = path.name
                except VectorFileError as e:
                    self.errors[path.name] = str(e)
        for file, reason in self.errors.items():
            log.error("steering vector file %s skipped: %s", file, reason)

    def add(self, name: str, vector: SteeringVector) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{name!r} is not a valid vector name")
        self.vectors[name] = vector

    def _files(self, name: str) -> list[Path]:
        assert self.directory is not None
        return [self.directory / f"{name}{s}" for s in SUFFIXES]

    def store(self, name: str, data: bytes, shape: ModelShape) -> tuple[SteeringVector, bool]:
        """Validate an uploaded file against the model, write it atomically as the file of
        `name` (replacing one of the other format) and serve it from now on. Returns the
        vector and whether it replaced one. Raises ValueError naming the reason."""
        if self.directory is None:
            raise ValueError("the server has no vectors directory to store vectors in")
        if not valid_name(name):
            raise ValueError(f"{name!r} is not a valid vector name ({_NAME.pattern})")
        vector, suffix = parse_upload(name, data)
        problem = vector.fits(shape, vector.site)
        if problem is not None:
            raise ValueError(f"vector {name!r} {problem}")
        path = self.directory / f"{name}{suffix}"
        _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
        for other in self._files(name):
            if other != path:
                other.unlink(missing_ok=True)
        replaced = name in self.vectors
        self.vectors[name] = vector
        for f in self._files(name):
            self.errors.pop(f.name, None)
        return vector, replaced

    def delete(self, name: str) -> None:
        """Remove `name`'s file and stop serving it (KeyError if there is neither)."""
        files = [f for f in self._files(name) if f.exists()] if self.directory else []
        if name not in self.vectors and not files:
            raise KeyError(name)
        for f in files:
            f.unlink()
            self.errors.pop(f.name, None)
        self.vectors.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.vectors)

    def __contains__(self, name: object) -> bool:
        return name in self.vectors

    def get(self, name: str) -> SteeringVector:
        return self.vectors[name]

    def lookup(
        self, name: str, shape: ModelShape, site: str = "residual"
    ) -> Mapping[int, np.ndarray]:
        vector = self.vectors.get(name)
        if vector is None:
            for file, reason in self.errors.items():
                if Path(file).stem == name:
                    raise KeyError(f"vector {name!r} failed to load ({file}: {reason})")
            known = ", ".join(self.names()[:20]) or "none are registered"
            raise KeyError(f"unknown vector {name!r} (registered: {known})")
        reason = vector.fits(shape, site)
        if reason is not None:
            raise ValueError(f"vector {name!r} {reason}")
        return vector.directions
