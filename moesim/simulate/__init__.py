"""Discrete-event model of a multi-GPU MoE cluster (numpy + simpy, never torch).

``simulate(scenario, hw, *, seed=None, trace=False) -> SimResult``; see
:class:`SimResult` for the output. Pieces, in data-flow order:

- :mod:`~moesim.simulate.routing` load distributions (uniform, Zipf, log-normal,
  Dirichlet), trace files, exact k-distinct per-token sampling, count draws;
- :mod:`~moesim.simulate.capacity` capacity, drops and padding (the kernels'
  definitions, pure numpy);
- :mod:`~moesim.simulate.loads` per-(layer, micro-batch) loads of every GPU;
- :mod:`~moesim.simulate.topology` / :mod:`~moesim.simulate.traffic` the links
  of each EP group and what each dispatcher puts on them;
- :mod:`~moesim.simulate.network` the coflow fluid model (max-min fair);
- :mod:`~moesim.simulate.plan` pricing with :class:`moesim.costs.CostModel`;
- :mod:`~moesim.simulate.schedules` pipeline schedules (1F1B, interleaved,
  ZB-H1, DualPipe, DualPipeV) and the layers of each virtual stage;
- :mod:`~moesim.simulate.program` the op program (compute and collectives on
  named groups) each task runs, and its API for adding ops;
- :mod:`~moesim.simulate.gradsync` bucketed gradient reduce-scatter and
  parameter all-gather (Megatron-Core DDP + distributed optimizer);
- :mod:`~moesim.simulate.engine` the SimPy event loop that runs the program.

Modelling choices worth knowing (each module says more):

- one SimPy process per (EP group, lane) carrying per-GPU time vectors; an EP
  group is one pipeline rank of one DP replica; compute streams are FIFO,
  collectives wait for their slowest participant;
- EP groups are contiguous blocks of GPUs and never share a link, so each is
  its own network domain; ``ep`` must be a multiple or divisor of
  ``gpus_per_node`` on multi-node clusters;
- every forward dispatch with variable splits (``alltoall``, ``hierarchical``)
  starts with the split-size exchange, a latency-bound all-to-all of per-expert
  counts (``details.split_exchange_s``); ``low_latency`` (fixed-size buffers)
  and ``allgather`` have none, and DeepEP low-latency reaches same-node peers
  over NVLink;
- with ``alltoall`` and more than one expert per rank, the experts phase includes
  sorting the received rows by local expert and back (``details.regroup_s``);
- backward = 2x forward GEMMs, 1x memory-bound ops, both all-to-alls again in
  the combine dtype; gradients sync once per step in buckets over DP and
  expert-DP, overlapped with the last backward (``training`` section);
- pipeline stages send activations and gradients over the fabric; the bubble
  is what the schedule leaves idle, not a factor;
- tensor parallelism divides dense work by ``tp`` (its collectives are not
  modelled yet).
"""

from moesim.simulate.core import simulate
from moesim.simulate.result import PHASES, SimResult

__all__ = ["PHASES", "SimResult", "simulate"]
