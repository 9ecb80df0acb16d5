"""Memory model of a fine-tuning step on a mixture-of-experts decoder with fused experts (Qwen3-MoE): SpIEL-MA (SM3)
and SpIEL-AG (SparseAdamW) on the fused expert tensors vs PEFT LoRA on the same tensors (`target_parameters`).

The dense-model terms and conventions are `memory_model.py`'s (read its docstring first); this module adds what an
MoE layer changes. Pure arithmetic (no torch import); `tests/tools/test_memory_model_moe.py` checks the activation
term byte for byte against what autograd saves on two tiny Qwen3-MoE models (sparse and LoRA, fp32 and bf16
autocast) and the whole estimate against a measured CPU peak on a small one.

Usage (from the repository root):

    .venv/bin/python -m tools.benchmarks.memory_model_moe                        # Qwen3-30B-A3B, bf16, 1 × 2048, checkpointing
    .venv/bin/python -m tools.benchmarks.memory_model_moe --base nf4 --json      # attention in 4-bit (what bnb quantises)
    .venv/bin/python -m tools.benchmarks.memory_model_moe --measure --model small-moe --rank 4 --batch 4 --seq 256
        # predicted vs measured peak RSS over the fp32 base on CPU (also --model wide-experts --batch 1 --seq 128)

Targets: `target_modules="all-weights"`, i.e. per layer the attention projections q, k, v, o (`nn.Linear`), the
router's weight `[E, h]` and the fused experts `gate_up_proj [E, 2i, h]` and `down_proj [E, h, i]`
(`SparseDeltaParameter`); LoRA targets the same: `target_modules=[q,k,v,o]_proj`, `target_parameters=[gate.weight,
experts.gate_up_proj, experts.down_proj]`. The budget K is LoRA rank r's count on them: r·(in + out) per matrix,
r·E·(in + out) per expert tensor (PEFT's `ParamWrapper` makes one A, B pair per expert: `lora_A` [r·E, in],
`lora_B` [out, r·E]).

Notation as in memory_model.py, plus E experts, i the experts' intermediate size, k experts per token, S = k·T
routed (token, expert) pairs, n_kv kv heads.

What an MoE layer adds or changes (bytes):

* weights: bitsandbytes quantises `nn.Linear` only, so with a 4-bit base only attention is NF4; the router (a bare
  `nn.Parameter`) and the fused 3-D experts stay in the compute dtype: 97% of Qwen3-30B-A3B stays bf16.
* indices and optimizer: a fused tensor `[E, out, in]` is one (E·out × in) matrix whose columns are counted per
  expert: int32 positions, CSR row pointers 4·(E·out + 1), W0's entry per position (the weight is merged-resident:
  it holds W0 + Δ whatever the attention's base is); SM3's accumulators per (expert, row) and (expert, column):
  4·E·(out + in) + a step. SparseAdamW 10 B per value as for dense layers.
* activations, per token and layer (autograd's saved tensors, checked): the two RMSNorms 2·(4h + 4); Qwen3's
  q/k norms 4·(d_q + d_kv) + 4·(n_h + n_kv) (fp32 input and rsqrt per head); q, k, v and the attention output
  a·(2·d_q + 2·d_kv), SDPA's log-sum-exp 4·n_h; the input of q/k/v and of the router a·h each (trained); the
  router's fp32 softmax 4E and top-k indices 8k; per routed pair (k per token): three int64 permutations 24, the
  gathered input a·h, gate_up's output a·2i, SiLU's output and down's input a·2i, down's output a·h and the routing
  weight a; per layer and step the int32 offsets 4E. LoRA (PEFT `ParamWrapper`): the experts see W + s·B·A,
  computed by one `baddbmm` per forward (no separate delta tensor, but a new dense tensor the size of the whole
  expert stack, in the base dtype) that grouped_mm saves for its backward: a·E·3·i·h per layer, as large as the
  frozen experts themselves, kept for every layer without gradient checkpointing; the router's W + ΔW a·E·h; A's
  outputs a·r per adapted Linear; under bf16 autocast with fp32 adapters also PEFT's re-cast input per Linear
  a·(3h + d_q) in place of a·h, bf16 casts of A and B (per step; for the experts those baddbmm saves, the
  router's B·A operands), and no casts in fp32.
* transient in a layer's backward: the gradient of one whole expert tensor, E·m·n in its dtype, made by
  grouped_mm's backward (ours then gathers it at the positions, SpIEL-AG while gathering also takes an fp32 copy and
  |g|: +8·E·m·n; LoRA reduces it through the baddbmm to A and B), plus the MoE block's gradient buffers
  a·(2h + 3i) per routed pair.

Not modelled here: SIFT and SMT, full fine-tuning, FSDP (a non-Linear target is refused under FSDP), shared experts
and dense MLP layers (Qwen3-MoE has neither), load-balancing loss (off unless `output_router_logits`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sparse_plugin.sizing import SCORE_CHUNK, share_budget
from tools.benchmarks.common import markdown_table
from tools.benchmarks.memory_model import (
    COMPONENTS,
    DTYPE_BYTES,
    GIB,
    MIB,
    NF4_BYTES_PER_PARAM,
    Estimate,
    Setting,
    loss_backward_transient,
)

MOE_METHODS = ("spiel-ma", "spiel-ag", "lora")
LABELS = {"spiel-ma": "SpIEL-MA (SM3)", "spiel-ag": "SpIEL-AG (SparseAdamW)", "lora": "LoRA"}


@dataclass(frozen=True)
class MoEArch:
    """A Qwen3-MoE decoder: every layer attention (with q/k RMSNorm) + a top-k router over fused experts."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    experts: int
    moe_intermediate: int
    top_k: int
    tied: bool = False

    @property
    def d_q(self) -> int:
        return self.heads * self.head_dim

    @property
    def d_kv(self) -> int:
        return self.kv_heads * self.head_dim

    def attention_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of q, k, v, o."""
        h = self.hidden
        return [(self.d_q, h), (self.d_kv, h), (self.d_kv, h), (h, self.d_q)]

    def expert_shapes(self) -> list[tuple[int, int, int]]:
        """(E, out, in) of the fused gate_up_proj and down_proj."""
        e, h, i = self.experts, self.hidden, self.moe_intermediate
        return [(e, 2 * i, h), (e, h, i)]

    def layer_targets(self) -> list[tuple[int, int, int]]:
        """(matrices, out, in) of one layer's targets: attention, router, experts."""
        return (
            [(1, o, i) for o, i in self.attention_shapes()] + [(1, self.experts, self.hidden)] + self.expert_shapes()
        )

    @property
    def attention_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.attention_shapes())

    @property
    def other_params(self) -> int:
        """Routers, experts, norms (2 per layer + q/k norms + final), embeddings and head: what bnb leaves alone."""
        h = self.hidden
        per_layer = self.experts * h + sum(e * o * i for e, o, i in self.expert_shapes()) + 2 * h + 2 * self.head_dim
        return self.layers * per_layer + h + self.vocab * h * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.attention_params + self.other_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the E - k experts it is not routed to."""
        unused = (self.experts - self.top_k) * sum(o * i for _, o, i in self.expert_shapes())
        return self.params - self.layers * unused


ARCHS = {
    # Qwen/Qwen3-30B-A3B config.json
    "qwen3-30b-a3b": MoEArch("Qwen3-30B-A3B", 2048, 48, 32, 4, 128, 151936, 128, 768, 8),
    # The small models of the measured check (built in code, `--measure --model small-moe`).
    "small-moe": MoEArch("small-moe", 256, 4, 4, 2, 64, 4096, 8, 512, 2),
    # Many wide experts, few tokens: the peak is inside a layer's backward (one expert tensor's dense gradient).
    "wide-experts": MoEArch("wide-experts", 256, 2, 4, 2, 64, 1024, 64, 256, 2),
}


def lora_params(arch: MoEArch, rank: int) -> int:
    """LoRA's trainable count on all targets: r·(in + out) per matrix, one pair per expert (also the budget K)."""
    return arch.layers * sum(rank * m * (o + i) for m, o, i in arch.layer_targets())


