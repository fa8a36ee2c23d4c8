"""`moesim train-router`: train a small MoE on CPU under balancing schemes, record its loads.

    moesim train-router --schemes none,aux_loss,bias --seeds 3 --steps 300 \\
        --out results/dynamics/router-dynamics.parquet

Writes one parquet trace (and ``OUT.png``, the measured max/mean load per step
per scheme): a row per (run, step, layer) with the expert loads,
and under the schema key ``moesim`` every run's settings, router spec, final
loss, wall time and the provenance (device, versions, commit). The trace feeds
``workload.routing.dynamics: {source: trace}`` and ``moesim validate --dynamics``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("results/dynamics/router-dynamics.parquet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--schemes",
        default="none,aux_loss,z_loss,bias,expert_choice",
        help="comma-separated: none, aux_loss, z_loss, bias, expert_choice (default all)",
    )
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 per scheme")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--layers", type=int, default=2, help="MoE layers")
    parser.add_argument("--experts", type=int, default=16, help="experts per layer (8-64)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam peak learning rate")
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="constant, or cosine: linear warm-up then a half cosine to --min-lr x peak",
    )
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    parser.add_argument(
        "--min-lr", type=float, default=0.1, help="cosine: last step's lr / peak (default 0.1)"
    )
    parser.add_argument("--aux-coef", type=float, default=0.01, help="aux_loss coefficient")
    parser.add_argument("--z-coef", type=float, default=1e-3, help="z_loss coefficient")
    parser.add_argument("--gamma", type=float, default=1e-2, help="bias update speed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"parquet (default {DEFAULT_OUT})"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from moesim.errors import UserError
    from moesim.measure.router_train import TrainConfig, train_runs, write_trace
    from moesim.report.progress import progress_bar
    from moesim.report.tables import err_console

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: must be >= 1")
    base = TrainConfig(
        steps=args.steps, layers=args.layers, experts=args.experts, top_k=args.top_k,
        batch=args.batch, seq_len=args.seq_len, aux_coef=args.aux_coef, z_coef=args.z_coef,
        gamma=args.gamma, threads=args.threads, lr=args.lr, lr_schedule=args.lr_schedule,
        warmup=args.warmup, min_lr=args.min_lr,
    )  # fmt: skip
    for s in schemes:
        TrainConfig(**{**base.__dict__, "scheme": s}).check()
    from moesim.io import provenance

    prov = provenance()  # the tree as training starts (it may be edited while it runs)
    total = len(schemes) * args.seeds * args.steps
    with progress_bar(total, "training", enabled=not args.no_progress) as advance:
        rows, runs = train_runs(base, schemes, range(args.seeds), advance=lambda: advance(1))
    path = write_trace(args.out, rows, runs, prov)
    from moesim.report.dynamics_plots import plot_trace

    cfg = runs[0]["config"]
    title = f"CPU MoE (E={cfg['experts']}, k={cfg['top_k']}, {cfg['layers']} layers): "
    png = plot_trace(rows, path.with_suffix(".png"), title=title)
    for r in runs:
        err_console.print(
            f"{r['run']:>18}: final loss {r['final_loss']:.3f} "
            f"(uniform {r['uniform_loss']:.3f}), {r['wall_s']:.1f} s"
        )
    err_console.print(f"{len(rows)} rows ({len(runs)} runs) -> {path}; plot {png}")
    return 0
