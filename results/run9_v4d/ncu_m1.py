"""Launch the Q2_K grouped layer (8 experts, M = 1) with two v4 configurations, three times each, for Nsight Compute.

Run under ncu (results/run9_v4d/device_run.sh): the 3rd–10th ffn_* launches are profiled (stall reasons,
occupancy, speed of light, memory); calls rotate over expert groups so the weights come from HBM.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from jaxmoe.kernels import expert_ffn as ef  # noqa: E402

bank = ef.random_bank("q2_k", 128, 2048, 768, seed=0)
x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2048)), jnp.bfloat16)
configs = [ef.BlockConfig(block_n_down=16, variant="int"), ef.BlockConfig(num_warps_up=8, block_n_down=16, variant="int")]
for n, cfg in enumerate(configs):
    fn = jax.jit(lambda x, b, i, cfg=cfg: ef.expert_ffn(x, b, i, fmt="q2_k", implementation="pallas", block_config=cfg))
    for r in range(3):
        ids = jnp.arange(8 * (4 * n + r), 8 * (4 * n + r) + 8, dtype=jnp.int32)
        jax.block_until_ready(fn(x, bank, ids))
print("done")
