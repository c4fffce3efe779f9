"""The deployment kit (``deploy/``), exercised as far as this machine allows.

- the systemd unit passes ``systemd-analyze verify`` and outlasts the drain it starts;
- the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate,
  strict), and their timings agree with the drain settings they carry;
- the HAProxy config (the one ``bench/rollout.py`` runs) balances real clients over two real
  nodes by least connections and stops sending them to a draining node;
- the nginx config passes ``nginx -t`` and carries a WebSocket through to a real node;
- every metric the Grafana dashboard queries is one a real node exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import RawClient
from trio_cable import Config, Server
from trio_cable.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
TRIO_CABLE = Path(sys.executable).parent / "trio-cable"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unit_settings() -> dict[str, str]:
    settings = {}
    for line in (DEPLOY / "systemd" / "trio-cable.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


# -- systemd --------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    assert TRIO_CABLE.exists(), "the package's trio-cable script"
    unit = (DEPLOY / "systemd" / "trio-cable.service").read_text()
    # verify checks that ExecStart's program exists: point it at this environment's.
    unit = unit.replace("/opt/trio-cable/.venv/bin/trio-cable", str(TRIO_CABLE))
    (tmp_path / "trio-cable.service").write_text(unit)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "trio-cable.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # Unknown keys are only warnings to verify: none may be there.
    assert "trio-cable.service" not in out.stderr, out.stderr


def test_systemd_unit_outlasts_the_drain() -> None:
    settings = _unit_settings()
    config = load_config({}, {}, str(DEPLOY / "systemd" / "trio-cable.toml"))
    assert settings["KillSignal"] == "SIGTERM"  # SIGTERM is what starts the drain
    # A second SIGTERM would cut the drain short: only the main process gets it.
    assert settings["KillMode"] == "mixed"
    assert float(settings["TimeoutStopSec"]) > config.shutdown_timeout >= config.drain_period
    assert settings["ExecStart"].endswith("--config /etc/trio-cable/trio-cable.toml")


# -- Kubernetes -----------------------------------------------------------------------------


def _manifests() -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    text = (DEPLOY / "kubernetes" / "trio-cable.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_kubernetes_manifests_validate() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = _manifests()
    assert {d["kind"] for d in docs} == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget",
    }  # fmt: skip
    for doc in docs:
        kv.validate(doc, kv.latest_version(), strict=True)  # raises on any schema error
    broken = json.loads(json.dumps(next(d for d in docs if d["kind"] == "Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45  # a typo
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_kubernetes_timings_fit_the_drain() -> None:
    docs = {d["kind"]: d for d in _manifests()}
    env = docs["ConfigMap"]["data"]
    config = load_config({}, env)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # SIGTERM comes after preStop; the drain may then take up to shutdown_timeout.
    assert pod["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + config.shutdown_timeout
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/health"  # 503 while draining: the pod leaves the Service
    liveness = container["livenessProbe"]
    # Draining is 503 too: liveness must not kill a pod that is draining on purpose.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > config.shutdown_timeout
    assert docs["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


# -- HAProxy --------------------------------------------------------------------------------


def haproxy_config(bind: str, balance: str, servers: list[tuple[str, int]]) -> tuple[str, dict]:
    """The deploy config with *servers* appended, and the environment it reads (the way
    bench/rollout.py runs it)."""
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    text += "".join(f"    server n{i} {h}:{p} check\n" for i, (h, p) in enumerate(servers))
    return text, {"CABLE_BIND": bind, "CABLE_BALANCE": balance}


async def _wait_port(port: int, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


@pytest.fixture
def deploy_config() -> Config:
    return Config(port=0, ping_interval=3.0, close_timeout=1.0, drain_period=0.5)


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
async def test_haproxy_balances_by_least_connections_and_skips_a_draining_node(
    nursery: trio.Nursery, tmp_path: Path, deploy_config: Config
) -> None:
    a: Server = await nursery.start(Server(deploy_config).serve)
    b: Server = await nursery.start(Server(deploy_config).serve)
    port = _free_port()
    text, env = haproxy_config(
        f"127.0.0.1:{port}", "leastconn", [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    check = subprocess.run(
        ["haproxy", "-c", "-f", str(cfg)], env={**os.environ, **env},
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    proxy = await trio.lowlevel.open_process(
        ["haproxy", "-f", str(cfg), "-db"], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_port(port)
        # Both nodes up (rise 2 x inter 300 ms) before the clients come.
        await trio.sleep(1.5)
        clients = []
        for _ in range(20):
            client, head = await RawClient.open(port)
            assert b" 101 " in head
            clients.append(client)
        with trio.fail_after(30):
            while len(a.connections) + len(b.connections) < 20:
                await trio.sleep(0.05)
        # leastconn: 20 connections opened one after another split evenly.
        assert abs(len(a.connections) - len(b.connections)) <= 2
        # Node a drains: /health turns 503, HAProxy takes it out at the next check.
        nursery.start_soon(a.drain)
        await trio.sleep(1.5)
        for _ in range(10):
            client, head = await RawClient.open(port)
            assert b" 101 " in head
            clients.append(client)
        with trio.fail_after(30):
            while len(b.connections) < 20:
                await trio.sleep(0.05)
        for client in clients:
            await client.aclose()
    finally:
        proxy.terminate()
        with trio.CancelScope(shield=True):
            await proxy.wait()


def test_the_rollout_benchmark_runs_the_deploy_config() -> None:
    from bench import rollout

    assert rollout.HAPROXY_CFG_PATH == DEPLOY / "haproxy" / "haproxy.cfg"


# -- nginx ----------------------------------------------------------------------------------


def _nginx_conf(tmp: Path, listen: int, upstream: int) -> Path:
    site = (DEPLOY / "nginx" / "trio-cable.conf").read_text()
    site = site.replace("listen 8000;", f"listen 127.0.0.1:{listen};")
    site = site.replace("server 127.0.0.1:8080", f"server 127.0.0.1:{upstream}")
    (tmp / "trio-cable.conf").write_text(site)
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\npid {tmp}/nginx.pid;\nerror_log stderr;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp};\n"
        f"  proxy_temp_path {tmp};\n  include {tmp}/trio-cable.conf;\n}}\n"
    )
    return conf


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
async def test_nginx_carries_websockets(
    nursery: trio.Nursery, tmp_path: Path, deploy_config: Config
) -> None:
    node: Server = await nursery.start(Server(deploy_config).serve)
    port = _free_port()
    conf = _nginx_conf(tmp_path, port, node.port)
    check = subprocess.run(
        ["nginx", "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30, check=False
    )
    assert check.returncode == 0, check.stderr
    proxy = await trio.lowlevel.open_process(
        ["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await _wait_port(port)
        client, head = await RawClient.open(port)
        assert b" 101 " in head and b"actioncable-v1-json" in head
        frame = await client.read_frame(timeout=30)
        assert frame is not None and json.loads(frame[1])["type"] == "welcome"
        with trio.fail_after(30):
            while len(node.connections) < 1:
                await trio.sleep(0.05)
        await client.aclose()
    finally:
        proxy.terminate()
        with trio.CancelScope(shield=True):
            await proxy.wait()


# -- Grafana --------------------------------------------------------------------------------


def _queried_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "trio-cable.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 14
    return {m for e in exprs for m in re.findall(r"\btrio_cable_[a-z_]+", e)}


async def test_every_dashboard_metric_is_exported(nursery: trio.Nursery) -> None:
    node: Server = await nursery.start(Server(Config(port=0)).serve)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = b""
    with trio.fail_after(30):
        while chunk := await stream.receive_some(65536):
            body += chunk
    # Every family, samples or not yet (a labeled counter has none until its first event);
    # a counter's TYPE line names it with its _total.
    names: set[str] = set()
    for name, kind in re.findall(rb"^# TYPE (trio_cable_[a-z_]+) (\w+)", body, re.M):
        suffixes = {b"histogram": [b"_bucket", b"_sum", b"_count"]}
        names |= {(name + s).decode() for s in suffixes.get(kind, [b""])}
    assert "trio_cable_connections_total" in names and "trio_cable_connections" in names
    missing = sorted(_queried_metrics() - names)
    assert not missing, f"the dashboard queries metrics no node exports: {missing}"
