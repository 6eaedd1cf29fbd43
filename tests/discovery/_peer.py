"""A discovery peer in its own process, driven by the tests over stdin/stdout (JSON lines).

    python _peer.py '<json config>'

mode "node" runs MdnsDiscovery and prints {"ev": "ready"|"join"|"update"|"leave", ...};
mode "raw" registers a service with arbitrary TXT bytes straight through zeroconf;
mode "flood" registers many valid adverts at once.
Commands on stdin: "update <offers>", "stats", "stop". The process stops at EOF on stdin
or after config["lifetime"] seconds, whichever comes first, so it never outlives a test.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from meshmq.discovery import (
    SERVICE_TYPE,
    Advert,
    MdnsDiscovery,
    Sighting,
    encode_advert,
    instance_label,
)
from zeroconf import IPVersion, ServiceInfo, Zeroconf

_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    """Print one JSON event line."""
    with _out:
        sys.stdout.write(json.dumps({"ev": event, "t": time.monotonic(), **fields}) + "\n")
        sys.stdout.flush()


def as_dict(s: Sighting) -> dict[str, Any]:
    """Return a sighting as JSON-able data."""
    a = s.advert
    return {
        "instance": s.instance,
        "addresses": list(s.addresses),
        "name": a.name,
        "node_id": a.node_id,
        "group": a.group,
        "port": a.port,
        "offers": a.offers,
        "proto": a.proto,
    }


def commands(lifetime: float) -> Iterator[str]:
    """Yield stdin lines until EOF or until lifetime seconds have passed."""
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + lifetime
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            emit("lifetime")
            return
        if line is None:
            return
        yield line


def run_node(cfg: dict[str, Any]) -> None:
    """Run one MdnsDiscovery until told to stop."""
    d = MdnsDiscovery(
        cfg["interfaces"],
        cfg["group"],
        on_join=lambda s: emit("join", s=as_dict(s)),
        on_update=lambda s: emit("update", s=as_dict(s)),
        on_leave=lambda s: emit("leave", s=as_dict(s)),
        max_peers=cfg.get("max_peers", 1024),
    )
    advert = Advert(
        1, cfg["name"], cfg["node_id"], cfg["group"], cfg["port"], cfg.get("offers", "")
    )
    t0 = time.monotonic()
    d.start(advert, bind_addresses=cfg.get("bind"))
    emit("ready", t0=t0)
    try:
        for line in commands(cfg.get("lifetime", 50.0)):
            if line.startswith("update "):
                advert = Advert(1, advert.name, advert.node_id, advert.group, advert.port, line[7:])
                d.update(advert)
                emit("updated")
            elif line == "stats":
                emit("stats", stats=d.stats(), sightings=[as_dict(s) for s in d.sightings()])
            elif line == "stop":
                break
    finally:
        d.stop()
        emit("stopped")


def run_raw(cfg: dict[str, Any]) -> None:
    """Register one service with the given raw TXT properties, bypassing the codec."""
    props = {bytes.fromhex(k): None if v is None else bytes.fromhex(v) for k, v in cfg["props"]}
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{cfg['instance']}.{SERVICE_TYPE}",
        port=cfg.get("port", 4000),
        properties=props,
        server=f"{cfg['instance']}.local.",
        parsed_addresses=cfg["interfaces"],
    )
    zc = Zeroconf(interfaces=cfg["interfaces"], ip_version=IPVersion.V4Only, use_asyncio=False)
    try:
        zc.register_service(info, cooperating_responders=True)
        emit("ready")
        for line in commands(cfg.get("lifetime", 50.0)):
            if line == "stop":
                break
        zc.unregister_service(info)
    finally:
        zc.close()
        emit("stopped")


def run_flood(cfg: dict[str, Any]) -> None:
    """Register cfg["count"] valid adverts of cfg["group"] at once (without waiting for announces)."""
    zc = Zeroconf(interfaces=cfg["interfaces"], ip_version=IPVersion.V4Only, use_asyncio=False)
    assert zc.loop is not None
    try:
        for i in range(cfg["count"]):
            advert = Advert(1, f"flood{i}", secrets.token_hex(8), cfg["group"], 5000 + i)
            info = ServiceInfo(
                SERVICE_TYPE,
                f"{instance_label(advert)}.{SERVICE_TYPE}",
                port=advert.port,
                properties=encode_advert(advert),
                server=f"flood-{advert.node_id}.local.",
                parsed_addresses=cfg["interfaces"],
            )
            coro = zc.async_register_service(info, cooperating_responders=True)
            asyncio.run_coroutine_threadsafe(coro, zc.loop).result(5)
        emit("ready")
        for line in commands(cfg.get("lifetime", 50.0)):
            if line == "stop":
                break
        zc.unregister_all_services()
    finally:
        zc.close()
        emit("stopped")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    mode = cfg.get("mode", "node")
    {"raw": run_raw, "flood": run_flood, "node": run_node}[mode](cfg)


if __name__ == "__main__":
    main()
