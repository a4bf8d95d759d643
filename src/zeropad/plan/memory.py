"""Memory planner: a training run's memory per device, predicted from its config alone.

Model states follow the ZeRO paper (Rajbhandari et al. 2020, sec. 3 and 5): with Ψ parameters in
mixed precision, parameters 2Ψ + gradients 2Ψ + optimizer state KΨ bytes (K = 12 for Adam: fp32
master weights, momentum, variance); ZeRO-1/2/3 shard the optimizer state / + gradients /
+ parameters over Nd devices. Activations are counted tensor by tensor: what autograd saves for
backward in a Hugging Face decoder layer (modeling_qwen3.py, modeling_llama.py, modeling_qwen3_moe.py)
as zeropad runs it, per token, so they scale with T = pack.max_tokens and nothing else.

Sequence parallelism (parallel.sp_size = K, parallel/ulysses.py) gives each device ceil(T/K) of the pack's
tokens: everything outside attention, the loss included, is per local token. Attention saves its q, k, v,
output and log-sum-exp in the head-scattered layout (T tokens x H/K heads: the bytes of T/K tokens x H
heads), the all-to-all outputs themselves (the all-to-alls save nothing of their own); KV heads fewer than
K are repeated to K first. The returned output is a new tensor, o_proj's saved input, on every backend.
Model states are sharded over all devices (DP x SP) as without SP.

Names: T tokens per micro-step, V vocab, H hidden, I intermediate, Ψ parameters, c compute bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from zeropad.plan.arch import Arch

GB = 1e9  # decimal, as in the ZeRO paper and GPU datasheets
# CUDA context and cuBLAS workspaces, which torch.cuda.max_memory_allocated does not see: measured
# 0.84-0.89 GB on an H100 (torch 2.11, benchmarks/RESULTS.md). A stated constant, not modelled.
FRAMEWORK_OVERHEAD = 1.0 * GB


@dataclass(frozen=True)
class Precision:
    name: str
    param: int  # bytes per parameter as trained
    grad: int
    master: int  # fp32 master copy kept by the optimizer (mixed precision only)
    compute: int  # matmul and attention activations
    residual: int  # the residual stream between layers
    autocast: bool  # fp32 weights cast to bf16 op by op


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 0, 4, 4, autocast=False),
    "bf16": Precision("bf16", 4, 4, 0, 2, 4, autocast=True),  # zeropad's bf16: autocast, fp32 weights
    "mixed": Precision("mixed", 2, 2, 4, 2, 2, autocast=False),  # ZeRO paper: bf16 weights, fp32 master
}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "sgd": 4}  # fp32 moments per parameter: Adam m and v; momentum
# What each strategy shards over the devices. "offload" is FSDP with CPUOffloadPolicy: all three live
# on the host, and the device holds only the layers being computed.
STRATEGIES = {
    "none": (),
    "zero1": ("optimizer state",),
    "zero2": ("optimizer state", "gradients"),
    "zero3": ("optimizer state", "gradients", "parameters"),
    "offload": ("optimizer state", "gradients", "parameters"),
}


@dataclass(frozen=True)
class Setup:
    """How the run trains: everything besides the architecture that memory depends on."""

    precision: str = "fp32"
    optimizer: str = "adamw"
    strategy: str = "none"
    num_devices: int = 1
    checkpointing: str = "none"
    offload_activations: bool = False
    chunked_loss: bool = False
    loss_chunk_tokens: int = 1024
    grad_accum: int = 1
    replicate: int = 1  # HSDP: the devices form `replicate` groups; states are sharded within a group
    sp_size: int = 1  # sequence parallelism: the devices that share one pack, each holding 1/sp_size of it

    @property
    def shards(self) -> int:
        """Devices the sharded model states are divided over: all of them, or one HSDP replica's."""
        return self.num_devices // self.replicate

    def device_tokens(self, tokens: int) -> int:
        """Tokens of a `tokens` pack on one device: the largest of sp_size ranges (torch.tensor_split's sizes)."""
        return -(-tokens // self.sp_size)


@dataclass
class Component:
    name: str
    device: float  # bytes per device
    host: float = 0.0
    note: str = ""
    # "always", or the phase of a step it lives in: "fwd/bwd" (activations) or "step" (the optimizer's)
    phase: str = "always"


def model_states(num_params: int, setup: Setup, num_trainable: int | None = None) -> list[Component]:
    """Parameters, gradients and optimizer state per device (ZeRO paper, sec. 5.1-5.3 for stages
    1-3). Only trainable parameters (all, or LoRA's adapters) have gradients and optimizer state."""
    p = PRECISIONS[setup.precision]
    trainable = num_params if num_trainable is None else num_trainable
    optimizer_bytes = p.master + OPTIMIZER_STATE_BYTES[setup.optimizer]
    sizes = {
        "parameters": (p.param, num_params, f"{p.param} B/param"),
        "gradients": (p.grad, trainable, f"{p.grad} B/trained param"),
        "optimizer state": (optimizer_bytes, trainable, f"{setup.optimizer} {optimizer_bytes} B/trained param"
                            + (" incl. fp32 master" if p.master else "")),
    }
    rows = []
    for name, (per_param, count, note) in sizes.items():
        sharded = name in STRATEGIES[setup.strategy]
        total = per_param * count / (setup.shards if sharded else 1)
        note += f", sharded /{setup.shards}" if sharded and setup.shards > 1 else ""
        note += f" (HSDP: {setup.replicate} replicas)" if sharded and setup.replicate > 1 else ""
        # zeropad frees gradients after each optimizer step (zero_grad(set_to_none=True)): with one
        # micro-step they never meet the activations; with accumulation they are there all along.
        phase = "step" if name == "gradients" and setup.grad_accum == 1 else "always"
        if setup.strategy == "offload":
            rows.append(Component(name, 0.0, total, note + ", on host", phase))
        else:
            rows.append(Component(name, total, 0.0, note, phase))
    return rows


def host_per_rank(num_params: int, largest_tensor: int, setup: Setup, max_shard_bytes: int) -> dict[str, float]:
    """Host memory per rank outside the training step, in bytes (fp32 weights).

    load: sharded (FSDP on several devices, or cpu_offload), a rank holds its weight shards and, while reading,
      the same shards of transformers' loading copy plus one whole tensor (parallel/materialize.py); otherwise
      the whole model and one tensor being read.
    export: writing final/ holds one gathered weight per rank under FSDP (`export`), and on rank 0 one file of
      checkpoint.max_shard_size plus one weight (`export_rank0`; model/hf_writer.py)."""
    whole, tensor = 4.0 * num_params, 4.0 * largest_tensor
    sharded = setup.strategy in ("zero3", "offload") and (setup.num_devices > 1 or setup.strategy == "offload")
    shard = whole / setup.num_devices
    return {"load": 2 * shard + tensor if sharded else whole + tensor,
            "export": tensor if sharded else 0.0,
            "export_rank0": min(max_shard_bytes, whole) + tensor}


def _rmsnorm(width: int, rows: int, in_bytes: int) -> int:
    # HF RMSNorm upcasts: pow and mul save the fp32 input, rsqrt saves one fp32 per row, and the
    # weight multiply saves the normalised value cast back to the input dtype.
    return 4 * width + 4 * rows + in_bytes * width


def layer_bytes_per_token(a: Arch, p: Precision, moe: bool, sp_size: int = 1) -> tuple[dict, dict]:
    """Bytes autograd saves per (device-local) token in one decoder layer, without checkpointing: (the
    attention block and the norms around it, the MLP module)."""
    c, r = p.compute, p.residual
    norm_out = max(p.param, r)  # weight * normalised input promotes to the wider dtype
    H, nq, nkv = a.hidden, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim

    def linear_inputs(num_linears: int, width: int, in_bytes: int) -> int:
        # A Linear saves its input; under autocast each Linear saves its own bf16 copy of it.
        return num_linears * width * c if p.autocast and in_bytes > c else width * in_bytes

    attn = {"attention norm + q/k/v inputs": _rmsnorm(H, 1, r) + linear_inputs(3, H, norm_out)}
    if a.qk_norm:
        attn["q/k norms"] = _rmsnorm(nq, a.num_heads, c) + _rmsnorm(nkv, a.num_kv_heads, c)
    # RoPE saves only cos/sin (once per forward). Attention saves q, k, v, its output and a fp32
    # log-sum-exp per head; every kernel's output (the CPU one's too, laid out [T, H, D]) is o_proj's input as is.
    # Under SP the same bytes, head-scattered (T x H/K per device); a rank attends whole KV heads, repeated
    # when there are fewer than K, and o_proj saves the returning all-to-all's output.
    kv_attended = max(a.num_kv_heads, sp_size) * a.head_dim if sp_size > 1 else nkv
    attn["attention q, k, v, out, lse"] = (2 * nq + 2 * kv_attended) * c + 4 * a.num_heads
    attn["o_proj input"] = nq * c if sp_size > 1 else 0
    attn["mlp norm"] = _rmsnorm(H, 1, r)
    if moe:
        k = a.experts_per_token
        # Router: softmax saves fp32 probabilities, top-k its indices. Each routed copy of a token
        # saves its gathered input, gate_up, act, act*up and down outputs and the routing weight,
        # plus int64 permutation indices; transformers' grouped_mm experts compute in the weights'
        # dtype (autocast does not reach them).
        mlp = {"router": linear_inputs(1, H, norm_out) + 4 * a.num_experts + 12 * k,
               "experts": k * ((2 * H + 4 * a.moe_intermediate + 1) * p.param + 24)}
        if a.shared_intermediate:
            mlp["shared experts"] = linear_inputs(2, H, norm_out) + 4 * a.shared_intermediate * c
    else:
        # gate and up save the input, silu saves gate's output, the product saves both factors,
        # down saves the product.
        mlp = {"mlp": linear_inputs(2, H, norm_out) + 4 * a.intermediate * c}
    return attn, mlp


def _layer_flops_per_token(a: Arch, moe: bool) -> tuple[float, float]:
    """Forward matmul FLOPs per token of (attention block, MLP): what recomputing them costs."""
    nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    attn = 2 * a.hidden * (2 * nq + 2 * nkv)
    if not moe:
        return attn, 6 * a.hidden * a.intermediate
    experts = a.experts_per_token * a.moe_intermediate + a.shared_intermediate
    return attn, 2 * a.hidden * a.num_experts + 6 * a.hidden * experts


def checkpointed_layers(policy: str, num_layers: int) -> int:
    """How many decoder layers a policy wraps (model/checkpointing.py applies the same rule)."""
    if policy == "none":
        return 0
    if policy in ("full", "selective"):  # selective wraps the MLP of every layer
        return num_layers
    assert policy.startswith("every:"), f"resolve {policy!r} first"
    return len(range(0, num_layers, int(policy.split(":")[1])))


def recompute_fraction(a: Arch, policy: str) -> float:
    """Share of the layers' forward matmul FLOPs that backward recomputes under `policy`."""
    mix = [(a.num_layers - a.num_moe_layers, False), (a.num_moe_layers, True)]
    attn = sum(n * _layer_flops_per_token(a, moe)[0] for n, moe in mix)
    mlp = sum(n * _layer_flops_per_token(a, moe)[1] for n, moe in mix)
    if policy == "selective":
        return mlp / (attn + mlp)
    return checkpointed_layers(policy, a.num_layers) / a.num_layers


def per_layer_bytes(a: Arch, setup: Setup) -> tuple[float, float]:
    """Saved bytes per token of one decoder layer (mean over dense and MoE layers): (unwrapped,
    under the policy's wrapping). A wrapped module keeps only its input."""
    p = PRECISIONS[setup.precision]
    totals = []
    for moe in (False, True):
        attn, mlp = layer_bytes_per_token(a, p, moe, setup.sp_size)
        if setup.checkpointing == "selective":  # the MLP keeps its input, the mlp norm's output
            wrapped = sum(attn.values()) + a.hidden * max(p.param, p.residual)
        else:
            wrapped = a.hidden * p.residual  # the layer keeps its input, the residual stream
        totals.append((sum(attn.values()) + sum(mlp.values()), wrapped))
    (dense, dense_wrapped), (moe, moe_wrapped) = totals
    share = a.num_moe_layers / a.num_layers
    return (1 - share) * dense + share * moe, (1 - share) * dense_wrapped + share * moe_wrapped


def activations(a: Arch, setup: Setup, tokens: int) -> list[Component]:
    """Saved activations, loss buffers and the backward working set, for a pack of `tokens` per micro-step
    (of which a device holds `setup.device_tokens(tokens)`)."""
    p = PRECISIONS[setup.precision]
    T = setup.device_tokens(tokens)
    full, wrapped = per_layer_bytes(a, setup)
    num_wrapped = checkpointed_layers(setup.checkpointing, a.num_layers)
    layers = (a.num_layers - num_wrapped) * full + num_wrapped * wrapped
    # Outside the layers: int64 token ids (embedding) and targets (loss), RoPE cos/sin, the final norm.
    outside = 16 + 2 * a.head_dim * p.residual + _rmsnorm(a.hidden, 1, p.residual)
    fp32_logits = 4 * a.vocab
    if setup.chunked_loss:
        outside += a.hidden * max(p.param, p.residual)  # the chunked loss keeps the hidden state's gradient
    else:
        # lm_head saves its input (autocast: its bf16 copy); log_softmax saves its fp32 output.
        outside += a.hidden * (p.compute if p.autocast else max(p.param, p.residual)) + fp32_logits
    where = "host" if setup.offload_activations else "device"
    kept = f"{wrapped / 1024:.2f} if wrapped" if num_wrapped else "none wrapped"
    local = f"{T} tokens per device (sequence parallel x {setup.sp_size}); " if setup.sp_size > 1 else ""
    rows = [_placed(f"activations ({setup.checkpointing})", T * (layers + outside), where,
                    f"{local}KiB/token/layer: {full / 1024:.2f} full, {kept}"
                    + ("" if setup.chunked_loss else "; incl. T x V fp32 log-softmax"))]
    if p.autocast:
        # autocast caches a bf16 copy of each weight it casts, once per optimizer step (train/step.py); the
        # experts (grouped_mm) and the chunked loss's LM head cast nothing through it.
        cast = a.num_matmul_params - a.num_expert_params - (a.num_head_params if setup.chunked_loss else 0)
        rows.append(Component("autocast bf16 weight copies", 2.0 * cast, note="held through the step"))
    if setup.chunked_loss:
        chunk = min(T, setup.loss_chunk_tokens)
        # A chunk's logits and the log-sum-exp temporary (forward), or its gradient (backward).
        rows.append(Component("loss buffers (chunked)", 2.0 * chunk * fp32_logits, note=f"2 x {chunk} x V fp32"))
        # The chunked loss computes the head's gradient in its forward and holds it, fp32, until its backward.
        rows.append(Component("LM-head gradient (chunked loss)", 4.0 * a.num_head_params, note="fp32, forward to backward"))
    else:
        # Backward of the loss holds the log-softmax gradient and the logits' gradient.
        rows.append(Component("loss buffers (plain)", 2.0 * T * fp32_logits, note="2 x T x V fp32"))
    # Backward recomputes a wrapped module, or holds the gradient temporaries of one layer.
    rows.append(Component("backward working set", T * full, note="~ one layer's activations"))
    return [replace(r, phase="fwd/bwd") for r in rows]


def _placed(name: str, nbytes: float, where: str, note: str) -> Component:
    if where == "host":
        return Component(name, 0.0, nbytes, note + ", offloaded")
    return Component(name, nbytes, 0.0, note)


def plan(a: Arch, setup: Setup, tokens: int) -> list[Component]:
    """Every component of peak memory per device, in table order."""
    rows = model_states(a.num_params, setup, a.num_trainable_params)
    p = PRECISIONS[setup.precision]
    if "parameters" in STRATEGIES[setup.strategy] and (setup.num_devices > 1 or setup.strategy == "offload"):
        # FSDP gathers the next layer while computing this one, and holds a layer's full gradients
        # until they are reduce-scattered.
        rows.append(Component("gathered layers (FSDP)", (2 * p.param + p.grad) * a.max_layer_params,
                              note="2 layers' params + 1 layer's grads", phase="fwd/bwd"))
    # foreach AdamW's fp32 intermediates: one more copy of the (sharded) trained parameters
    temporaries = 4 * a.num_trainable_params / (setup.num_devices if setup.strategy != "none" else 1)
    on_host = setup.strategy == "offload"
    rows.append(Component("optimizer step temporaries", 0.0 if on_host else temporaries,
                          temporaries if on_host else 0.0, "4 B/trained param (foreach)", "step"))
    rows += activations(a, setup, tokens)
    rows.append(Component("framework overhead", FRAMEWORK_OVERHEAD, note="CUDA context, workspaces (constant)"))
    return rows


def device_total(rows: list[Component]) -> float:
    """Peak bytes per device: what is always there, plus the larger of the two phases of a step."""
    phase = {name: sum(r.device for r in rows if r.phase == name) for name in ("always", "fwd/bwd", "step")}
    return phase["always"] + max(phase["fwd/bwd"], phase["step"])
