"""repeng's side of the steerserve <-> repeng interoperability test.

Runs ONLY in the separate repeng venv (see repeng_env.py; repeng 0.4.0 needs numpy<2 and
transformers<5), so it imports nothing from steerserve. It trains a control vector with
repeng on a local checkpoint, exports it as GGUF, dumps the raw directions, and records
greedy generations with and without the vector, all on token ids given by the caller.

    python repeng_side.py --model DIR --pairs PAIRS.jsonl --layers 1 2 --method pca_diff \
        --out OUTDIR --prompts PROMPTS.json [--coeff 2.0] [--max-new-tokens 8] [--batch-size 32]

PAIRS.jsonl: one {"positive": str, "negative": str} per line. PROMPTS.json: a list of token-id
lists. Writes OUTDIR/repeng.gguf, OUTDIR/directions.json ({"<layer>": [floats]}) and
OUTDIR/outputs.json.

Conventions of repeng 0.4.0, read from its installed source (line numbers as installed):

* Layer index i is `model.model.layers[i]` (control.py:200-209, `model_layer_list`); negative
  ids count from the end (extract.py:261-262, control.py:31).
* Training reads `out.hidden_states[i + 1]` for layer i >= 0 (extract.py:357-359). With
  hidden_states[0] = the embeddings (= input of layer 0), hidden_states[i + 1] is the OUTPUT of
  decoder layer i, i.e. the residual stream right where ControlModel adds the vector.
  Caveat from transformers 4.57 (utils/generic.py, check_model_inputs): the LAST entry is
  replaced by the final-norm output, so for the last layer training reads norm(output) while
  steering adds to the un-normed output. The hidden states are recorded on the inner decoder
  layer, i.e. before any control of that layer is added (a control set on an earlier layer
  does propagate into them); we train with no control set.
* Position: the last non-padding token of each string, from the attention mask
  (extract.py:347-355); the tokenizer pads (here: on the right), strings are batched
  `batch_size` at a time in order [pos0, neg0, pos1, neg1, ...] (extract.py:265).
* Direction: pca_diff fits sklearn PCA(n_components=1) on the per-pair differences
  h_pos - h_neg (extract.py:280-281, 294-296). sklearn PCA centres its input, so this is the
  top principal axis of the MEAN-CENTRED differences, not the mean difference. pca_center fits
  PCA on [h_pos - c, h_neg - c] with c the pair midpoint (extract.py:282-286). The result is
  a unit vector cast to float32. repeng 0.4.0 has no mean-difference method; "umap" needs the
  umap-learn package, which is not installed (extract.py:287-303).
* Sign: the hidden states are projected on the direction (extract.py:306, 370-374; for
  pca_center these are the centred states, since train aliases h and is modified in place);
  the direction is negated iff more pairs have proj(pos) < proj(neg) than proj(pos) >
  proj(neg) (extract.py:309-323). So after training, positive examples score higher along
  +direction for a majority of pairs; a tie keeps sklearn's sign (svd_flip: the entry of
  largest magnitude is positive, sklearn/decomposition/_pca.py:640).
* Steering: ControlModule wraps `layers[i]` (control.py:32-35) and, after the wrapped layer
  runs, adds `coeff * directions[i]` (control.py:77-79, cast to the model dtype) to the layer's
  output hidden states (output[0] if the layer returns a tuple) (control.py:149-197). It is
  added at every position of the sequence, prompt and generated tokens alike, except that
  when the layer receives `position_ids` the positions before the last position_id == 0 in
  each row are masked out (meant for left padding; control.py:172-186). For an unpadded prompt
  that mask is all ones, and decode steps (no position 0) are fully steered too. No
  normalisation by default: `normalize=True` (opt-in kwarg of set_control) rescales the sum
  to the pre-addition per-token norm (control.py:167, 188-190); `operator` defaults to `+`
  (control.py:128-130). This script uses the defaults.
* `ControlVector.train(..., **kwargs)` forwards to read_representations(hidden_layers=...,
  batch_size=..., method=...) (extract.py:243-253); the docstring's `max_batch_size` is wrong.
  It does NOT use ControlModel.layer_ids: without hidden_layers it trains layers
  -1 .. -(n-1) (extract.py:257-258), so we pass hidden_layers explicitly.
* GGUF (extract.py:121-142): architecture "controlvector", keys `controlvector.model_hint`
  (the model_type) and `controlvector.layer_count` (number of directions), one float32 tensor
  `direction.<layer>` per layer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from repeng import ControlModel, ControlVector, DatasetEntry
from repeng.control import ControlModule, model_layer_list
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast


def compat_model_dir(model_dir: Path, scratch: Path) -> tuple[Path, list[str]]:
    """A directory that transformers 4 loads as transformers 5 meant it, plus what changed.

    transformers 5 writes RoPE settings as `rope_parameters`; transformers 4 ignores that key
    and silently falls back to its default rope_theta, which would be a different model
    whenever the saved theta is not the default. Translate it into the v4 keys (`rope_theta`,
    and `rope_scaling` for a non-default rope type) in a scratch copy whose other files are
    symlinks. Every other v5 key either means the same in v4 (e.g. `dtype`, `layer_types`)
    or is kept as an inert attribute.
    """
    config = json.loads((model_dir / "config.json").read_text())
    notes: list[str] = []
    rope = config.pop("rope_parameters", None)
    if rope is None:
        return model_dir, notes
    if "rope_theta" not in rope:  # e.g. per-layer-type dicts (Gemma 3): not handled here
        raise ValueError(f"unsupported rope_parameters layout: {rope!r}")
    config.setdefault("rope_theta", rope["rope_theta"])
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    notes.append(
        f"config.json: rope_parameters {rope} -> rope_theta={config['rope_theta']}"
        + (f", rope_scaling={config['rope_scaling']}" if rope_type != "default" else "")
    )
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (scratch / item.name).symlink_to(item.resolve())
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch, notes


def _token_str(value: Any) -> str | None:
    # v5 stores special tokens as plain strings, v4 sometimes as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    """The v5-saved tokenizer, through tokenizer.json (v4 cannot read v5's tokenizer_config)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    special = {
        name: _token_str(cfg.get(name))
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if _token_str(cfg.get(name)) is not None
    }
    tok.add_special_tokens(special)  # all already in the vocab: no ids change
    if tok.pad_token is None:  # repeng pads its batches
        tok.pad_token = tok.eos_token or tok.unk_token
    # Right padding: the model forward that repeng calls gets no position_ids, so left padding
    # would shift positions; with right padding and a causal mask the last real token sees
    # exactly what it would see unpadded, and repeng picks it via the attention mask.
    tok.padding_side = "right"
    return tok


