"""Memory model of a fine-tuning step: sparse methods (SpIEL-MA/AG, SMT, SIFT) vs LoRA/QLoRA vs full fine-tuning.

Peak bytes of one training step of a Llama-architecture decoder, split into components: frozen weights,
trained tensors, sparse indices, gradients, optimizer state, selection buffers, saved activations, and the
largest short-lived buffer at the peak. Pure arithmetic (no torch import); each term mirrors what the code in
`sparse_plugin/` (or PEFT / torch / transformers) allocates, and `tests/tools/test_memory_model.py` checks the
activation term byte for byte against the tensors autograd saves on a tiny Llama (sparse, LoRA, full; fp32
and bf16 autocast).

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.memory_model                          # 7B-70B table: bf16, seq 2048, batch 1
    .venv/bin/python -m tools.benchmarks.memory_model --checkpointing --json   # with gradient checkpointing, JSON lines too
    .venv/bin/python -m tools.benchmarks.memory_model --shards 8 --totals      # per GPU, base sharded by FSDP over 8 GPUs
    .venv/bin/python -m tools.benchmarks.memory_model --model smollm2 --batch 4 --seq 128 --dtype fp32 --sift-selection-steps 1
        # bench_step.py's setting (CPU, fp32; SIFT chooses on its first step); totals include the loaded weights
    .venv/bin/python -m tools.benchmarks.memory_model --compare bench.jsonl --measure-runtime   # vs `bench_step.py --json`

Notation: T = batch·seq tokens, h hidden, i intermediate, L layers, n_h heads, d_q = n_h·head_dim,
d_kv = n_kv·head_dim, V vocab, a = bytes of the activation (compute) dtype, P parameters, K trained values
(the sparse budget is LoRA r16's count on every linear layer, K = r·Σ(in + out), spread over the matrices in
proportion to their size by `sparse_plugin.sizing.share_budget`: k_m values in an m × n matrix).

Components (bytes):

* weights: the frozen model. Linear weights in the base dtype: fp32 4, bf16 2, or NF4 with double
  quantization (4 + 8/64 + 32/(64·256))/8 = 0.5159 B/param (4-bit codes, an 8-bit absmax per 64 weights, an
  fp32 constant per 256 absmaxes: 0.127 bits/param of scales, QLoRA paper §3, Dettmers et al. 2023);
  embeddings, norms and head stay in the compute dtype (bitsandbytes leaves them unquantised). Full
  fine-tuning: the working copy in the compute dtype.
* trained: sparse values (values_dtype, fp32 by default); LoRA A and B (fp32: PEFT's default
  `autocast_adapter_dtype=True` upcasts them); full fine-tuning in bf16: the fp32 master copy. Convention for
  full fine-tuning (ZeRO, Rajbhandari et al. 2020): 2 + 2 + 4 + 4 + 4 = 16 B/param for bf16 weights, bf16
  gradients, fp32 master weights and two fp32 Adam moments; in fp32 4 + 4 + 8 (no master copy).
* indices: the int32 positions (4 B) plus the cached `SparsePattern`'s CSR row pointers 4·(m + 1) (rows and
  columns are derived where needed); SMT's `BlockPattern` adds each value's slot (int64): 12 B per value. Where the
  base weight is dense (not NF4) and whole (no FSDP) it holds W0 + Δ between steps, and the layer keeps W0's
  entries at the positions, in the base dtype: + 4 B (fp32) or 2 B (bf16) per value.
* grads: one per trained value (values_dtype), LoRA parameter (adapter dtype) or parameter (compute dtype),
  as far as they exist at the peak moment (after `zero_grad(set_to_none=True)` none exist when a backward
  starts; no gradient accumulation assumed).
* optimizer: SM3 (`spiel_sm3`): fp32 r (m) and c (n) per matrix plus an fp32 step, 4·Σ(m + n + 1) (+4 B per
  value with momentum). SparseAdamW (`spiel_adamw`): exp_avg and exp_avg_sq (fp32) and the per-position age (int16):
  10 B per value. torch AdamW: two moments in the parameters' dtype (8 B/param for fp32) + a step per tensor.
* selection: AG while gathering: candidates (int32) + sums (fp32), 8 B per value; SIFT while choosing with
  `selection_steps` > 1 (default 4): a pool of 4·k_m positions (int32) with two fp32 sums, 48 B per value;
  SMT's warm-up: one fp32 cell per block; MA: nothing (it scores with SM3's r and c).
* activations: what autograd saves, per token and decoder layer:
  2·(4h + 4) [each RMSNorm keeps its input in fp32 and the rsqrt] + a·(2·d_q + 2·d_kv) [q and k after RoPE,
  v, the attention output, which is also o_proj's input] + 4·n_h [SDPA's log-sum-exp: flash/memory-efficient
  attention, no T² term] + 3a·i [gate, SiLU and up outputs] + a·(2h + i) [the inputs of q/k/v, gate/up and
  down: a trained linear layer (sparse layers like nn.Linear, LoRA, full) saves its input] + method terms:
  full fine-tuning 2a·h (trainable norm weights keep the normalised input); LoRA a·r per adapted module, and
  when the adapters' dtype differs from the compute dtype each module keeps its own copy of its input (PEFT
  casts x to the adapter dtype, autocast casts it back: a·(5h + d_q + i) in place of a·(2h + i)). The first
  layer's norm saves nothing when the embeddings are frozen. Outside the layers, per token: the final norm
  4h + 4, the fp32 log-softmax 4V (transformers upcasts the logits), labels 8 (full fine-tuning also the
  head's input and the final norm's normalised input, 2a·h, and the token ids, 8); per step: RoPE's cos and
  sin, and under autocast LoRA's weights cast to the compute dtype. With gradient checkpointing a layer keeps
  only its input (a·h per token) and one layer's activations are rebuilt during its backward. This is
  Korthikanti et al.'s (2022) per-layer bookkeeping (34·s·b·h for a 16-bit GPT block with dropout) redone for
  Llama's blocks: RMSNorm, SwiGLU, GQA, no dropout, fused attention.
* transient: the largest short-lived buffer at the peak moment. Loss backward: nll's and log-softmax's fp32
  gradients of the logits, 8V per token. A layer's backward: its gradient buffers a·(2h + 3i) per token
  (MLP: dy, d(gate·up), d(SiLU), d(up)), over an NF4 base bitsandbytes' dequantised weight (a·m·n), plus
  the largest per-matrix buffer of the method: the merged weight's rewrite of its trained entries (~16 B per
  value), the additive forward's fp32 copies (4T·(m + n)), a dense values' gradient where the density rule picks it
  (4·m·n), SMT's block gathers (blocks assumed spread evenly), and while gathering statistics the dense fp32
  layer gradient with its |g| or g² copy (8·m·n; SMT 12·m·n with its padded copy) and the top-k buffers.
  Optimizer step: torch's single-tensor AdamW on CPU keeps two temporaries of the largest parameter; fused
  AdamW (the Trainer's default on GPU) none; SM3/SparseAdamW a few per matrix; an MA round a 16 MiB chunk of
  scores.

FSDP (`--shards N`, per rank): the frozen weights /N; LoRA's and full fine-tuning's trained tensors, gradients and
optimizer state /N (a layer's gradient is whole until its reduce-scatter); the sparse state stays whole on every
rank (`keep_deltas_replicated`), plus a flat fp32 copy of the values' gradients for their all-reduce (4 B per value)
at the end of the backward. Transient during forward/backward: the root's unsharded parameters and two decoder
layers (running + prefetched), `fsdp_gathered_bytes`. tests/distributed checks the sharded weights term against
the base storage FSDP1 and FSDP2 leave on each of two gloo ranks.

The peak is the largest total over the moments of a step: the start of the backward (all activations + the
loss transient), each layer's backward (activations of the layers below, gradients of those above, its
transient), and the optimizer step (all gradients, its temporaries); for AG also during its gathering steps,
for SIFT and SMT during their selection phase (selection buffers; the optimizer state exists from the start,
zeroed, since FSDP's checkpoint APIs need it). The table reports
the components at that moment, so they add up to the total.

Not modelled: the CUDA context and library workspaces (~0.3-1 GiB per GPU process), the caching allocator's
fragmentation, the data loader; an fp32 base under bf16 autocast (rejected: autocast saves per-call casts).

Validation on CPU (SmolLM2-135M, bench_step.py's setting: fp32, batch 4 × 128, `peak_mem_mb` = peak RSS over
the loaded model). `--compare` predicts that quantity (the estimate minus the weights) plus a measured
`runtime` term per library (code pages, imports, thread pools: the RSS growth of two steps of a tiny Llama
with that library after loading the model, `--measure-runtime`). glibc's malloc keeps freed heap memory
resident (its mmap threshold rises after the first frees, so later tensors up to 32 MiB come from the heap),
which a run with a fixed threshold avoids:

    M=spiel-ma,spiel-ag,smt,sift,lora-r16,full
    .venv/bin/python -m tools.benchmarks.bench_step --methods $M --quick --json > glibc-default.jsonl
    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python -m tools.benchmarks.bench_step --methods $M --quick --json > mmap-128k.jsonl
    .venv/bin/python -m tools.benchmarks.memory_model --compare glibc-default.jsonl mmap-128k.jsonl --measure-runtime
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparse_plugin.sizing import (  # torch-free, like this model and common
    POOL_FACTOR,
    SAMPLED_MAX_DENSITY,
    SCORE_CHUNK,
    TRITON_MAX_DENSITY,
    share_budget,
)
from tools.benchmarks.common import markdown_table

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# 4-bit codes + one 8-bit absmax per 64 weights + one fp32 constant per 256 absmaxes (QLoRA §3: 0.127 bits/param).
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8

MODELLED_METHODS = ("spiel-ma", "spiel-ag", "smt", "sift", "lora", "full")
SPARSE = ("spiel-ma", "spiel-ag", "smt", "sift")
LABELS = {
    "spiel-ma": "SpIEL-MA",
    "spiel-ag": "SpIEL-AG",
    "smt": "SMT",
    "sift": "SIFT",
    "lora": "LoRA r16",
    "full": "full FT",
}
COMPONENTS = ("weights", "trained", "indices", "grads", "optimizer", "selection", "activations", "transient")


@dataclass(frozen=True)
class Arch:
    """A Llama-architecture decoder: what the memory depends on."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def d_q(self) -> int:
        return self.heads * self.hd

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.hd

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of the 7 linear layers of one decoder layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(self.d_q, h), (self.d_kv, h), (self.d_kv, h), (h, self.d_q), (i, h), (i, h), (h, i)]

    def linear_shapes(self) -> list[tuple[int, int]]:
        return self.layer_shapes() * self.layers

    @property
    def linear_params(self) -> int:
        return sum(o * i for o, i in self.linear_shapes())

    @property
    def other_params(self) -> int:
        """Embedding, head (unless tied) and RMSNorm weights."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


# Real configs (config.json of the Hugging Face checkpoints).
ARCHS = {
    "smollm2": Arch("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
    "llama-2-7b": Arch("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": Arch("Llama-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "llama-3-8b": Arch("Llama-3-8B", 4096, 14336, 32, 32, 8, 128256),
    "llama-3-70b": Arch("Llama-3-70B", 8192, 28672, 80, 64, 8, 128256),
}
TABLE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-3-8b", "llama-3-70b")


@dataclass(frozen=True)
class Setting:
    """The training setup. `dtype` is the activation/compute dtype (bf16: Trainer `bf16=True`, autocast);
    `base` the frozen weights' dtype (fp32, bf16 or nf4; default: `dtype`); `device` picks the code paths
    that differ (cuda: Triton SDDMM below 2% density, fused AdamW; cpu: sampled SDDMM below 5%,
    torch's single-tensor AdamW); `shards` the FSDP world size (1: one process, or DDP)."""

    batch: int = 1
    seq: int = 2048
    dtype: str = "bf16"
    base: str | None = None
    values_dtype: str = "fp32"
    adapter_dtype: str = "fp32"
    checkpointing: bool = False
    device: str = "cuda"
    lora_rank: int = 16
    sift_selection_steps: int = 4
    sm3_momentum: bool = False
    block_size: int = 256
    shards: int = 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def base_dtype(self) -> str:
        return self.base or self.dtype


@dataclass
class Estimate:
    model: str
    method: str
    setting: dict
    peak_bytes: int
    peak_at: str
    components: dict[str, int]  # at the peak moment; they add up to peak_bytes
    moments: dict[str, int]  # total at each moment considered
    trainable: int
    notes: list[str] = field(default_factory=list)

    def gib(self, key: str | None = None) -> float:
        return (self.peak_bytes if key is None else self.components[key]) / GIB


# ---------------------------------------------------------------- pieces


def lora_params(arch: Arch, rank: int) -> int:
    """LoRA's trainable count on every linear layer: r·(in + out) per matrix (also the sparse budget K)."""
    return sum(rank * (o + i) for o, i in arch.linear_shapes())


def sm3_state_bytes(shapes: list[tuple[int, int]], k: int = 0, momentum: bool = False) -> int:
    """SM3: fp32 row (out) and column (in) accumulators and a fp32 step per matrix; momentum 4 B per value."""
    return sum(4 * (o + i + 1) for o, i in shapes) + (4 * k if momentum else 0)


def pattern_bytes(shapes: list[tuple[int, int]], k: int, blocks: bool = False, base_entry: int = 0) -> int:
    """Indices (int32) + the cached SparsePattern (crow, int32, out + 1) [+ SMT's int64 slots] [+ W0's entries at
    the indices, `base_entry` bytes each, kept while the base weight holds W0 + Δ]."""
    return (4 + (8 if blocks else 0) + base_entry) * k + sum(4 * (o + 1) for o, _ in shapes)


def merged_base_entry_bytes(setting: Setting) -> int:
    """Bytes per trained value of W0's entries that the merged strategy keeps: a dense float base not sharded by
    FSDP holds W0 + Δ (`SparseDeltaLinear.strategy`); NF4 and sharded bases use the additive path (0)."""
    return DTYPE_BYTES[setting.base_dtype] if setting.base_dtype in DTYPE_BYTES and setting.shards == 1 else 0


def weight_bytes(arch: Arch, setting: Setting, method: str) -> int:
    a = DTYPE_BYTES[setting.dtype]
    if method == "full":
        return arch.params * a
    base = setting.base_dtype
    per_linear = NF4_BYTES_PER_PARAM if base == "nf4" else DTYPE_BYTES[base]
    other = DTYPE_BYTES.get(base, a)
    return round(arch.linear_params * per_linear) + arch.other_params * other


def layer_activation_bytes(arch: Arch, setting: Setting, method: str) -> int:
    """Bytes autograd saves per token in one decoder layer (see the module docstring)."""
    h, i, a = arch.hidden, arch.intermediate, DTYPE_BYTES[setting.dtype]
    core = 2 * (4 * h + 4) + a * (2 * arch.d_q + 2 * arch.d_kv) + 4 * arch.heads + 3 * a * i
    inputs = a * (2 * h + i)
    extra = 0
    if method == "full":
        extra = 2 * a * h
    elif method == "lora":
        r = setting.lora_rank
        if lora_recasts_input(setting):
            inputs = a * (5 * h + arch.d_q + i)  # q, k, v, gate, up: h each; o: d_q; down: i
        extra = 7 * a * r
    return core + inputs + extra


def lora_recasts_input(setting: Setting) -> bool:
    """PEFT casts x to the adapters' dtype; when that differs from the compute dtype each adapted module saves
    its own copy (re-cast to the compute dtype by autocast)."""
    return setting.adapter_dtype != setting.dtype


def outside_activation_bytes(arch: Arch, setting: Setting, method: str) -> int:
    """Per token, outside the decoder layers: final norm, log-softmax, labels (full FT: head input, ids),
    minus the first layer's norm when the embeddings are frozen (its input needs no gradient)."""
    h, a = arch.hidden, DTYPE_BYTES[setting.dtype]
    b = (4 * h + 4) + 4 * arch.vocab + 8
    if method == "full":
        b += 2 * a * h + 8
    else:
        b -= 4 * h + 4
    return b


def per_step_activation_bytes(arch: Arch, setting: Setting, method: str) -> int:
    """Saved tensors that do not scale with tokens: RoPE cos/sin, nll's total weight; under autocast the bf16
    casts of LoRA's weights."""
    a = DTYPE_BYTES[setting.dtype]
    b = 2 * a * setting.seq * arch.hd + 4
    if method == "lora" and lora_recasts_input(setting):
        # minus the first layer's q/k/v A casts: their input needs no gradient (frozen embeddings)
        b += a * (lora_params(arch, setting.lora_rank) - 3 * setting.lora_rank * arch.hidden)
    return b


def activation_bytes(arch: Arch, setting: Setting, method: str) -> int:
    """All saved activations of a step without checkpointing."""
    t = setting.tokens
    return (
        arch.layers * layer_activation_bytes(arch, setting, method) * t
        + outside_activation_bytes(arch, setting, method) * t
        + per_step_activation_bytes(arch, setting, method)
    )


def fsdp_gathered_bytes(arch: Arch, setting: Setting, method: str) -> int:
    """Unsharded parameters alive during a forward/backward under FSDP2 with one unit per decoder layer: the root's
    (embeddings, head, final norm; the root does not reshard after forward) and two decoder layers (the one
    running and the next one, prefetched), in their stored dtype (mixed precision would gather in the compute
    dtype; an NF4 base gathers its packed codes and scales)."""
    a = DTYPE_BYTES[setting.dtype]
    base = setting.base_dtype
    per_linear = a if method == "full" else (NF4_BYTES_PER_PARAM if base == "nf4" else DTYPE_BYTES[base])
    other = a if method == "full" else DTYPE_BYTES.get(base, a)
    layer = sum(o * i for o, i in arch.layer_shapes()) * per_linear + 2 * arch.hidden * other
    root = (arch.vocab * arch.hidden * (1 if arch.tied else 2) + arch.hidden) * other
    return round(root + 2 * layer)


def layer_backward_transient(arch: Arch, setting: Setting) -> int:
    """Gradient buffers alive inside one layer's backward (the MLP's: dy, d(gate·up), d(SiLU), d(up)); over an
    NF4 base also bitsandbytes' dequantised weight (compute dtype) of the largest matrix, rebuilt per call."""
    a = DTYPE_BYTES[setting.dtype]
    grads = a * (2 * arch.hidden + 3 * arch.intermediate) * setting.tokens
    if setting.base_dtype == "nf4":
        grads += a * max(o * i for o, i in arch.layer_shapes())
    return grads


def loss_backward_transient(arch: Arch, setting: Setting) -> int:
    """nll's and log-softmax's fp32 gradients of the logits (the saved log-softmax counts as an activation)."""
    return 8 * arch.vocab * setting.tokens


def sparse_layer_transient(
    arch: Arch, setting: Setting, method: str, counts: list[int], regime: str
) -> tuple[int, str]:
    """Largest buffer of one sparse matrix's forward/backward (matrices run one at a time; in a backward the
    input gradient and the values' gradient come one after the other, so the larger counts)."""
    t, a = setting.tokens, DTYPE_BYTES[setting.dtype]
    gathering = regime in ("selection", "gather")
    best, why = 0, ""
    for (m, n), k in zip(arch.layer_shapes(), counts):
        density = k / (m * n)
        merged = merged_base_entry_bytes(setting) > 0
        cands = [(16 * k, "merged entries rewritten") if merged else (4 * t * (m + n), "additive fp32 copies")]
        if gathering:  # the collector's dense fp32 gradient (after a bf16 product) and its |g| / g² copy
            if method == "smt":
                cands.append((12 * m * n, "dense layer gradient + |g| + padded copy"))
            elif method == "sift":
                pool = min(m * n, POOL_FACTOR * k)
                once = 12 * pool if setting.sift_selection_steps == 1 else 0  # pool lives within this backward
                cands.append((8 * m * n + 28 * pool + once, "dense layer gradient + |g| + top-k pool"))
            else:
                dense = max(6 * m * n if a == 2 else 0, 8 * m * n + 28 * k)
                cands.append((dense, "dense layer gradient + |g| + top-k"))
        elif method == "smt":  # BlockPattern: gathered rows of dy and columns of x per block, blocks spread evenly
            bh, bw = min(setting.block_size, m), min(setting.block_size, n)
            n_blocks = k / (bh * bw)
            gathers = 4 * t * n_blocks * (bh + bw) + (4 * t * (m + n) if a != 4 else 0)
            cands.append((int(gathers), "block gathers"))
        elif density >= (TRITON_MAX_DENSITY if setting.device == "cuda" else SAMPLED_MAX_DENSITY):
            cands.append((4 * m * n + (2 * m * n if a == 2 else 0), "dense values' gradient"))
        for value, label in cands:
            if value > best:
                best, why = value, label
    return best, why


def optimizer_step_transient(arch: Arch, setting: Setting, method: str, counts: list[int]) -> int:
    k_max = max(counts) if counts else 0
    if method in ("lora", "full"):
        if setting.device == "cuda":
            return 0  # fused AdamW
        if method == "full":
            largest = max([arch.vocab * arch.hidden] + [o * i for o, i in arch.layer_shapes()])
        else:
            largest = max(setting.lora_rank * max(o, i) for o, i in arch.layer_shapes())
        return 2 * 4 * largest  # sqrt(v) and its quotient
    if method == "spiel-ma":
        return SCORE_CHUNK * 4 + 48 * k_max  # MA round: score chunk + prune/regrow buffers
    return 20 * k_max + (40 * k_max if method == "spiel-ag" else 0)


# ---------------------------------------------------------------- the estimate


def estimate(arch: Arch | str, method: str, setting: Setting | None = None) -> Estimate:
    """Peak memory of one training step of `method` on `arch` under `setting`."""
    arch = ARCHS[arch] if isinstance(arch, str) else arch
    setting = setting or Setting()
    if method not in MODELLED_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(MODELLED_METHODS)}")
    if method == "full" and setting.base_dtype == "nf4":
        raise ValueError("full fine-tuning of a 4-bit base is not a thing; use --base bf16")
    if setting.base_dtype == "fp32" and setting.dtype != "fp32":
        raise ValueError(
            "an fp32 base under bf16/fp16 autocast is not modelled (autocast re-casts frozen weights and "
            "fp32 inputs per call, and saves the casts); use --base bf16 or --dtype fp32"
        )
    a = DTYPE_BYTES[setting.dtype]
    t = setting.tokens
    L = arch.layers
    shapes = arch.linear_shapes()
    notes: list[str] = []
    weights = weight_bytes(arch, setting, method)

    # Trainable tensors, their gradients, optimizer state, per regime.
    counts: list[int] = []
    if method in SPARSE:
        k_total = lora_params(arch, setting.lora_rank)
        counts = share_budget([o * i for o, i in shapes], k_total)
        vb = DTYPE_BYTES[setting.values_dtype]
        trainable = k_total
        trained = vb * k_total
        grad_total = vb * k_total
        indices = pattern_bytes(shapes, k_total, blocks=method == "smt", base_entry=merged_base_entry_bytes(setting))
        if method == "spiel-ma":
            opt = sm3_state_bytes(shapes, k_total, setting.sm3_momentum)
        else:
            opt = 10 * k_total  # fp32 exp_avg, exp_avg_sq + int16 age
    elif method == "lora":
        trainable = lora_params(arch, setting.lora_rank)
        trained = DTYPE_BYTES[setting.adapter_dtype] * trainable
        grad_total = trained
        indices = 0
        opt = 2 * DTYPE_BYTES[setting.adapter_dtype] * trainable + 4 * 2 * len(shapes)  # moments in the params' dtype
    else:
        trainable = arch.params
        trained = 4 * arch.params if a != 4 else 0  # fp32 master weights in mixed precision
        grad_total = a * arch.params
        indices = 0
        opt = 8 * arch.params + 4 * (9 * L + 3 - (1 if arch.tied else 0))
    if method == "full":  # a layer's weights and its two norms
        grads_per_layer = a * (sum(o * i for o, i in arch.layer_shapes()) + 2 * arch.hidden)
    else:
        grads_per_layer = grad_total / L
    head_grad = a * arch.vocab * arch.hidden if method == "full" else 0
    n = setting.shards
    gathered = flat_grads = 0
    if n > 1:
        # FSDP shards the frozen base, and LoRA's and full fine-tuning's trained tensors with their gradients and
        # optimizer state; the sparse deltas stay whole on every rank (keep_deltas_replicated), and their
        # gradients are averaged through one flat fp32 buffer at the end of each backward.
        weights = math.ceil(weights / n)
        gathered = fsdp_gathered_bytes(arch, setting, method)
        if method in SPARSE:
            flat_grads = 4 * trainable
        else:
            trained, grad_total, opt = math.ceil(trained / n), math.ceil(grad_total / n), math.ceil(opt / n)
            # a layer's gradient exists unsharded until its reduce-scatter; the sharded ones pile up above it
            grads_per_layer, head_grad = grads_per_layer / n, head_grad / n
            if method == "full":
                gathered += a * (sum(o * i for o, i in arch.layer_shapes()) + 2 * arch.hidden)

    # Regimes: steady training; AG's gathering steps; SIFT's/SMT's selection phase (no gradients; optimizer state
    # allocated from the start).
    regimes = {"steady": {"selection": 0, "opt": opt, "grads": True}}
    if method == "spiel-ag":
        regimes["gather"] = {"selection": 8 * trainable, "opt": opt, "grads": True}
    if method == "sift":
        pool = sum(min(o * i, POOL_FACTOR * k) * 12 for (o, i), k in zip(shapes, counts))
        regimes["selection"] = {
            "selection": pool if setting.sift_selection_steps > 1 else 0,
            "opt": opt,
            "grads": False,
        }
    if method == "smt":
        b = setting.block_size
        cells = sum(math.ceil(o / min(b, o)) * math.ceil(i / min(b, i)) for o, i in shapes)
        regimes["selection"] = {"selection": 4 * cells, "opt": opt, "grads": False}

    layer_act = layer_activation_bytes(arch, setting, method) * t
    outside_act = outside_activation_bytes(arch, setting, method) * t + per_step_activation_bytes(
        arch, setting, method
    )
    if setting.checkpointing:
        saved_layers = L * a * arch.hidden * t  # each checkpointed layer keeps its input
        rebuilt = layer_act  # one layer's activations during its recomputed backward
    else:
        saved_layers = L * layer_act
        rebuilt = 0
    generic = layer_backward_transient(arch, setting)

    moments: dict[str, dict[str, int]] = {}
    for regime, spec in regimes.items():
        base = {
            "weights": weights,
            "trained": trained,
            "indices": indices,
            "optimizer": spec["opt"],
            "selection": spec["selection"],
        }
        if method == "smt" and regime == "selection":
            # random initial indices, plain pattern
            base["indices"] = pattern_bytes(shapes, trainable, base_entry=merged_base_entry_bytes(setting))
        suffix = "" if regime == "steady" else f" ({regime})"
        # Start of the backward: every activation saved, the loss's gradients of the logits.
        moments["loss backward" + suffix] = {
            **base,
            "grads": 0,
            "activations": saved_layers + outside_act,
            "transient": loss_backward_transient(arch, setting) + gathered,
        }
        # Backward of each layer, top down: activations of the layers below, gradients of those above.
        if method in SPARSE:
            extra, _ = sparse_layer_transient(arch, setting, method, counts, regime)
        else:
            extra = 0
        grads_on = spec["grads"]
        worst = None
        for layer in range(L - 1, -1, -1):
            # checkpointing: the inputs of the layers not yet back-propagated, and this layer rebuilt
            below = (layer + 1) * (layer_act if not setting.checkpointing else a * arch.hidden * t) + rebuilt
            above = (L - 1 - layer) * grads_per_layer if grads_on else 0
            total_grads = int(above + (head_grad if grads_on else 0))
            moment = {
                **base,
                "grads": total_grads,
                "activations": int(below + outside_act - 4 * arch.vocab * t),
                "transient": generic + extra + gathered,
            }
            if worst is None or sum(moment.values()) > sum(worst.values()):
                worst = moment
        moments["layer backward" + suffix] = worst
        # Optimizer step: all gradients, its temporaries.
        if grads_on:
            step = max(optimizer_step_transient(arch, setting, method, counts), flat_grads)
            moments["optimizer step" + suffix] = {**base, "grads": grad_total, "activations": 0, "transient": step}
    totals = {name: int(sum(c.values())) for name, c in moments.items()}
    peak_at = max(totals, key=totals.get)
    components = {key: int(moments[peak_at].get(key, 0)) for key in COMPONENTS}
    if setting.base_dtype == "nf4":
        notes.append(
            "NF4 base: linear weights at 0.516 B/param (double quantization); embeddings/head/norms in "
            f"{setting.dtype}"
        )
    if method == "full" and a != 4:
        notes.append("mixed precision: bf16 weights + bf16 grads + fp32 master + 2 fp32 moments = 16 B/param")
    if n > 1:
        notes.append(f"FSDP over {n} ranks: per rank; the sparse state is replicated, LoRA/full state sharded")
    return Estimate(arch.name, method, asdict(setting), totals[peak_at], peak_at, components, totals, trainable, notes)


