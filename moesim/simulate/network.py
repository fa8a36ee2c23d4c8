"""Coflow-level fluid network model.

Legend: Cf = concurrent coflows of one domain, L = links of the domain.

A collective is a *coflow*: a vector of bytes it must move over each link.
All of a coflow's flows progress together (it ends when its most loaded link
has drained), so a coflow alone takes ``latency + max_l bytes_l / cap_l``.
Concurrent coflows share links with max-min fairness on their *bottleneck
byte rate* ``x_c`` (the rate at which the coflow's most loaded link drains):
progressive filling raises every unfrozen ``x_c`` together until a link
saturates, then freezes the coflows on it (:func:`maxmin_rates`). Two coflows
on one link thus get half its bandwidth each, as two NCCL collectives do.

Events happen only when a coflow starts or finishes; then the domain's rates
are recomputed with numpy. Domains (EP groups) never share links, so each has
its own state and events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy
from numpy.typing import NDArray

F64 = NDArray[np.float64]
_EPS = 1e-12
_NONE: F64 = np.empty(0)  # a coflow's share not given by its caller


def maxmin_rates(demand_CfL: F64, cap_L: F64) -> F64:
    """Max-min fair bottleneck byte rates ``x_Cf`` of coflows sharing links.

    ``demand_CfL`` bytes each coflow moves on each link (every row has a
    positive entry); ``cap_L`` bytes/s. Coflow ``c`` then drains link ``l`` at
    ``x_c * demand_CfL[c, l] / max_l demand_CfL[c, l]``.
    """
    return _progressive_fill(demand_CfL / demand_CfL.max(axis=1, keepdims=True), cap_L)


def _progressive_fill(share: F64, cap_L: F64) -> F64:
    """:func:`maxmin_rates` on demands already divided by each row's maximum."""
    Cf = share.shape[0]
    x = np.zeros(Cf)
    free = np.asarray(cap_L, dtype=np.float64).copy()
    active = np.ones(Cf, dtype=bool)
    while active.any():
        load = share[active].sum(axis=0)
        used = load > 0
        step = np.min(free[used] / load[used])
        x[active] += step
        free = free - step * load
        full = used & (free <= _EPS * np.maximum(cap_L, 1.0))
        frozen = (share[:, full] > 0).any(axis=1)
        if not (frozen & active).any():  # numerical safety: freeze the tightest link's users
            frozen = share[:, np.argmin(np.where(used, free, np.inf))] > 0
        active &= ~frozen
    return x


@dataclass
class _Coflow:
    demand_L: F64  # bytes per link
    solo: float  # seconds it takes alone: max_l demand / capacity
    done: simpy.Event
    left: float = 1.0  # fraction of the coflow not yet moved
    rate: float = 0.0  # fraction per second
    finish: float = float("inf")  # when it ends at the current rate (kept while the rate is)
    peak: float = 0.0  # max_l demand_L: bytes of its most loaded link
    share_L: F64 = field(default_factory=lambda: _NONE)  # demand_L / peak, filling reads it

    def __post_init__(self) -> None:
        # computed once (by the caller, for every group at once, or here): every rate
        # update of the domain reads them (profiled hot path)
        if self.share_L is _NONE:
            self.peak = float(self.demand_L.max())
            self.share_L = self.demand_L / self.peak


@dataclass
class _Domain:
    active: list[_Coflow] = field(default_factory=list)
    last: float = 0.0
    version: int = 0