def target_sizes(arch: MoEArch) -> list[int]:
    return [m * o * i for m, o, i in arch.layer_targets()] * arch.layers


def weight_bytes(arch: MoEArch, setting: Setting) -> int:
    """The frozen model; NF4 reaches only the attention's `nn.Linear`s (bnb skips bare and 3-D parameters)."""
    a = DTYPE_BYTES[setting.dtype]
    base = setting.base_dtype
    attention = NF4_BYTES_PER_PARAM if base == "nf4" else DTYPE_BYTES[base]
    return round(arch.attention_params * attention) + arch.other_params * DTYPE_BYTES.get(base, a)


def sparse_index_bytes(arch: MoEArch, setting: Setting, k_total: int) -> int:
    """int32 positions, CSR row pointers per (matrices·out) rows, and W0's entry at each position where the weight
    is merged-resident: always for router and experts (in their dtype), for attention unless its base is NF4."""
    counts = share_budget(target_sizes(arch), k_total)
    attention = DTYPE_BYTES.get(setting.base_dtype, 0)  # NF4: the additive path keeps no entries
    rest = DTYPE_BYTES.get(setting.base_dtype, DTYPE_BYTES[setting.dtype])
    per_layer = len(arch.attention_shapes())
    entries = sum(k * (attention if n % len(arch.layer_targets()) < per_layer else rest) for n, k in enumerate(counts))
    return 4 * k_total + entries + arch.layers * sum(4 * (m * o + 1) for m, o, _ in arch.layer_targets())


