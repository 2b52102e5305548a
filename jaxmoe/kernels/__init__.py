"""Pallas kernels for GGUF-quantized MoE experts; each kernel family sits beside its plain-jnp reference.

- repack: lossless GPU-friendly planes of Q2_K / Q3_K / Q4_K matrices (numpy pack/unpack).
- expert_ffn: fused dequantize + matmul SwiGLU expert FFN, single expert or a layer's selected experts.
"""