def read_pairs(path: Path) -> list[DatasetEntry]:
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            entries.append(DatasetEntry(positive=row["positive"], negative=row["negative"]))
    return entries


def patch_attention_type(control_model: ControlModel) -> int:
    """Let repeng 0.4.0's layer wrapper show the wrapped layer's `attention_type`.

    transformers 4.57's Qwen2/Qwen3 models read `decoder_layer.attention_type` to pick a mask;
    ControlModule (control.py:137-147) does not forward attribute lookups to its block, so the
    forward fails with AttributeError (vgel/repeng#64; fixed upstream for 0.5.0, which is not
    on PyPI). Copying the plain string attribute is all that fix amounts to for these models.
    """
    patched = 0
    for layer in model_layer_list(control_model):
        if isinstance(layer, ControlModule) and hasattr(layer.block, "attention_type"):
            layer.attention_type = layer.block.attention_type
            patched += 1
    return patched


@torch.inference_mode()
def record(
    control_model: ControlModel, prompt: list[int], max_new_tokens: int, pad_id: int, coeff: float
) -> dict[str, Any]:
    """Greedy tokens and their logprobs, plus the next-token top-1 after the prompt."""
    ids = torch.tensor([prompt], dtype=torch.long)
    mask = torch.ones_like(ids)
    # Plain full-sequence forward, no cache: the distribution at the last prompt position.
    last = control_model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    last_lp = torch.log_softmax(last, dim=-1)
    top1 = int(last_lp.argmax())
    out = control_model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,  # never stop early; no min_new_tokens, which would bend the scores
        pad_token_id=pad_id,
        output_logits=True,  # raw logits, before any logits processor
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = []
    for step, (tok, logits) in enumerate(zip(tokens, out.logits, strict=True)):
        lp = torch.log_softmax(logits[0].float(), dim=-1)
        # Greedy on raw logits: if a processor had changed the pick, the logprobs would lie.
        if int(lp.argmax()) != tok:
            raise RuntimeError(f"step {step}: generated {tok} but raw argmax is {int(lp.argmax())}")
        logprobs.append(float(lp[tok]))
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"generated {len(tokens)} tokens, wanted {max_new_tokens}")
    return {
        "coeff": coeff,
        "tokens": tokens,
        "logprobs": logprobs,
        "prompt_next": {"top1": top1, "logprob": float(last_lp[top1])},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--pairs", type=Path, required=True)
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--method", choices=("pca_diff", "pca_center"), default="pca_diff")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--coeff", type=float, default=2.0)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)

    # PCA(svd_solver="auto") switches to the randomized solver for large inputs
    # (max(shape) > 500) and repeng passes no random_state, so seed the global RNG it falls
    # back on; torch is seeded for good measure (nothing here samples).
    np.random.seed(0)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    prompts: list[list[int]] = json.loads(args.prompts.read_text())
    dataset = read_pairs(args.pairs)

    with tempfile.TemporaryDirectory() as scratch:
        load_dir, notes = compat_model_dir(args.model, Path(scratch))
        model = AutoModelForCausalLM.from_pretrained(load_dir, dtype=torch.float32)
    model.eval()
    tokenizer = load_tokenizer(args.model)

    control_model = ControlModel(model, args.layers)
    if patch_attention_type(control_model):
        notes.append("copied attention_type onto repeng's ControlModule wrappers (repeng#64)")
    vector = ControlVector.train(
        control_model,
        tokenizer,
        dataset,
        hidden_layers=args.layers,
        method=args.method,
        batch_size=args.batch_size,
    )
    vector.export_gguf(str(args.out / "repeng.gguf"))
    directions = {
        str(k): np.asarray(v, dtype=np.float32).tolist()
        for k, v in sorted(vector.directions.items())
    }
    (args.out / "directions.json").write_text(json.dumps(directions))

    pad_id = tokenizer.pad_token_id
    results = []
    for prompt in prompts:
        control_model.set_control(vector, args.coeff)
        steered = record(control_model, prompt, args.max_new_tokens, pad_id, args.coeff)
        control_model.reset()
        unsteered = record(control_model, prompt, args.max_new_tokens, pad_id, 0.0)
        results.append({"prompt": prompt, "steered": steered, "unsteered": unsteered})

    outputs = {
        "versions": {
            "repeng": version("repeng"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "model_type": vector.model_type,
        "method": args.method,
        "layers": args.layers,
        "coeff": args.coeff,
        "max_new_tokens": args.max_new_tokens,
        "load_notes": notes,
        # Exactly what repeng fed the model, so the other side can train on the same ids.
        "pairs_token_ids": [
            [tokenizer(e.positive)["input_ids"], tokenizer(e.negative)["input_ids"]]
            for e in dataset
        ],
        "prompts": results,
    }
    (args.out / "outputs.json").write_text(json.dumps(outputs, indent=1))
    print(json.dumps({"out": str(args.out), "load_notes": notes}))


if __name__ == "__main__":
    main()