def sm3_state_bytes(arch: MoEArch) -> int:
    """fp32 accumulators per (expert, row) and (expert, column) and a step, per target tensor."""
    return arch.layers * sum(4 * (m * (o + i) + 1) for m, o, i in arch.layer_targets())


# ---------------------------------------------------------------- activations


def layer_activation_bytes(arch: MoEArch, setting: Setting, method: str) -> int:
    """Bytes autograd saves per token in one MoE decoder layer (per-step terms in `per_layer_step_bytes`)."""
    h, e, k, a = arch.hidden, arch.experts, arch.top_k, DTYPE_BYTES[setting.dtype]
    norms = 2 * (4 * h + 4) + 4 * (arch.d_q + arch.d_kv) + 4 * (arch.heads + arch.kv_heads)
    attention = a * (2 * arch.d_q + 2 * arch.d_kv) + 4 * arch.heads
    inputs = 2 * a * h  # q/k/v's and the router's (a trained Linear / router weight keeps its input)
    router = 4 * e + 8 * k
    routed = routed_activation_bytes(arch, setting)
    extra = 0
    if method == "lora":
        extra = 4 * a * setting.lora_rank  # A's output per adapted Linear
        if setting.adapter_dtype != setting.dtype:  # PEFT re-casts each Linear's input: q, k, v (h), o (d_q)
            extra += a * (2 * h + arch.d_q)
    return norms + attention + inputs + router + routed + extra


def routed_activation_bytes(arch: MoEArch, setting: Setting) -> int:
    """Per token and layer, the experts' saved tensors: k routed pairs of three int64 permutations, the gathered
    input, gate_up's output, SiLU's output, down's input and output, the routing weight."""
    a, h, i = DTYPE_BYTES[setting.dtype], arch.hidden, arch.moe_intermediate
    return arch.top_k * (24 + a * (2 * h + 4 * i + 1))


