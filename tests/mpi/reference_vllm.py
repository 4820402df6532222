"""One plain vLLM engine over a prompt file: the reference the MPI batch outputs must equal.

    python reference_vllm.py MODEL INPUT.jsonl OUT.json [--max-model-len N]

Greedy decoding with the same engine flags as the MPI test jobs; text prompts go through
``LLM.generate`` and chat prompts through ``LLM.chat``, so vLLM's own tokenization is the
reference for rank 0's too. Writes {id: {"prompt_token_ids": [...], "token_ids": [...]}}."""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        enforce_eager=True,
        dtype="float32",
        seed=0,
        max_model_len=args.max_model_len,
        enable_prefix_caching=True,
    )
    rows = [json.loads(line) for line in open(args.input) if line.strip()]
    result = {}
    for row in rows:
        params = SamplingParams(temperature=0.0, max_tokens=row.get("max_tokens", 16))
        if "messages" in row:
            [out] = llm.chat([row["messages"]], params, use_tqdm=False)
        else:
            [out] = llm.generate([row["prompt"]], params, use_tqdm=False)
        result[row["id"]] = {
            "prompt_token_ids": list(out.prompt_token_ids),
            "token_ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
        }
    with open(args.output, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
