"""The scenarios and their rows: which server settings and client behaviour each row uses.

Rows of the restart matrix are cumulative: each adds one technique to the row above it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, TypedDict

from bench.avalanche.trial import SECRET, ClientOpts, TrialSpec

# A Rails-style server: no admission control, callbacks unbounded (only the database pool
# limits them), no per-connection command rate.
ADMISSION_OFF: dict[str, Any] = {
    "handshake_rate": 0.0,
    "max_pending_handshakes": 1_000_000,
    "adaptive_admission": False,
    "callback_concurrency": 1_000_000,
    "command_rate": 0.0,
}


# RPC mode, the naive rows: a fixed 128 calls in flight (the defaults' ceiling; anycable-go's
# limit is fixed too), never retried.  The defaults start at 28 (anycable-go's default) and
# adapt between 1 and 128, retrying what the application did not apply.
RPC_NAIVE: dict[str, Any] = {
    "rpc_concurrency": 128, "rpc_min_concurrency": 128, "rpc_max_concurrency": 128,
    "rpc_retries": 0,
}  # fmt: skip
#: The rows an RPC run has by default: what the calls cost, then what drain, resume and the
#: defaults (JWT, signed streams, admission control, adaptive RPC limit) save.
RPC_ROWS = ("naive", "drain", "resume", "defaults")


class ClientTimeouts(TypedDict):
    """The client timeouts of a scale (fields of ClientOpts)."""

    subscribe_timeout: float
    connect_timeout: float


@dataclass(frozen=True)
class Scale:
    """Sizes and timings of a mode (quick for CI, full for RESULTS.md)."""

    clients: int
    subs: int
    streams: int
    msg_interval: float
    ramp: float
    steady: float
    settle: float
    max_wait: float
    loadgens: int
    boot_gap: float
    cost: dict[str, float]
    drain: dict[str, float]  # drain_period, reconnect_advice
    client_timeouts: ClientTimeouts
    celebrity_clients: int
    subscribe_loads: tuple[int, ...]
    backoff_clients: tuple[int, ...]
    backoff_runs: int


QUICK = Scale(
    clients=200,
    subs=5,
    streams=20,
    msg_interval=0.5,
    ramp=1.0,
    steady=1.0,
    settle=1.0,
    max_wait=30.0,
    loadgens=2,
    boot_gap=0.5,
    cost={"cpu_ms": 0.2, "db_pool": 4, "db_ms": 10.0},
    drain={"drain_period": 2.0, "reconnect_advice": 1.0},
    client_timeouts={"subscribe_timeout": 2.0, "connect_timeout": 4.0},
    celebrity_clients=300,
    subscribe_loads=(150,),
    backoff_clients=(10, 50, 100),
    backoff_runs=20,
)

# The full size is bounded by the load generator: 10,000 trio_cable clients share one core,
# and a reconnect (handshake, welcome, restore or five subscribes) costs that core a few ms.
# So the clients start over 120 s, and the slow drain spreads the reconnects over 60 s plus
# 10 s of advice (~150/s): sized, as an operator would size it, for what the fleet can take.
# Recovery times of the hard-restart rows are bounded by the same core.
FULL = Scale(
    clients=10_000,
    subs=5,
    streams=1000,
    msg_interval=20.0,
    ramp=120.0,
    steady=3.0,
    settle=5.0,
    max_wait=240.0,
    loadgens=4,
    boot_gap=1.0,
    cost={"cpu_ms": 0.1, "db_pool": 16, "db_ms": 5.0},
    drain={"drain_period": 60.0, "reconnect_advice": 10.0, "shutdown_timeout": 90.0},
    client_timeouts={"subscribe_timeout": 5.0, "connect_timeout": 10.0},
    celebrity_clients=5000,
    subscribe_loads=(500, 1000, 2000),
    backoff_clients=(10, 30, 50, 70, 100, 130, 160, 190),
    backoff_runs=100,
)


@dataclass(frozen=True)
class Row:
    """One strategy: server overrides, client options, how the node restarts."""

    name: str
    server: dict[str, Any]
    client: ClientOpts
    restart: str


def restart_rows(scale: Scale, *, rpc: bool = False) -> list[Row]:
    """naive, then one technique more per row, ending with trio_cable's defaults (in RPC
    mode the rows before the defaults also call the application naively: RPC_NAIVE)."""
    base_server = {"secret": SECRET, **scale.drain}
    naive_client = ClientOpts(
        subprotocol="actioncable-v1-json",
        strategy="exponential",
        base=1.0,
        cap=30.0,
        linearized=False,
        resume=False,
        **scale.client_timeouts,
    )
    off = {**base_server, **ADMISSION_OFF, **(RPC_NAIVE if rpc else {})}
    jitter = replace(naive_client, strategy="full_jitter", base=0.5)
    linear = replace(jitter, linearized=True)
    resume = replace(linear, subprotocol="actioncable-v1-ext-json", resume=True)
    signed = replace(resume, jwt=True, signed=True)
    return [
        Row("naive", off, naive_client, "hard"),
        Row("+ full jitter", off, jitter, "hard"),
        Row("+ linearized", off, linear, "hard"),
        Row("+ slow drain", off, linear, "drain"),
        Row("+ resume", off, resume, "drain"),
        Row("+ JWT/signed", off, signed, "drain"),
        Row("defaults", base_server, signed, "drain"),
    ]


ROW_KEYS = {
    "naive": "naive",
    "jitter": "+ full jitter",
    "linearized": "+ linearized",
    "drain": "+ slow drain",
    "resume": "+ resume",
    "jwt": "+ JWT/signed",
    "defaults": "defaults",
}


def _spec(scale: Scale, name: str, clients: int, server: dict[str, Any], client: ClientOpts,
          restart: str | None, ramp: float, rpc: bool = False) -> TrialSpec:  # fmt: skip
    return TrialSpec(
        rpc=rpc,
        name=name,
        clients=clients,
        subs=scale.subs,
        streams=scale.streams,
        msg_interval=scale.msg_interval,
        server=server,
        cost=scale.cost,
        client=client,
        restart=restart,
        ramp=ramp,
        steady=scale.steady,
        loadgens=scale.loadgens,
        max_wait=scale.max_wait,
        settle=scale.settle,
        boot_gap=scale.boot_gap,
    )


def restart_specs(scale: Scale, clients: int, only: list[str] | None = None, *,
                  rpc: bool = False) -> list[TrialSpec]:  # fmt: skip
    """The rows asked for (*only*: keys of ROW_KEYS; default every row, RPC_ROWS with *rpc*)."""
    rows = restart_rows(scale, rpc=rpc)
    if only is None and rpc:
        only = list(RPC_ROWS)
    if only:
        wanted = {ROW_KEYS.get(k, k) for k in only}
        rows = [r for r in rows if r.name in wanted]
    return [_spec(scale, r.name, clients, r.server, r.client, r.restart, scale.ramp, rpc)
            for r in rows]  # fmt: skip


def celebrity_specs(scale: Scale, clients: int, *, rpc: bool = False) -> list[TrialSpec]:
    """Everybody joins within one second, no restart: admission control off, then on (in
    RPC mode, naive calls to the application, then the adaptive limit)."""
    client = ClientOpts(**scale.client_timeouts)
    base = {"secret": SECRET, **scale.drain}
    off = {**base, **ADMISSION_OFF, **(RPC_NAIVE if rpc else {})}
    return [
        _spec(scale, "admission off", clients, off, client, None, 1.0, rpc),
        _spec(scale, "admission on", clients, base, client, None, 1.0, rpc),
    ]


def subscribe_specs(scale: Scale, loads: tuple[int, ...]) -> list[TrialSpec]:
    """Concurrent vs linearized subscribes at growing load (server defaults, join in 1 s)."""
    out = []
    base = {"secret": SECRET, **scale.drain}
    for n in loads:
        for linearized in (False, True):
            client = ClientOpts(linearized=linearized, **scale.client_timeouts)
            name = f"{'linearized' if linearized else 'concurrent'} {n}"
            out.append(_spec(scale, name, n, base, client, None, 1.0))
    return out