# ---------------------------------------------------------------- output


def method_label(method: str, setting: Setting) -> str:
    label = LABELS[method]
    if setting.base_dtype == "nf4":
        label = {"lora": "QLoRA r16"}.get(method, "Q" + label)
    return label


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown(rows: list[tuple[Estimate, Setting]]) -> str:
    headers = [
        "model",
        "method",
        "weights",
        "trained",
        "indices",
        "grads",
        "optimizer",
        "selection",
        "activations",
        "transient",
        "**total GiB**",
        "peak at",
    ]
    table = []
    for est, setting in rows:
        cells = [est.model, method_label(est.method, setting)] + [gib(est.components[c]) for c in COMPONENTS]
        table.append(cells + [f"**{gib(est.peak_bytes)}**", est.peak_at])
    return markdown_table(headers, table, align="ll" + "r" * 9 + "l")


def totals_markdown(rows: list[tuple[Estimate, Setting]]) -> str:
    """Compact: one row per model, one column per method, total GiB."""
    labels, models, cells = [], [], {}
    for est, setting in rows:
        label = method_label(est.method, setting)
        labels += [label] if label not in labels else []
        models += [est.model] if est.model not in models else []
        cells[est.model, label] = gib(est.peak_bytes)
    table = [[m] + [cells.get((m, label), "–") for label in labels] for m in models]
    return markdown_table(["model", *labels], table, align="l" + "r" * len(labels))