def per_layer_step_bytes(arch: MoEArch, setting: Setting, method: str, first: bool = False) -> int:
    """Saved tensors of one layer that do not scale with tokens: grouped_mm's int32 offsets; LoRA's W + ΔW of both
    expert tensors and the router (base dtype) and, under autocast with fp32 adapters, the bf16 casts of its
    factors (the first layer's q/k/v A casts are not saved: their input needs no gradient)."""
    e, h, r = arch.experts, arch.hidden, setting.lora_rank
    b = 4 * e
    if method != "lora":
        return b
    w = DTYPE_BYTES.get(setting.base_dtype, DTYPE_BYTES[setting.dtype])
    b += w * (sum(m * o * n for m, o, n in arch.expert_shapes()) + e * h)
    if setting.adapter_dtype != setting.dtype:
        a = DTYPE_BYTES[setting.dtype]
        casts = sum(r * (o + n) for o, n in arch.attention_shapes()) - (3 * r * h if first else 0)
        casts += sum(r * m * (o + n) for m, o, n in arch.expert_shapes()) + r * (e + h)
        b += a * casts
    return b


def outside_activation_bytes(arch: MoEArch, setting: Setting) -> int:
    """Per token: final norm, fp32 log-softmax, labels, minus the first layer's input norm (frozen embeddings)."""
    return 4 * arch.vocab + 8


def activation_bytes(arch: MoEArch, setting: Setting, method: str) -> int:
    """All saved activations of a step without checkpointing."""
    t = setting.tokens
    per_step = 2 * DTYPE_BYTES[setting.dtype] * setting.seq * arch.head_dim + 4  # RoPE cos, sin; nll's weight
    layers = sum(per_layer_step_bytes(arch, setting, method, first=n == 0) for n in range(arch.layers))
    return (
        arch.layers * layer_activation_bytes(arch, setting, method) * t
        + layers
        + outside_activation_bytes(arch, setting) * t
        + per_step
    )


# ---------------------------------------------------------------- transients and the estimate


def layer_backward_transient(arch: MoEArch, setting: Setting, method: str, regime: str) -> int:
    """One layer's backward: the MoE block's gradient buffers per routed pair, and the dense gradients of the
    expert tensors (their dtype) made by grouped_mm's backward.

    Ours: each expert tensor's alias (`SparseParameterFunction`) is made in the experts' forward pre-hook, before
    any grouped_mm, so autograd runs its backward after both grouped_mm backwards: the dense gradients of gate_up and
    down are alive together while down's is gathered (down's alias is made last, so it runs first), then gate_up's
    alone; SpIEL-AG while gathering adds the fp32 copy (bf16 base) and |g| of the tensor it gathers, + top-k.
    LoRA: each W + ΔW's gradient goes through its baddbmm at once; by gate_up's backward down's W + ΔW, saved by
    its grouped_mm, is freed."""
    a = DTYPE_BYTES[setting.dtype]
    w = DTYPE_BYTES.get(setting.base_dtype, a)
    gate_up, down = (m * o * i for m, o, i in arch.expert_shapes())
    buffers = a * (2 * arch.hidden + 3 * arch.moe_intermediate) * arch.top_k * setting.tokens
    if setting.base_dtype == "nf4":  # bitsandbytes' dequantised attention weight, rebuilt per call
        buffers += a * max(o * i for o, i in arch.attention_shapes())
    if method == "lora":
        return buffers + max(w * down, w * gate_up - w * down)

    def gathering(numel: int) -> int:  # the first gathering micro-batch: top-k of |g| picks the candidates
        if method != "spiel-ag" or regime != "gather":
            return 0
        k = lora_params(arch, setting.lora_rank) * numel // sum(target_sizes(arch))  # its share of the budget
        return (4 * numel if w != 4 else 0) + 4 * numel + topk_bytes(numel, k, setting.device)

    return buffers + max(w * (gate_up + down) + gathering(down), w * gate_up + gathering(gate_up))


