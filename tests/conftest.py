"""Shared fixtures: tiny models, a vectors directory, and vLLM engines built once per session.

Engines run in-process (no engine-core subprocess) so that several small ones can be kept
alive side by side on a 2-core machine; the V1 model runner is pinned as docs/design.md says.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from steering.tiny_models import ARCHITECTURES, TinySpec, build_tiny_model, tiny_spec  # noqa: E402

HIDDEN = TinySpec().hidden_size
NUM_LAYERS = TinySpec().num_layers
# Engines: small batches of tokens so that a few hundred prompt tokens are chunked, small
# blocks so that prefix-cache hits happen on short prompts.
MAX_BATCHED_TOKENS = 64
BLOCK_SIZE = 32
ENGINE_KW = dict(
    dtype="float32",
    kv_cache_memory_bytes=48 << 20,
    max_model_len=1024,
    max_num_seqs=16,
    max_num_batched_tokens=MAX_BATCHED_TOKENS,
    block_size=BLOCK_SIZE,
    enable_prefix_caching=True,
    seed=0,
    disable_log_stats=False,
)


def random_vector(seed: int, norm: float = 8.0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)
    return (v * (norm / np.linalg.norm(v))).astype(np.float32)


def prompt_ids(seed: int, length: int) -> list[int]:
    # Ordinary BPE tokens only (the first ids are the special tokens).
    return np.random.default_rng(1000 + seed).integers(10, 500, size=length).tolist()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    dirs = {a: build_tiny_model(root / a, tiny_spec(a)) for a in ARCHITECTURES}
    # Deeper model for layer-reading decoding: "auto" and the DoLa buckets get a real choice.
    dirs["llama8"] = build_tiny_model(root / "llama8", TinySpec(arch="llama", num_layers=8))
    return dirs


@pytest.fixture(scope="session")
def vectors_dir(tmp_path_factory) -> Path:
    """Registry directory shared by all engines: our format, a GGUF, and a broken file."""
    from steering.vectors import SteeringVector, save_vector

    d = tmp_path_factory.mktemp("vectors")
    save_vector(
        SteeringVector(
            directions={1: random_vector(1), 2: random_vector(2)},
            hidden_size=HIDDEN,
            architecture="LlamaForCausalLM",
            num_layers=NUM_LAYERS,
            method="random",
            description="test vector",
        ),
        d / "happy.safetensors",
    )
    write_llamacpp_gguf(d / "happy_gguf.gguf", {1: random_vector(1), 2: random_vector(2)})
    # A head-site vector for the Llama test model (o_proj input: 4 heads x 64).
    rng = np.random.default_rng(5)
    save_vector(
        SteeringVector(
            directions={i: rng.standard_normal(256).astype(np.float32) for i in (1, 3)},
            hidden_size=256,
            site="heads",
            num_heads=4,
            head_dim=64,
            method="random",
        ),
        d / "iti_heads.safetensors",
    )
    (d / "broken.safetensors").write_bytes(b"this is not a safetensors file")
    return d


def write_llamacpp_gguf(path: Path, directions: dict[int, np.ndarray]) -> None:
    """A control vector written the way llama.cpp's cvector tools and repeng do it."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vec in directions.items():
        writer.add_tensor(f"direction.{layer}", vec)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@dataclass
class Run:
    tokens: list[int]
    logprobs: list[float]
    prompt_logprobs: list[float] | None
    num_cached_tokens: int


FEATURES = {
    "max_features": 3,
    "readout": True,
    "topk_sae": "sparsify.layers.1",
    "max_topk": 24,
    "max_dynamic": 2,
    "max_conditions": 2,
}


class Engines:
    """Lazily started engines, keyed by (architecture, variant); one of each per session."""

    VARIANTS = {
        "eager": dict(enforce_eager=True),
        "disabled": dict(enforce_eager=True, additional_config={"steerserve": {"enabled": False}}),
        "noheads": dict(
            enforce_eager=True,
            additional_config={"steerserve": {"heads": False, "decoding": False}},
        ),
        "compiled": dict(enforce_eager=False),
        "disabled-compiled": dict(
            enforce_eager=False, additional_config={"steerserve": {"enabled": False}}
        ),
        # What real serving uses: bfloat16, steered and plain.
        "bf16": dict(enforce_eager=True, dtype="bfloat16"),
        "bf16-disabled": dict(
            enforce_eager=True,
            dtype="bfloat16",
            additional_config={"steerserve": {"enabled": False}},
        ),
        # vLLM keeps only the newest engine's metrics in the Prometheus registry, so a test
        # that reads counters gets an engine of its own, started right before it reads.
        "metrics": dict(enforce_eager=True),
        "readout": dict(enforce_eager=True, additional_config={"steerserve": {"readout": True}}),
        "readout-compiled": dict(
            enforce_eager=False, additional_config={"steerserve": {"readout": True}}
        ),
        # SAE feature clamps/scales (opt-in), with readout so feature activations are read,
        # and top-k readout on a TopK SAE (k 8 of 64 features, layer 1).
        "features": dict(enforce_eager=True, additional_config={"steerserve": FEATURES}),
        # Top-k readout alone: no projection tables (readout off).
        "topk-only": dict(
            enforce_eager=True,
            additional_config={"steerserve": {"decoding": False, "topk_sae": FEATURES["topk_sae"]}},
        ),
        "features-compiled": dict(enforce_eager=False, additional_config={"steerserve": FEATURES}),
        # Conditions and SAE ops without dynamic adds: gated adds fold into the constants.
        "conditions": dict(
            enforce_eager=True,
            additional_config={"steerserve": {"max_conditions": 2, "max_features": 3}},
        ),
        # A KV cache of 10 blocks (320 tokens): a few long requests preempt each other.
        "features-tight": dict(
            enforce_eager=True,
            kv_cache_memory_bytes=10 * BLOCK_SIZE * 4096,
            max_model_len=256,
            additional_config={"steerserve": FEATURES},
        ),
    }

    def __init__(self, model_dirs: dict[str, Path], vectors_dir: Path, saes_dir: Path):
        self.model_dirs = model_dirs
        self.vectors_dir = vectors_dir
        self.saes_dir = saes_dir
        self._engines: dict[tuple[str, str], object] = {}
        self._refs: dict[str, object] = {}

    def get(self, arch: str = "llama", variant: str = "eager"):
        key = (arch, variant)
        if key not in self._engines:
            from vllm import LLM

            kw = dict(ENGINE_KW, **self.VARIANTS[variant])
            extra = kw.pop("additional_config", {"steerserve": {}})
            # Layer-reading decoding on (it is opt-in), so that every bit-identity and
            # invariance test also covers the capture buffers.
            mine = {
                "decoding": True,
                **extra["steerserve"],
                "vectors_dir": str(self.vectors_dir),
                "saes_dir": str(self.saes_dir),
            }
            extra["steerserve"] = mine
            self._engines[key] = LLM(str(self.model_dirs[arch]), additional_config=extra, **kw)
        return self._engines[key]

    def reference(self, arch: str = "llama", dtype: str = "float32"):
        key = arch if dtype == "float32" else f"{arch}:{dtype}"
        if key not in self._refs:
            import torch

            from steering.reference import ReferenceModel

            self._refs[key] = ReferenceModel(self.model_dirs[arch], dtype=getattr(torch, dtype))
        return self._refs[key]