# ---------------------------------------------------------------- validation against bench_step.py (CPU)

BENCH_TO_MODEL = {
    "spiel-ma": "spiel-ma",
    "spiel-ag": "spiel-ag",
    "smt": "smt",
    "sift": "sift",
    "lora-r16": "lora",
    "full": "full",
}
# bench_step.py's overrides: SMT and SIFT choose on their first step.
BENCH_SETTING = Setting(batch=4, seq=128, dtype="fp32", device="cpu", sift_selection_steps=1)
RUNTIME_SCRIPT = r"""
import gc, sys, json
from pathlib import Path
def rss():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(l for l in status if l.startswith("VmRSS")).split()[1]) / 1024
from tools.benchmarks.methods import load_base
import torch
model, _ = load_base(); gc.collect()
start = rss()
family = sys.argv[1]
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000)
torch.manual_seed(0)
m = LlamaForCausalLM(cfg)
if family == "sparse":
    import sparse_plugin
    m = sparse_plugin.prepare_model(m, sparse_plugin.SparseConfig(lora_rank_equivalent=4))
    opt = sparse_plugin.SM3(m, lr=1e-3, total_steps=100)
elif family == "peft":
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])
else:
    opt = torch.optim.AdamW(m.parameters())
ids = torch.randint(1000, (4, 128))
for _ in range(2):
    m(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
print(json.dumps({"runtime_mb": rss() - start}))
"""


