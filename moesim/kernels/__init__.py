"""Real MoE kernels (torch): routers (``gating``), dispatch (``dispatch``),
expert FFNs and the whole layer (``experts``), slow references (``reference``)."""
