"""The one place that knows model architectures: where each steering site lives in a vLLM model.

Sites are found by structure, on the loaded model, the same way for every family:

    decoder layers   `model.model.layers`, a ModuleList whose layers take `positions`,
                     `hidden_states` and `residual` (in any order) and return a pair
    residual stream  after layer i: `hidden + residual` when the layer defers its residual add
                     into the next fused add-norm (Llama, Qwen, Mistral, Phi-3, Gemma 2/3,
                     GPT-OSS, Llama 4, the MoE families), or `hidden` itself when it returns
                     `(stream, None)` (Gemma 4)
    attention heads  the layer child holding an `o_proj` and a vLLM `Attention` kernel module
                     (`self_attn` in most families, `attn` in GPT-OSS); the per-head output is
                     o_proj's input, the query is what the kernel receives (after q/k norms,
                     rotary and Llama 4's temperature). Layers without one (linear-attention
                     layers of hybrid models) have no heads: head specs there are refused at
                     validation (spec.ModelShape.attention_layers)
    stream before    the input of the norm that opens the MLP half: `pre_feedforward_layernorm`
    the MLP          where the layer has one (Gemma), else `post_attention_layernorm`; a fused
                     add-norm returns `(normed, stream)`, a plain one takes the stream
    experts          `mlp.experts` (vLLM's MoERunner) and its router (`gate` or `router`,
                     whose output is the router logits); none in dense layers
    logit lens       the final norm `model.model.norm`, then the model's own `compute_logits`
                     (tied or not, Gemma's final soft-capping included), as decoding.py reads
                     them

Which architectures are served steered is a verified list: each family in it is checked
against the oracle (`tests/test_families.py`); any other architecture is refused at start-up
with the reason, or served plain when the user switches steering off.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

from torch import nn

# Each is built as a tiny random model at test time and checked against steering/reference.py.
VERIFIED_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "MixtralForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Gemma4ForCausalLM",
        "Phi3ForCausalLM",
        "GptOssForCausalLM",
        "Llama4ForCausalLM",
    }
)

# Mapped, but not verified here, each for the reason given: refused like an unknown one
# (docs/architectures.md).
MAPPED_NOT_VERIFIED = {
    "Qwen3_5ForCausalLM": "vLLM 0.32.0's Qwen3.5 module imports torchvision (through "
    "transformers' Qwen2-VL image processor), which the CPU build cannot install beside torch "
    "2.13, so its engine path is unverified; its map (3 linear-attention layers per "
    "full-attention layer: no heads there) and the reference are checked",
    "Olmo2ForCausalLM": "vLLM 0.32.0 runs OLMo 2 through its Transformers modeling backend "
    "(HF decoder layers inside vLLM), which does not have vLLM's decoder-layer protocol; "
    "steering that backend is not built yet",
}


log = logging.getLogger(__name__)

LAYER_INPUTS = frozenset({"positions", "hidden_states", "residual"})


class UnsupportedModelError(RuntimeError):
    pass


def refusal(architecture: str) -> str | None:
    """Why `architecture` may not be steered, or None when it is verified."""
    if architecture in VERIFIED_ARCHITECTURES:
        return None
    why = MAPPED_NOT_VERIFIED.get(architecture, "it has not been checked against the oracle")
    return (
        f"steerserve: {architecture} is not among the verified architectures ({why}); "
        "steering it could silently differ from the reference. Serve it plain with "
        'STEERSERVE_DISABLE=1 or additional_config={"steerserve": {"enabled": false}}. '
        f"Verified: {', '.join(sorted(VERIFIED_ARCHITECTURES))}"
    )


def refuse_unverified(vllm_config) -> None:
    """Raise UnsupportedModelError for a steered engine of an unverified architecture; a
    mapped one (MAPPED_NOT_VERIFIED) is steered with a warning when the user allows it."""
    from steering.engine.config import SteeringConfig

    archs = getattr(vllm_config.model_config.hf_config, "architectures", None) or ["(none)"]
    why = refusal(archs[0])
    if why is None:
        return
    if archs[0] in MAPPED_NOT_VERIFIED and SteeringConfig.from_vllm(vllm_config).allow_unverified:
        log.warning("%s (steering anyway: allow_unverified is set)", why)
        return
    raise UnsupportedModelError(why)


@dataclass(frozen=True)
class LayerSites:
    """One decoder layer's steering sites (None where the layer has no such site)."""

    index: int
    layer: nn.Module
    kernel: nn.Module | None  # the attention kernel module: its query input
    o_proj: nn.Module | None  # its input is the per-head attention output [T, H_local * D]
    mid_norm: nn.Module | None  # opens the MLP half; its (first) input or out[1] is the stream
    experts: nn.Module | None  # vLLM's MoERunner of a sparse layer
    router: nn.Module | None  # its gate: the router logits [T, experts] are its output

    @property
    def has_heads(self) -> bool:
        return self.kernel is not None and self.o_proj is not None