def measure_runtime(family: str) -> float:
    """RSS growth from importing a method's library and running two steps of a tiny Llama with it, after
    loading the bundled model as bench_step.py does: code pages, imports, thread pools (no model-sized data)."""
    root = Path(__file__).resolve().parents[2]  # where `python -c` finds the `tools` package
    done = subprocess.run(
        [sys.executable, "-c", RUNTIME_SCRIPT, family],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"runtime probe ({family}) failed: {done.stderr.strip()[-400:]}")
    return json.loads(lines[-1])["runtime_mb"]


def bench_rows(path: str) -> dict[str, dict]:
    """bench_step.py `--json` rows by method (other lines, e.g. its markdown table, are skipped)."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            if row.get("method") in BENCH_TO_MODEL and "peak_mem_mb" in row:
                rows[row["method"]] = row
    return rows


def compare(paths: str | list[str], runtime: dict[str, float] | None) -> tuple[str, list[dict]]:
    """Predicted vs measured `peak_mem_mb` (peak RSS over the loaded model) of bench_step.py JSON lines, one
    measured column per file (e.g. glibc's default malloc, and a run under MALLOC_MMAP_THRESHOLD_)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    runs = [(Path(p).stem, bench_rows(p)) for p in paths]
    methods = [m for m in BENCH_TO_MODEL if any(m in rows for _, rows in runs)]
    header = ["method", "model MB", "runtime MB", "predicted MB"]
    for name, _ in runs:
        header += [f"measured MB ({name})", "error"]
    table = []
    out = []
    for bench_method in methods:
        method = BENCH_TO_MODEL[bench_method]
        est = estimate("smollm2", method, BENCH_SETTING)
        family = "sparse" if method in SPARSE else ("peft" if method == "lora" else "torch")
        extra = runtime.get(family, 0.0) if runtime else 0.0
        model_mb = (est.peak_bytes - est.components["weights"]) / MIB  # bench_step counts RSS over the loaded model
        predicted = model_mb + extra
        cells = [bench_method, f"{model_mb:.0f}", f"{extra:.0f}", f"{predicted:.0f}"]
        for name, rows in runs:
            row = rows.get(bench_method)
            if row is None:
                cells += ["–", "–"]
                continue
            measured = row["peak_mem_mb"]
            error = (predicted - measured) / measured
            out.append(
                {
                    "method": bench_method,
                    "run": name,
                    "predicted_model_mb": round(model_mb, 1),
                    "runtime_mb": round(extra, 1),
                    "predicted_mb": round(predicted, 1),
                    "measured_mb": measured,
                    "error": round(error, 4),
                    "error_without_runtime": round((model_mb - measured) / measured, 4),
                    "peak_at": est.peak_at,
                    "components_mb": {k: round(v / MIB, 1) for k, v in est.components.items()},
                }
            )
            cells += [f"{measured:.0f}", f"{100 * error:+.1f}%"]
        table.append(cells + [est.peak_at])
    return markdown_table(header + ["peak at"], table, align="l" + "r" * (len(header) - 1) + "l"), out


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=",".join(TABLE_MODELS),
        help=f"comma-separated, of {', '.join(ARCHS)} (default: %(default)s)",
    )
    parser.add_argument("--methods", default=",".join(MODELLED_METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation / compute dtype")
    parser.add_argument("--base", choices=["fp32", "bf16", "fp16", "nf4"], help="frozen weights (default: --dtype)")
    parser.add_argument("--values-dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    parser.add_argument(
        "--adapter-dtype",
        choices=sorted(DTYPE_BYTES),
        default="fp32",
        help="LoRA A/B dtype (PEFT's default autocast_adapter_dtype=True: fp32)",
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default=None, help="code paths (default: cpu for fp32, cuda otherwise)"
    )
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing of every layer")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank and the sparse budget's LoRA equivalent")
    parser.add_argument("--sift-selection-steps", type=int, default=4)
    parser.add_argument("--sm3-momentum", action="store_true")
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="FSDP world size: per-rank memory with the base sharded over this many GPUs",
    )
    parser.add_argument(
        "--no-nf4-rows", action="store_true", help="omit the QSpIEL-MA / QLoRA rows of the default table"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per row before the table")
    parser.add_argument("--totals", action="store_true", help="compact table: total GiB, models × methods")
    parser.add_argument(
        "--compare",
        metavar="JSONL",
        nargs="+",
        help="bench_step.py --json outputs (one measured column each): predicted vs measured, CPU",
    )
    parser.add_argument(
        "--measure-runtime",
        action="store_true",
        help="with --compare: measure the library/runtime RSS term (3 small subprocesses)",
    )
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards must be at least 1 (the number of GPUs FSDP shards over), got {args.shards}")

    if args.compare:
        runtime = None
        if args.measure_runtime:
            runtime = {family: round(measure_runtime(family), 1) for family in ("torch", "sparse", "peft")}
        table, rows = compare(args.compare, runtime)
        if args.json:
            for row in rows:
                print(json.dumps(row))
            if runtime:
                print(json.dumps({"runtime_mb": runtime}))
        print(table)
        return 0

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in models:
        if name not in ARCHS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(ARCHS)}")
    device = args.device or ("cpu" if args.dtype == "fp32" else "cuda")
    setting = Setting(
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        base=args.base,
        values_dtype=args.values_dtype,
        adapter_dtype=args.adapter_dtype,
        checkpointing=args.checkpointing,
        device=device,
        lora_rank=args.rank,
        sift_selection_steps=args.sift_selection_steps,
        sm3_momentum=args.sm3_momentum,
        shards=args.shards,
    )
    plan = [(setting, m) for m in methods]
    if args.base is None and args.dtype != "fp32" and not args.no_nf4_rows:
        nf4 = Setting(**{**asdict(setting), "base": "nf4"})
        plan += [(nf4, m) for m in ("spiel-ma", "lora") if m in methods]
    rows = []
    for name in models:
        for s, method in plan:
            est = estimate(name, method, s)
            rows.append((est, s))
            if args.json:
                print(
                    json.dumps(
                        {
                            **asdict(est),
                            "label": method_label(method, s),
                            "peak_gib": round(est.peak_bytes / GIB, 3),
                            "components_gib": {k: round(v / GIB, 3) for k, v in est.components.items()},
                        }
                    )
                )
    ckpt = "with" if setting.checkpointing else "without"
    where = f"per GPU with FSDP over {setting.shards} GPUs" if setting.shards > 1 else "one process"
    print(
        f"batch {setting.batch} × seq {setting.seq}, {setting.dtype} activations, {ckpt} gradient checkpointing, "
        f"sparse budget = LoRA r{setting.lora_rank} on all linear layers; GiB at the peak moment, {where}"
    )
    print()
    print(totals_markdown(rows) if args.totals else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
