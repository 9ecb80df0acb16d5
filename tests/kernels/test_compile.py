"""Every Triton kernel compiles to a GPU binary (sm_90 cubin) on this machine, GPU or not.

The interpreter runs kernels as numpy code, so it cannot catch what breaks only in a real compile (a type
the compiler rejects, a constexpr branch returning two types, ptxas errors). Triton's wheel ships ptxas,
so `triton.compile` for a named target works without a device. It runs in a subprocess because kernels
are defined once per process, interpreted or compiled, according to TRITON_INTERPRET at import.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from sparse_plugin.kernels import merged_weight, scatter_triton, sddmm  # noqa: E402


def _sddmm(activations: str, index: str) -> tuple:
    pointers = {
        "dyt_ptr": activations,
        "xt_ptr": activations,
        "rows_ptr": index,
        "cols_ptr": index,
        "out_ptr": "*fp32",
    }
    return (
        "sddmm",
        "_sddmm_kernel",
        pointers | {"n": "i32", "tokens": "i32"},
        {"BLOCK_P": sddmm._BLOCK_P, "BLOCK_T": sddmm._BLOCK_T},
    )


def _merged(out: str, index: str) -> tuple:
    pointers = {"base_ptr": "*fp32", "out_ptr": out, "crow_ptr": "*i64", "cols_ptr": index, "values_ptr": "*fp32"}
    blocks = {"BF16": out == "*bf16", "BLOCK": merged_weight._BLOCK, "BLOCK_P": merged_weight._BLOCK_P}
    return "merged_weight", "_merged_weight_kernel", pointers | {"in_features": "i32"}, blocks


# (module, kernel, signature, constexprs): the dtype mixes the layer launches, with 16-byte aligned pointers
# and sizes as the runtime specialises them, so the vectorised load paths are compiled too.
VARIANTS = [
    _sddmm("*bf16", "*i64"),
    _sddmm("*fp32", "*i32"),
    _merged("*fp32", "*i64"),
    _merged("*bf16", "*i32"),
    (
        "scatter_triton",
        "_scatter_kernel",
        {"weight_ptr": "*bf16", "indices_ptr": "*i32", "values_ptr": "*fp32", "n": "i32", "alpha": "fp32"},
        {"ADD": True, "BF16": True, "BLOCK": scatter_triton._BLOCK},
    ),
]

_COMPILE = r"""
import importlib, json, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:
    print(f"this triton has no ahead-of-time compile API: {err}"); sys.exit(3)
for module, name, signature, constexprs in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(f"sparse_plugin.kernels.{module}"), name)
    names = kernel.arg_names
    aligned = {(names.index(arg),): [["tt.divisibility", 16]] for arg, kind in signature.items() if kind != "fp32"}
    try:
        source = ASTSource(kernel, signature | {k: "constexpr" for k in constexprs}, constexprs, aligned)
    except (TypeError, KeyError, AttributeError) as err:  # a Triton whose internal API differs
        print(f"ASTSource API mismatch: {err!r}"); sys.exit(3)
    binary = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    print(name, sorted(constexprs.items()), len(binary.asm["cubin"]), "bytes of sm_90 cubin")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", _COMPILE, json.dumps(VARIANTS)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("sm_90 cubin") == len(VARIANTS)
