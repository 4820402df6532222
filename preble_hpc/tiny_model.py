"""`preble-hpc make-tiny-model DIR`: a small random-weight Llama with a byte-level tokenizer.

Tests and the demo need a model that vLLM loads without any download. This writes a normal HF
model folder (config.json, safetensors weights, tokenizer.json with a chat template), the same
kind of folder a user's real checkpoint is, so every code path is the production one. The weights
are random but seeded, so outputs are reproducible run to run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Ids of the special tokens; the 256 byte tokens follow them.
SPECIALS = ("<pad>", "<s>", "</s>")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _byte_level_tokenizer():
    """One token per byte (GPT-2's byte-to-unicode alphabet), no merges: any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def make_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 256,
    max_positions: int = 4096,
) -> Path:
    """Write the model folder to ``out_dir`` and return its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}) + "\n"
    )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preble-hpc make-tiny-model", description=__doc__)
    parser.add_argument("dir", help="output folder (created)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.dir, seed=args.seed, layers=args.layers, hidden=args.hidden)
    print(f"wrote tiny model to {path}", file=sys.stderr)
    return 0