@pytest.fixture(scope="session")
def saes_dir(tmp_path_factory) -> Path:
    """SAEs for the tiny models (hidden 128), one per format (tests/sae_fixtures.py)."""
    from sae_fixtures import write_test_saes

    return write_test_saes(tmp_path_factory.mktemp("saes"), HIDDEN)


@pytest.fixture(scope="session")
def engines(model_dirs, vectors_dir, saes_dir) -> Engines:
    return Engines(model_dirs, vectors_dir, saes_dir)


def sampling(spec=None, max_tokens: int = 8, prompt_logprobs: bool = False, **kw):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0,
        ignore_eos=True,
        logprobs=1,
        prompt_logprobs=1 if prompt_logprobs else None,
        extra_args={"steering": spec} if spec is not None else None,
        **kw,
    )


def generate(llm, prompts: list[list[int]], params) -> list[Run]:
    """Run token-id prompts through `llm`; params is one SamplingParams or one per prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    runs = []
    for out in outs:
        o = out.outputs[0]
        lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs, strict=True)]
        plp = None
        if out.prompt_logprobs is not None:
            plp = [
                d[t].logprob
                for t, d in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True)
            ]
        runs.append(Run(list(o.token_ids), lps, plp, out.num_cached_tokens or 0))
    return runs


def generate_one(llm, prompt: list[int], params) -> Run:
    return generate(llm, [prompt], params)[0]


# The oracle's bound on |engine log-prob - reference log-prob| (float32 models).
PARITY_TOL = 1e-4


def assert_close(got, want, what: str, tol: float = PARITY_TOL) -> float:
    """Max |got - want| within `tol` (and the same shape); returns it."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= tol, f"{what}: max |engine - reference| = {err:.2e} > {tol}"
    return err


def assert_decoded_close(got, ref, first_row: int, tokens: list[int], want, what: str) -> float:
    """assert_close for the log-probs of `tokens` at rows first_row, first_row + 1, ... of
    the reference's last `logprobs` call (`want`), on a request with DoLa/LFD decoding:
    where the reference's plausibility filter had a tie (a token within float rounding of
    its threshold), the engine may have decided it the other way, and its value must then
    equal the reference's with that tie flipped (`ReferenceModel.tie_logprob`)."""
    want = [float(w) for w in want]
    for j, (g, tok) in enumerate(zip(got, tokens, strict=True)):
        flipped = ref.tie_logprob(first_row + j, tok)
        if flipped is not None and abs(g - flipped) < abs(g - want[j]):
            want[j] = flipped
    return assert_close(got, want, what)


def assert_matches_reference(run: Run, ref, prompt: list[int], spec, what: str) -> None:
    """A greedy run (sampled with prompt_logprobs) against the HF reference: the same
    tokens, and every generated and prompt row's log-prob within PARITY_TOL."""
    tokens, lps = ref.greedy(prompt, len(run.tokens), spec)
    assert run.tokens == tokens, f"{what}: greedy tokens differ"
    assert_close(run.logprobs, lps, f"{what} greedy log-probs")
    lp = ref.logprobs(prompt, len(prompt), spec)
    want = [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert_close(run.prompt_logprobs, want, f"{what} prompt log-probs")


@pytest.fixture(scope="session")
def capturer(model_dirs):
    """A capture engine on the Llama test model (prefix caching is always off there);
    max_num_batched_tokens=64 makes longer prompts span several steps."""
    from steering.capture import Capturer

    kw = {k: v for k, v in ENGINE_KW.items() if k != "enable_prefix_caching"}
    return Capturer(str(model_dirs["llama"]), enforce_eager=True, **kw)


@pytest.fixture(scope="session")
def compiled_capturer(model_dirs):
    """The same on vLLM's compiled forward. Session-scoped like every in-process engine:
    tearing one down destroys vLLM's process-wide parallel groups under the others."""
    from steering.capture import Capturer

    kw = {k: v for k, v in ENGINE_KW.items() if k != "enable_prefix_caching"}
    return Capturer(str(model_dirs["llama"]), enforce_eager=False, **kw)
