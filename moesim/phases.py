"""The phase names of one MoE layer, in order: the one list every stage uses.

The bench's EP layer (:mod:`moesim.measure.ep_layer`) times these phases, the
simulator (:mod:`moesim.simulate`) predicts them, and validation and the
reports compare them by these names. Layer-neutral: imports nothing.
"""

from __future__ import annotations

#: one MoE layer's forward, in execution order (what the EP layer bench times)
MOE_LAYER_PHASES = ("gate", "permute", "dispatch", "experts", "combine", "unpermute")

#: the MoE phases that are local compute (no communication)
COMPUTE_PHASES = ("gate", "permute", "experts", "unpermute")

#: per-layer columns of a simulation: the dense part, the MoE phases, shared experts,
#: norms and the TP / CP / expert-TP collectives around them (``simulate.program.PHASES``
#: says on which stream or group each runs)
LAYER_PHASES = (
    "dense",
    *MOE_LAYER_PHASES,
    "shared_experts",
    "norm",
    "tp_comm",
    "cp_comm",
    "etp_comm",
)

#: ``SimResult.phases_s`` keys: per MoE layer, plus the head (embedding, LM head, loss),
#: the step's gradient sync and the optimizer step
STEP_PHASES = (
    *MOE_LAYER_PHASES, "dense", "shared_experts", "norm", "tp_comm", "cp_comm", "etp_comm",
    "head", "grad_sync", "optimizer",
)  # fmt: skip

#: backward phases as the simulator records them, in backward execution order
BACKWARD_PHASES = (
    *(f"{p}_bwd" for p in reversed(MOE_LAYER_PHASES)),
    "dense_bwd",
    "shared_experts_bwd",
)
