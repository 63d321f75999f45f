"""Tiny random-weight checkpoints (Llama, Qwen2, Qwen3) built locally, for tests and examples.

Nothing is fetched from a hub: the BPE tokenizer is trained in-process on a generated corpus
and the weights are drawn from a seeded generator, so a build is reproducible bit for bit.
`head_dim` is 64 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Every other family steerserve verifies (tests/test_families.py), each with its own
# features switched on at the Llama test model's size.
FAMILIES = (
    "llama3",
    "mistral",
    "qwen3_moe",
    "mixtral",
    "gemma2",
    "gemma3",
    "gemma4",
    "phi3",
    "olmo2",
    "gpt_oss",
    "qwen3_5",
    "llama4",
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (  # noqa: SIM905 (a paragraph reads better than a 70-line list)
    "the a one every some cat dog bird fish tree river stone cloud city road house light "
    "happy sad calm angry bright dark quick slow big small red blue green old new warm cold "
    "runs sees finds makes takes gives likes wants knows holds reads writes sings walks "
    "and but or so because when while if then after before under over near with without "
    "we they you it he she this that these those here there now today tomorrow always never"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny checkpoint. Defaults keep a vLLM CPU engine start cheap."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    # GQA with o_proj input wider than the residual (4 x 64 = 256 > 128): head-site
    # code that confuses the two widths fails on these models.
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 256
    vocab_size: int = 512
    max_position_embeddings: int = 1024
    # Embedding rows beyond the tokenizer's (benchmarks want a realistic 32k-row lm_head).
    model_vocab_size: int | None = None
    # MoE families (qwen3_moe, mixtral, gpt_oss, llama4): routed experts, top-k, expert width.
    num_experts: int = 4
    experts_per_token: int = 2
    moe_intermediate_size: int = 64
    seed: int = 0
    # Wider than HF's 0.02 so that logits are peaked: greedy choices then do not hinge on
    # near-ties, which keeps token-level comparisons between implementations meaningful.
    initializer_range: float = 0.08

    @property
    def slug(self) -> str:
        """A directory name for a cached build of this shape."""
        return f"{self.arch}-h{self.hidden_size}-l{self.num_layers}-v{self.model_vocab_size or 0}"


# The ~100M-parameter random model of the performance protocol (docs/design.md) (134M with lm_head).
BENCH_SPEC = TinySpec(
    arch="llama",
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    intermediate_size=2048,
    model_vocab_size=32000,
    max_position_embeddings=2048,
    initializer_range=0.02,
)


# The ~100M-parameter MoE benchmark model (issue 19): Qwen3-MoE layout, 8 experts, top-2,
# every layer sparse but the last; 108M parameters with lm_head.
BENCH_MOE_SPEC = TinySpec(
    arch="qwen3_moe",
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    intermediate_size=2048,
    num_experts=8,
    experts_per_token=2,
    moe_intermediate_size=768,
    model_vocab_size=32000,
    max_position_embeddings=2048,
    initializer_range=0.02,
)


def tiny_spec(arch: str) -> TinySpec:
    """The test model of `arch`: Qwen2 keeps o_proj input as wide as the residual."""
    if arch == "qwen2":
        return TinySpec(arch=arch, num_heads=2, num_kv_heads=1)
    return TinySpec(arch=arch)


def _corpus(seed: int, n: int = 4000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(n)]


def build_tokenizer(out_dir: Path, vocab_size: int, seed: int):
    """Train a byte-level BPE tokenizer in-process and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def _llama3_rope() -> dict:
    # Llama 3.x's frequency-dependent rope scaling, with a short original context so that
    # the scaled band covers the test prompts' positions.
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }


def _family_config(spec: TinySpec, common: dict):
    """The HF config of one family: its own features on, sized like the Llama test model."""
    import transformers as hf

    moe = dict(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token)
    arch = spec.arch
    if arch == "llama3":
        return hf.LlamaConfig(head_dim=spec.head_dim, rope_parameters=_llama3_rope(), **common)
    if arch == "mistral":
        return hf.MistralConfig(head_dim=spec.head_dim, sliding_window=None, **common)
    if arch == "qwen3_moe":
        # Every layer sparse but the last (mlp_only_layers): both MLP kinds in one model.
        return hf.Qwen3MoeConfig(
            head_dim=spec.head_dim,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.moe_intermediate_size,
            norm_topk_prob=True,
            mlp_only_layers=[spec.num_layers - 1],
            **common,
        )
    if arch == "mixtral":
        return hf.MixtralConfig(head_dim=spec.head_dim, sliding_window=None, **moe, **common)
    if arch == "gemma2":
        # Sliding/global alternation, soft-capped attention and final logits, tied scaled
        # embeddings, (1 + w) norms around both sublayers.
        return hf.Gemma2Config(
            head_dim=spec.head_dim,
            query_pre_attn_scalar=spec.head_dim,
            sliding_window=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            **common,
        )
    if arch == "gemma3":
        return hf.Gemma3TextConfig(
            head_dim=spec.head_dim,
            query_pre_attn_scalar=spec.head_dim,
            sliding_window=16,
            sliding_window_pattern=2,
            final_logit_softcapping=None,
            **common,
        )
    if arch == "gemma4":
        return hf.Gemma4TextConfig(
            head_dim=spec.head_dim,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * (spec.num_layers // 2),
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=0,
            per_layer_config={},
            **common,
        )
    if arch == "phi3":
        return hf.Phi3Config(**dict(common, num_attention_heads=2, num_key_value_heads=2))
    if arch == "olmo2":
        return hf.Olmo2Config(**common)
    if arch == "gpt_oss":
        # vLLM's GPT-OSS hard-codes the released models' norm eps (1e-5) whatever the
        # config says.
        layers = ["sliding_attention", "full_attention"] * (spec.num_layers // 2)
        return hf.GptOssConfig(
            head_dim=spec.head_dim,
            sliding_window=16,
            **moe,
            layer_types=layers,
            **dict(common, rms_norm_eps=1e-5),
        )
    if arch == "qwen3_5":
        # Hybrid: three linear-attention (Gated DeltaNet) layers per full-attention layer.
        return hf.Qwen3_5TextConfig(
            head_dim=spec.head_dim,
            linear_key_head_dim=32,
            linear_value_head_dim=32,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            layer_types=["linear_attention"] * 3 + ["full_attention"],
            **common,
        )
    if arch == "llama4":
        return hf.Llama4TextConfig(
            head_dim=spec.head_dim,
            intermediate_size_mlp=256,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=4,
            attention_chunk_size=128,
            **common,
        )
    return None


def _config(spec: TinySpec, tokenizer):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=max(spec.model_vocab_size or 0, len(tokenizer)),
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-6,
        dtype="float32",
    )
    if spec.arch == "llama":
        return LlamaConfig(head_dim=spec.head_dim, **common)
    if spec.arch == "qwen2":
        if spec.num_heads * spec.head_dim != spec.hidden_size:
            # vLLM's Qwen2 derives head_dim from hidden_size and ignores the config's.
            raise ValueError("qwen2 needs num_heads * head_dim == hidden_size")
        # Tied embeddings and qkv bias: the Qwen2 features the other two lack.
        return Qwen2Config(tie_word_embeddings=True, **common)
    if spec.arch == "qwen3":
        return Qwen3Config(head_dim=spec.head_dim, **common)
    config = _family_config(spec, common)
    if config is None:
        raise ValueError(
            f"unknown tiny architecture {spec.arch!r}; expected one of {ARCHITECTURES + FAMILIES}"
        )
    return config


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny checkpoint (config, float32 safetensors, tokenizer, chat template).

    Idempotent: an existing complete build with the same spec is reused.
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = spec or TinySpec()
    out = Path(out_dir)
    stamp = out / "steerserve_tiny.json"
    wanted = json.dumps(spec.__dict__, sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, spec.vocab_size, spec.seed)
    config = _config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb_norms(model, spec.seed)
    model.save_pretrained(out, safe_serialization=True)
    stamp.write_text(wanted)
    return out


def _perturb_norms(model, seed: int) -> None:
    """Give RMSNorm weights non-unit values so a bug that skips a norm cannot go unnoticed."""
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