def topk_bytes(numel: int, k: int, device: str) -> int:
    """torch.topk's buffers: on CPU a (value, int64 index) copy of the whole input, ~16 B per element (measured
    at 4-8M elements); on CUDA the k values and int64 indices."""
    return 16 * numel if device == "cpu" else 12 * k


def optimizer_step_transient(arch: MoEArch, setting: Setting, method: str, k_max: int) -> int:
    """LoRA's AdamW temporaries; an MA round's chunk of r_i·c_j scores (fused experts also gather each row's
    expert columns, as large) with its top-k, and prune/regrow buffers; an AG round's ~60 B per value."""
    if method == "lora":  # torch's single-tensor AdamW on CPU: sqrt(v) and the quotient of the largest factor
        largest = max(setting.lora_rank * m * max(o, i) for m, o, i in arch.layer_targets())
        return 0 if setting.device == "cuda" else 8 * largest
    if method == "spiel-ma":
        chunk = min(SCORE_CHUNK, max(m * o * i for m, o, i in arch.expert_shapes()))
        return 8 * chunk + topk_bytes(chunk, k_max, setting.device) + 48 * k_max
    return 60 * k_max


def estimate(arch: MoEArch | str, method: str, setting: Setting | None = None) -> Estimate:
    """Peak memory of one training step of `method` on the MoE `arch` under `setting`."""
    arch = ARCHS[arch] if isinstance(arch, str) else arch
    setting = setting or Setting()
    if method not in MOE_METHODS:
        raise ValueError(f"unknown MoE method {method!r}; choose from {', '.join(MOE_METHODS)}")
    if setting.shards != 1:
        raise ValueError("`shards` > 1: a non-Linear target is refused under FSDP; estimate DDP (shards=1) instead")
    a, t, n_layers = DTYPE_BYTES[setting.dtype], setting.tokens, arch.layers
    k_total = lora_params(arch, setting.lora_rank)
    counts = share_budget(target_sizes(arch), k_total)
    if method == "lora":
        ab = DTYPE_BYTES[setting.adapter_dtype]
        trained, indices = ab * k_total, 0
        tensors = 2 * n_layers * len(arch.layer_targets())
        opt = 2 * ab * k_total + 4 * tensors
    else:
        trained, indices = DTYPE_BYTES[setting.values_dtype] * k_total, sparse_index_bytes(arch, setting, k_total)
        opt = sm3_state_bytes(arch) if method == "spiel-ma" else 10 * k_total
    grads = trained
    regimes = {"steady": 0} | ({"gather": 8 * k_total} if method == "spiel-ag" else {})
    layer_act = layer_activation_bytes(arch, setting, method) * t + per_layer_step_bytes(arch, setting, method)
    outside = activation_bytes(arch, setting, method) - n_layers * layer_act
    if setting.checkpointing:
        below_per_layer, rebuilt = a * arch.hidden * t, layer_act
    else:
        below_per_layer, rebuilt = layer_act, 0
    # Ours: by the time the expert tensors' gradients are gathered, the layer's routed part has been
    # back-propagated (its nodes come later in the forward than the aliases), its saved tensors freed.
    routed = 0 if method == "lora" else routed_activation_bytes(arch, setting) * t + 4 * arch.experts
    moments: dict[str, dict[str, int]] = {}
    for regime, selection in regimes.items():
        base = {"weights": weight_bytes(arch, setting), "trained": trained, "indices": indices, "optimizer": opt}
        base["selection"] = selection
        suffix = "" if regime == "steady" else f" ({regime})"
        moments["loss backward" + suffix] = {
            **base,
            "grads": 0,
            "activations": n_layers * below_per_layer + outside,
            "transient": loss_backward_transient(arch, setting),
        }
        worst = None
        for layer in range(n_layers - 1, -1, -1):  # top down: the activations below, the gradients above
            moment = {
                **base,
                "grads": grads * (n_layers - 1 - layer) // n_layers,
                "activations": (layer + 1) * below_per_layer + rebuilt + outside - 4 * arch.vocab * t - routed,
                "transient": layer_backward_transient(arch, setting, method, regime),
            }
            if worst is None or sum(moment.values()) > sum(worst.values()):
                worst = moment
        moments["layer backward" + suffix] = worst
        moments["optimizer step" + suffix] = {
            **base,
            "grads": grads,
            "activations": 0,
            "transient": optimizer_step_transient(arch, setting, method, max(counts)),
        }
    totals = {name: sum(c.values()) for name, c in moments.items()}
    peak_at = max(totals, key=totals.get)
    components = {key: int(moments[peak_at].get(key, 0)) for key in COMPONENTS}
    notes = []
    if setting.base_dtype == "nf4":
        notes.append("4-bit: only attention's nn.Linear weights are NF4; router and fused experts stay bf16")
    return Estimate(arch.name, method, asdict(setting), totals[peak_at], peak_at, components, totals, k_total, notes)


