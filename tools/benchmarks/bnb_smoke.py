"""Smoke test of a sparse delta over a bitsandbytes 4-bit base (QSpIEL's setting), for tools/gpu_check.sh.

A 4096×4096 `nn.Linear` is quantised as users load it (`Linear4bit`, NF4, double quantisation, bf16
compute) and wrapped in `SparseDeltaLinear` at 1% density with random values. One forward and backward
must match the dense reference built from the dequantised weight plus Δ (within bf16 error: the base
matmul runs in bf16), and the 4-bit weight must be left as it was. Then the step time is compared with
the bare 4-bit layer (forward + dx). Prints one JSON line; exits 1 if a check fails.

Usage: python -m tools.benchmarks.bnb_smoke [--device cuda] [--features 4096] [--tokens 2048] [--density 0.01]
(`--device cpu --features 256 --tokens 64` runs in seconds where bitsandbytes has CPU 4-bit kernels.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparse_plugin.layer import SparseDeltaLinear
from sparse_plugin.model import random_indices
from tools.benchmarks.common import environment


def quantised_linear(features: int, device: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    dense = torch.nn.Linear(features, features, bias=False)
    layer = bnb.nn.Linear4bit(
        features, features, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to(device).requires_grad_(False)  # quantises on the move to the device


def step_ms(call, x: torch.Tensor, repeats: int = 10) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        x.grad = None
        sync()
        t0 = time.perf_counter()
        call(x).float().square().mean().backward()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times[1:])


def main() -> int:
    import bitsandbytes as bnb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.01)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = quantised_linear(args.features, args.device)
    packed = base.weight.data.clone()
    count = round(args.density * args.features**2)
    layer = SparseDeltaLinear(base, random_indices(args.features**2, count, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        layer.values.normal_(0, 1e-2)
    x = torch.randn(args.tokens, args.features, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()

    dequantised = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    weight = (dequantised + layer.delta_weight().float()).requires_grad_(True)
    F.linear(x.detach().float(), weight).square().mean().backward()
    expected = weight.grad.view(-1)[layer.indices]
    error = ((layer.values.grad - expected).norm() / expected.norm()).item()
    checks = {
        "values_grad_rel_error_below_3e-2": error < 3e-2,  # bf16 base output and dy: ~1% expected
        "grad_finite": bool(torch.isfinite(layer.values.grad).all()),
        "base_weight_unchanged": bool(torch.equal(base.weight.data, packed)),
        "strategy_additive": layer.strategy() == "additive",
    }
    sparse_ms, base_ms = step_ms(layer, x), step_ms(base, x)
    env = environment(args.device)
    print(
        json.dumps(
            {
                "kind": "bnb_smoke",
                "device": env["device_name"],
                "env": env,
                "bitsandbytes": bnb.__version__,
                "features": args.features,
                "tokens": args.tokens,
                "density": args.density,
                "k": count,
                "values_grad_rel_error": error,
                "step_ms": sparse_ms,
                "base_only_step_ms": base_ms,
                "step_vs_base_only": sparse_ms / base_ms,
                "checks": checks,
            }
        )
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