@dataclass(frozen=True)
class ArchitectureMap:
    layers: list[LayerSites]  # this rank's real layers (pipeline stages hold a slice)


def _attention_kernel_type() -> type:
    from vllm.model_executor.layers.attention import Attention

    return Attention


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a vLLM causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__}: no `model.layers` ModuleList of decoder layers"
        )
    return layers


def check_layer_protocol(layer: nn.Module) -> None:
    """The layer takes positions, hidden_states and residual (any order) and returns a pair:
    vLLM's own decoder layers. HF modules run by vLLM's Transformers backend do not."""
    params = set(list(inspect.signature(type(layer).forward).parameters)[1:])
    if not params >= LAYER_INPUTS:
        raise UnsupportedModelError(
            f"{type(layer).__name__}.forward{tuple(sorted(params))}: expected vLLM's decoder "
            "layer protocol (positions, hidden_states, residual) -> (hidden, residual); "
            "models run through vLLM's Transformers backend are not supported"
        )


def _attention_of(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(kernel, o_proj) of the layer's attention block, or (None, None) when it has none."""
    kernel_type = _attention_kernel_type()
    for child in layer.children():
        o_proj = getattr(child, "o_proj", None)
        if not isinstance(o_proj, nn.Module):
            continue
        kernels = [m for m in child.children() if isinstance(m, kernel_type)]
        if len(kernels) == 1:
            return kernels[0], o_proj
    return None, None


def _mid_norm_of(layer: nn.Module) -> nn.Module | None:
    for name in ("pre_feedforward_layernorm", "post_attention_layernorm"):
        norm = getattr(layer, name, None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def _experts_of(layer: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(MoERunner, router) of a sparse layer's MoE block, or (None, None)."""
    from vllm.model_executor.layers.fused_moe import MoERunner

    for name in ("mlp", "feed_forward", "block_sparse_moe"):
        block = getattr(layer, name, None)
        experts = getattr(block, "experts", None)
        if isinstance(experts, MoERunner):
            routers = [getattr(block, r, None) for r in ("gate", "router")]
            routers = [r for r in routers if isinstance(r, nn.Module)]
            if len(routers) != 1:
                raise UnsupportedModelError(
                    f"{type(block).__name__}: expected one router (`gate` or `router`) beside "
                    "its experts"
                )
            return experts, routers[0]
    return None, None


def map_model(model: nn.Module) -> ArchitectureMap:
    """Find every steering site of this rank's layers; raise UnsupportedModelError if the
    model does not have the structure steering relies on."""
    layers = decoder_layers(model)
    real = [(i, m) for i, m in enumerate(layers) if type(m).__name__ != "PPMissingLayer"]
    if not real:
        raise UnsupportedModelError("no decoder layers on this rank")
    sites = []
    for i, layer in real:
        check_layer_protocol(layer)
        kernel, o_proj = _attention_of(layer)
        experts, router = _experts_of(layer)
        sites.append(LayerSites(i, layer, kernel, o_proj, _mid_norm_of(layer), experts, router))
    return ArchitectureMap(sites)


def check_against_shape(amap: ArchitectureMap, shape) -> None:
    """The map found on the model must agree with what validation was told (ModelShape, from
    the HF config): a head spec accepted for a layer without heads would steer nothing."""
    for s in amap.layers:
        want = shape.has_heads(s.index)
        if s.has_heads != want:
            raise UnsupportedModelError(
                f"layer {s.index} ({type(s.layer).__name__}): the config says it "
                f"{'has' if want else 'has no'} attention heads, the model "
                f"{'has' if s.has_heads else 'has no'} attention kernel with an o_proj"
            )
        experts = 0 if s.experts is None else int(s.experts.moe_config.num_experts)
        if experts != shape.experts_of(s.index):
            raise UnsupportedModelError(
                f"layer {s.index}: {experts} experts in the model, "
                f"{shape.experts_of(s.index)} in the config"
            )


def check_heads(sites: LayerSites, num_heads: int, head_dim: int, heads: range) -> None:
    """The layer's kernel and o_proj see this rank's heads as the tables do."""
    kernel, o_proj = sites.kernel, sites.o_proj
    checks = {
        "attn (num_heads, head_size)": (
            (kernel.num_heads, kernel.head_size),
            (num_heads, head_dim),
        ),
        "o_proj input width": (o_proj.input_size_per_partition, num_heads * head_dim),
    }
    wrong = {name: seen for name, (seen, want) in checks.items() if seen != want}
    if wrong:
        raise UnsupportedModelError(
            f"layer {sites.index}: {wrong} on this rank; expected {num_heads} heads x {head_dim} "
            f"(heads {heads.start}..{heads.stop - 1} of the model)"
        )