# ---------------------------------------------------------------- measured check (CPU)

MEASURE_SCRIPT = r"""
import gc, json, sys
from pathlib import Path
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
import sparse_plugin

def status(key):
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key)).split()[1])

arch, method, rank, batch, seq, steps = json.loads(sys.argv[1])

def build(a):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
        moe_intermediate_size=a["moe_intermediate"], num_hidden_layers=a["layers"], num_attention_heads=a["heads"],
        num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"], num_experts=a["experts"],
        num_experts_per_tok=a["top_k"], max_position_embeddings=seq, tie_word_embeddings=a["tied"])
    model = Qwen3MoeForCausalLM(config).train()
    model.set_experts_implementation("grouped_mm")
    return model

def prepare(model):
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["gate.weight", "experts.gate_up_proj", "experts.down_proj"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    regrow = "ma" if method == "spiel-ma" else "ag"
    config = sparse_plugin.SparseConfig(lora_rank_equivalent=rank, target_modules="all-weights", regrow=regrow,
                                        reselection_steps=2, selection_accumulation_steps=1)
    model = sparse_plugin.prepare_model(model, config)
    cls = sparse_plugin.SM3 if method == "spiel-ma" else sparse_plugin.SparseAdamW
    return model, cls(model, lr=1e-4, total_steps=1000)

def train(model, optimizer, vocab, n):
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(vocab, (batch, seq), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

# Warm-up on a tiny copy: code pages, imports and thread pools are not the model's memory.
tiny = dict(arch, hidden=64, layers=1, vocab=128, moe_intermediate=64, heads=2, kv_heads=1, head_dim=32)
m, o = prepare(build(tiny)); train(m, o, 128, 2); del m, o; gc.collect()
model = build(arch); gc.collect()
start = status("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
model, optimizer = prepare(model)
train(model, optimizer, arch["vocab"], steps)
print(json.dumps({"measured_mb": (status("VmHWM") - start) / 1024}))
"""


def measure_peak(arch: MoEArch, method: str, rank: int, batch: int, seq: int, steps: int = 2) -> float:
    """Peak RSS (MiB) over the loaded fp32 base of `steps` training steps of `method` on `arch`, in a fresh CPU
    process whose freed tensors go back to the system (glibc's mmap threshold fixed at 128 KiB, one thread).
    SpIEL reselects every 2 steps, so step 2 holds SpIEL-AG's gathering and an MA / AG round."""
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    args = json.dumps([asdict(arch), method, rank, batch, seq, steps])
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_SCRIPT, args], capture_output=True, text=True, cwd=root, check=False, env=env
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"measurement of {method} failed: {done.stderr.strip()[-600:]}")
    return json.loads(lines[-1])["measured_mb"]