class FluidNetwork:
    """Links with capacities; coflows started with :meth:`transfer` share them fairly.

    ``cap_L`` is the capacity vector every domain's link space uses (bytes/s).
    """

    def __init__(self, env: simpy.Environment, cap_L: F64) -> None:
        self.env = env
        self.cap_L = np.asarray(cap_L, dtype=np.float64)
        self._domains: dict[object, _Domain] = {}
        self.coflows = 0

    def transfer(
        self,
        domain: object,
        demand_L: F64,
        latency_s: float = 0.0,
        solo_s: float | None = None,
        start_s: float | None = None,
        shape: tuple[float, F64] | None = None,
    ) -> simpy.Event:
        """Start a coflow of ``demand_L`` bytes per link; the event fires when it ends.

        It starts at ``start_s`` (default: now), waits ``latency_s``, then its
        bytes flow. ``solo_s`` (optional) is ``max(demand_L / cap_L)`` when the
        caller has it; ``shape`` (optional) is ``(max(demand_L), demand_L / max)``.
        """
        self.coflows += 1
        done = self.env.event()
        demand = np.asarray(demand_L, dtype=np.float64)
        if solo_s is None:
            solo_s = float((demand / self.cap_L).max()) if len(demand) else 0.0
        delay = latency_s + (0.0 if start_s is None else start_s - self.env.now)
        if solo_s <= 0:
            self.env.timeout(delay).callbacks.append(lambda _: _succeed(done))
            return done
        if shape is None:
            flow = _Coflow(demand, solo_s, done)
        else:
            flow = _Coflow(demand, solo_s, done, peak=shape[0], share_L=shape[1])
        if delay > 0:  # one event covers waiting for the start and the latency
            self.env.timeout(delay).callbacks.append(lambda _: self._join(domain, flow))
        else:
            self._join(domain, flow)
        return done

    def _join(self, key: object, flow: _Coflow) -> None:
        dom = self._domains.setdefault(key, _Domain(last=self.env.now))
        self._advance(dom)
        dom.active.append(flow)
        self._reschedule(key, dom)

    def _advance(self, dom: _Domain) -> None:
        dt = self.env.now - dom.last
        dom.last = self.env.now
        if dt > 0:
            for f in dom.active:
                f.left -= f.rate * dt

    def _reschedule(self, key: object, dom: _Domain) -> None:
        now = self.env.now
        tol = 1e-12 * max(abs(now), 1e-6)  # float rounding of the wake-up time
        if len(dom.active) == 1:  # the common case, without the lists (profiled hot path)
            self._reschedule_one(key, dom, now, tol)
            return
        ending = [f.finish - now <= tol or f.left <= 1e-12 for f in dom.active]
        for f, end in zip(dom.active, ending, strict=True):
            if end:
                f.done.succeed()
        dom.active = [f for f, end in zip(dom.active, ending, strict=True) if not end]
        if not dom.active:
            return
        old = [f.rate for f in dom.active]
        self._set_rates(dom.active)
        for f, rate in zip(dom.active, old, strict=True):
            if f.rate != rate:  # a rate that did not change keeps its exact finish time
                f.finish = now + f.left / f.rate
        dom.version += 1
        version = dom.version
        wait = min(f.finish for f in dom.active) - now
        self.env.timeout(wait).callbacks.append(lambda _: self._wake(key, version))

    def _reschedule_one(self, key: object, dom: _Domain, now: float, tol: float) -> None:
        """:meth:`_reschedule` of a domain with one coflow: it ends, or runs alone."""
        f = dom.active[0]
        if f.finish - now <= tol or f.left <= 1e-12:
            f.done.succeed()
            dom.active = []
            return
        rate = 1.0 / f.solo
        if f.rate != rate:
            f.rate = rate
            f.finish = now + f.left / rate
        dom.version += 1
        version = dom.version
        self.env.timeout(f.finish - now).callbacks.append(lambda _: self._wake(key, version))

    def _set_rates(self, active: list[_Coflow]) -> None:
        if len(active) == 1:
            active[0].rate = 1.0 / active[0].solo
            return
        x = _progressive_fill(np.stack([f.share_L for f in active]), self.cap_L)
        for f, xc in zip(active, x, strict=True):
            f.rate = float(xc) / f.peak

    def _wake(self, key: object, version: int) -> None:
        dom = self._domains[key]
        if dom.version != version:
            return
        self._advance(dom)
        self._reschedule(key, dom)


def _succeed(event: simpy.Event) -> None:
    event.succeed()
