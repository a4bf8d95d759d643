"""Packed training on the GPU's own attention kernels, against each document alone: the exactness harness
(zeropad.verify.check_documents) in bf16 on CUDA.

    python benchmarks/cuda_exactness.py            # needs CUDA; --device cpu runs the same check on the CPU

The tests prove packing exact in float64 on the CPU, where zeropad's attention runs per document through
SDPA. On a GPU in bf16 the packed path runs torch's varlen flash kernel (`varlen_attn`) over the whole pack
instead, which has no float64, so exactness there is bounded by bf16 rounding: each family's packed logits and
gradients against each document alone through SDPA, attention logits driven to the trained range, with the
negative control (one document boundary moved by one token), which must exceed the tolerance. Printed: the
worst relative error of logits and gradients, the control's, and the ratio control / packed (how far above
the noise a one-token leak stands).
"""

from __future__ import annotations

import argparse

import torch

from zeropad.config import ModelConfig
from zeropad.model.load import build_model
from zeropad.verify import random_documents, check_documents

TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
FAMILIES = {
    "qwen3": {},
    "llama": {},
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mistral": dict(sliding_window=64),
}
LENGTHS = [137, 512, 9, 300, 64]
TOLERANCE = 3e-2  # bf16: 8 bits of mantissa, summed over a few hundred terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"bf16, documents {LENGTHS}, tolerance {TOLERANCE:.0e}")
    print("\n| family | logits rel | grads rel (worst tensor) | control logits rel | control grads rel | "
          "control / packed | pass |")
    print("|---|---|---|---|---|---|---|")
    for family, extra in FAMILIES.items():
        cfg = ModelConfig(config={"model_type": family, **TINY, **extra})
        model = build_model(cfg, seed=0).to(device=device, dtype=torch.bfloat16)
        docs = random_documents(TINY["vocab_size"], LENGTHS, seed=0)
        report = check_documents(model, docs, tolerance=TOLERANCE, dtype=torch.bfloat16)
        c = report.control
        print(f"| {family} | {report.logit_rel:.2e} | {max(report.grad_rel.values()):.2e} ({report.worst_param}) | "
              f"{c.logit_rel:.2e} | "
              f"{max(c.grad_rel.values()):.2e} | {c.max_rel / max(report.max_rel, 1e-12):.0f}x | "
              f"{'yes' if report.passed else 'NO'} |")


if __name__ == "__main__":
    main()
