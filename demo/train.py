"""Train the demo model: corpus -> BPE tokenizer -> a small Llama, on CPU, by seed.

    python -m demo.train --out demo/model            # the shipped checkpoint
    python -m demo.train --out /tmp/m --steps 20     # a quick look

Steps are fixed (not a time budget) so that one seed gives one checkpoint on one machine;
the defaults take about 17 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from demo.corpus import documents
from steering.tiny_models import CHAT_TEMPLATE  # the test models' markup, and render()'s

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"


def render(doc: dict) -> str:
    """A document as the model sees it (chat through the template's own markup)."""
    if doc["kind"] == "chat":
        return f"{BOS}{USER}{doc['user']}{END}{ASSISTANT}{doc['assistant']}{END}{EOS}"
    return f"{BOS}{doc['text']}{EOS}"


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, USER, ASSISTANT, END]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=40_000)
    p.add_argument("--recall-lines", type=int, default=80_000)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    docs = list(documents(args.seed, args.conversations, args.recall_lines))
    texts = [render(d) for d in docs]
    tok = train_tokenizer(texts, args.vocab_size, out)
    ids = np.concatenate(
        [np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int64) for t in texts]
    )
    blocks = torch.from_numpy(ids[: len(ids) // args.seq_len * args.seq_len]).view(-1, args.seq_len)

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))
    started, losses = time.time(), []
    model.train()
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        at = (step * args.batch) % len(order)
        batch = blocks[order[at : at + args.batch]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(
        json.dumps(
            {
                "seed": args.seed,
                "args": vars(args),
                "tokens": int(blocks.numel()),
                "documents": len(docs),
                "minutes": (time.time() - started) / 60,
                "final_loss": float(np.mean(losses[-50:])),
                "losses": losses[::10],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