def predicted_over_weights(arch: MoEArch, method: str, rank: int, batch: int, seq: int) -> tuple[float, Estimate]:
    """The estimate of `measure_peak`'s quantity: the peak minus the loaded weights, MiB (fp32, CPU)."""
    est = estimate(arch, method, Setting(batch=batch, seq=seq, dtype="fp32", device="cpu", lora_rank=rank))
    return (est.peak_bytes - est.components["weights"]) / MIB, est


# ---------------------------------------------------------------- CLI


def rows_markdown(rows: list[Estimate]) -> str:
    headers = ["model", "method", "base", *COMPONENTS, "**total GiB**", "peak at"]
    table = []
    for est in rows:
        base = "NF4 attention" if est.setting["base"] == "nf4" else est.setting["dtype"]
        cells = [f"{est.components[c] / GIB:.2f}" for c in COMPONENTS]
        table.append([est.model, LABELS[est.method], base, *cells, f"**{est.peak_bytes / GIB:.2f}**", est.peak_at])
    return markdown_table(headers, table, align="lll" + "r" * (len(COMPONENTS) + 1) + "l")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(ARCHS))
    parser.add_argument("--methods", default=",".join(MOE_METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="activation / compute dtype")
    parser.add_argument("--base", choices=["bf16", "fp16", "fp32", "nf4"], help="frozen weights (default: --dtype)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank and the sparse budget's LoRA equivalent")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every layer's activations")
    parser.add_argument("--json", action="store_true", help="one JSON object per row before the table")
    parser.add_argument(
        "--measure", action="store_true", help="predicted vs measured peak RSS over the fp32 base on CPU (--model)"
    )
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in MOE_METHODS]
    if bad:
        parser.error(f"unknown --methods {bad}; choose from {', '.join(MOE_METHODS)}")
    arch = ARCHS[args.model]
    if args.measure:
        table = []
        for method in methods:
            measured = measure_peak(arch, method, args.rank, args.batch, args.seq)
            predicted, est = predicted_over_weights(arch, method, args.rank, args.batch, args.seq)
            if args.json:
                row = {"model": arch.name, "method": method, "predicted_mb": round(predicted, 1)}
                print(json.dumps(row | {"measured_mb": round(measured, 1), "peak_at": est.peak_at}))
            error = f"{100 * (predicted - measured) / measured:+.1f}%"
            table.append([arch.name, LABELS[method], f"{predicted:.1f}", f"{measured:.1f}", error, est.peak_at])
        headers = ["model", "method", "predicted MiB", "measured MiB", "error", "peak at"]
        print(markdown_table(headers, table, align="llrrrl"))
        return 0
    device = "cpu" if args.dtype == "fp32" else "cuda"
    common = {"batch": args.batch, "seq": args.seq, "dtype": args.dtype, "lora_rank": args.rank, "device": device}
    setting = Setting(**common, base=args.base, checkpointing=not args.no_checkpointing)
    plan = [(setting, m) for m in methods]
    if args.base is None and args.dtype != "fp32":
        nf4 = Setting(**common, base="nf4", checkpointing=setting.checkpointing)
        plan += [(nf4, m) for m in ("spiel-ma", "lora") if m in methods]
    rows = [estimate(arch, method, s) for s, method in plan]
    if args.json:
        for est in rows:
            print(json.dumps({**asdict(est), "peak_gib": round(est.peak_bytes / GIB, 3)}))
    ckpt = "with" if setting.checkpointing else "without"
    print(
        f"{arch.name}: {arch.params / 1e9:.1f}B parameters ({arch.active_params / 1e9:.1f}B active), batch "
        f"{args.batch} × seq {args.seq}, {args.dtype}, {ckpt} gradient checkpointing, budget = LoRA r{args.rank} on "
        f"attention, routers and experts ({lora_params(arch, args.rank) / 1e6:.0f}M); GiB at the peak moment"
    )
    print()
    print(rows_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
