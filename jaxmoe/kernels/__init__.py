"""Pallas kernels for GGUF-quantized MoE experts; each kernel family sits beside its plain-jnp reference.

- repack: lossless GPU-friendly planes of Q2_K / Q3_K / Q4_K matrices (numpy pack/unpack).
- expert_ffn: the API (single expert or a layer's selected experts), the plain-jnp references, `BlockConfig`
  and the measured default per token count.
- int_dot: v4 kernels, integer dp2a dots on int16 activations (the default up to 8 tokens).
- dequant_fma: v3 kernels, weights dequantized to float in registers (tensor-core "mma" from 16 tokens).
"""
