"""Measure prefill and decode times of a Llama-shaped model on one GPU, for cost-model profiles.

    python bench/gpu_profile.py --arch llama3-8b --json OUT.json

Runs a minimal Llama forward in plain PyTorch (random bf16 weights, cuBLAS GEMMs, flash
scaled-dot-product attention, CUDA graphs for decode) so the kernels are the ones a serving engine
runs, without needing vLLM on the machine. It prints two tables:

- prefill seconds for ``new`` tokens on top of ``cached`` tokens already in the KV cache
  (the term E2's P_i and M_i estimate), and
- decode seconds per step at batch ``B`` with ``context`` tokens per sequence (the TPOT term).

The numbers are a floor for a real engine (no scheduler, sampler or paging overhead); use them to
check a profile's coefficients, not as a replacement for measuring the engine itself.
"""

from __future__ import annotations

import argparse
import json
import time

ARCHS = {
    # hidden, layers, heads, kv_heads, intermediate, vocab (Meta's published configs)
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama3-70b-1layer": (8192, 1, 64, 8, 28672, 128256),
}


def _layers(arch: str, device: str):
    import torch

    hidden, n_layers, heads, kv_heads, inter, _ = ARCHS[arch]
    head_dim = hidden // heads

    def w(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16) * 0.02

    layers = [
        {
            "qkv": w(hidden, (heads + 2 * kv_heads) * head_dim),
            "o": w(heads * head_dim, hidden),
            "gate_up": w(hidden, 2 * inter),
            "down": w(inter, hidden),
        }
        for _ in range(n_layers)
    ]
    return layers, (hidden, heads, kv_heads, head_dim, inter)


def _forward(x, layers, dims, k_cache, v_cache, cached: int):
    """x: [B, N, hidden] new tokens; k/v_cache: per layer [B, kv_heads, cached + N, d]."""
    import torch
    import torch.nn.functional as F

    hidden, heads, kv_heads, d, inter = dims
    b, n, _ = x.shape
    for i, p in enumerate(layers):
        qkv = x @ p["qkv"]
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q = q.view(b, n, heads, d).transpose(1, 2)
        k_cache[i][:, :, cached : cached + n] = k.view(b, n, kv_heads, d).transpose(1, 2)
        v_cache[i][:, :, cached : cached + n] = v.view(b, n, kv_heads, d).transpose(1, 2)
        keys = k_cache[i][:, :, : cached + n]
        vals = v_cache[i][:, :, : cached + n]
        # A prefix-cached prefill: new queries see every cached key plus the causal part of the
        # new ones. With no cache the causal flag alone says that; with a cache it needs a mask.
        if cached == 0:
            attn = F.scaled_dot_product_attention(q, keys, vals, is_causal=n > 1, enable_gqa=True)
        else:
            mask = torch.ones(n, cached + n, dtype=torch.bool, device=x.device).tril(cached)
            attn = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, enable_gqa=True)
        x = x + attn.transpose(1, 2).reshape(b, n, heads * d) @ p["o"]
        gate, up = (x @ p["gate_up"]).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ p["down"]
    return x


def _timed(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _cache(layers, dims, batch: int, length: int):
    import torch

    _, _, kv_heads, d, _ = dims
    shape = (batch, kv_heads, length, d)
    k = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in layers]
    v = [torch.zeros(shape, device="cuda", dtype=torch.bfloat16) for _ in layers]
    return k, v


def profile_prefill(layers, dims, grid):
    import torch

    rows = []
    for cached, new in grid:
        k, v = _cache(layers, dims, 1, cached + new)
        x = torch.randn(1, new, dims[0], device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            s = _timed(lambda x=x, k=k, v=v, c=cached: _forward(x, layers, dims, k, v, c), 3)
        rows.append({"cached": cached, "new": new, "seconds": s})
        del k, v
    return rows


def profile_decode(layers, dims, grid):
    import torch

    rows = []
    for batch, context in grid:
        k, v = _cache(layers, dims, batch, context + 1)
        x = torch.randn(batch, 1, dims[0], device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            _forward(x, layers, dims, k, v, context)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _forward(x, layers, dims, k, v, context)
            s = _timed(graph.replay, 20)
        rows.append({"batch": batch, "context": context, "seconds": s})
        del k, v, graph
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama3-8b")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    import torch

    layers, dims = _layers(args.arch, "cuda")
    prefill_grid = [(c, n) for c in (0, 2048, 8192, 24576) for n in (128, 512, 2048, 8192)]
    # Keep the KV of one grid point under ~32 GiB (Llama-3-8B: 128 KiB per token).
    decode_grid = [(b, c) for b in (1, 8, 32, 128) for c in (512, 2048, 8192) if b * c <= 2**18]
    prefill = profile_prefill(layers, dims, prefill_grid)
    decode = profile_decode(layers, dims, decode_grid)
    print(f"{args.arch} on {torch.cuda.get_device_name()}")
    print(f"{'cached':>8} {'new':>6} {'prefill ms':>11} {'us/new tok':>11}")
    for r in prefill:
        print(
            f"{r['cached']:>8} {r['new']:>6} {r['seconds'] * 1e3:>11.2f} "
            f"{r['seconds'] / r['new'] * 1e6:>11.2f}"
        )
    print(f"{'batch':>8} {'ctx':>6} {'step ms':>11}")
    for r in decode:
        print(f"{r['batch']:>8} {r['context']:>6} {r['seconds'] * 1e3:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arch": args.arch,
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "prefill": prefill,
                    "decode": decode,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
