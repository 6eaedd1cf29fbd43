"""Pipelines and RPC between separate OS processes, with a process killed mid-stream."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from meshmq.testing import Script

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def address_of(script: Script) -> str:
    return script.expect("listening on", timeout=15).rsplit(" ", 1)[1]


def example(name: str, *args: str) -> Script:
    return Script([str(EXAMPLES / name), *args])


@pytest.mark.timeout(90)
def test_worker_killed_mid_stream_loses_nothing() -> None:
    """Ventilator, two workers and a sink as scripts; SIGKILL one worker in the middle."""
    count = 150
    scripts: list[Script] = []
    try:
        sink = example("pipeline_sink.py", "--static", "--count", str(count))
        scripts.append(sink)
        sink_addr = address_of(sink)
        vent = example("pipeline_ventilator.py", "--peer", sink_addr, "--count", str(count),
                       "--workers", "2", "--timeout", "60")
        scripts.append(vent)
        vent_addr = address_of(vent)
        workers = [example("pipeline_worker.py", "--name", f"worker-{i}", "--peer", vent_addr,
                           "--peer", sink_addr, "--delay", "0.02") for i in (1, 2)]
        scripts += workers
        victim, survivor = workers
        victim.expect("working task=", timeout=15)
        for _ in range(10):  # let it get well into the stream, then kill it mid-task
            victim.expect("working task=", timeout=15)
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL

        assert vent.wait(60) == 0, vent.lines[-5:]
        done = vent.expect("done:", timeout=5)
        assert f"done: {count}/{count} acknowledged" in done
        redelivered = int(re.search(r"(\d+) redelivered", done).group(1))
        assert redelivered >= 1, done  # the task the victim was working on came back
        assert sink.wait(30) == 0
        summary = sink.expect("sink done:", timeout=5)
        assert f"sink done: {count} unique results for {count} tasks" in summary
        # a redelivered task reached the survivor as a second attempt
        assert "attempt=2" in survivor.expect("attempt=2", timeout=5)
    finally:
        for s in reversed(scripts):
            s.stop()


@pytest.mark.timeout(60)
def test_rpc_examples_across_processes_with_a_server_killed() -> None:
    """Calls spread over two servers; one is SIGKILLed mid-call and retry=True carries on."""
    servers = [example("rpc_server.py", "--static", "--name", f"inv-{i}", "--delay", "0.05")
               for i in (1, 2)]
    client = None
    try:
        addrs = [address_of(s) for s in servers]
        client = example("rpc_client.py", "--peer", addrs[0], "--peer", addrs[1], "--calls", "30")
        client.expect("call 5:", timeout=20)
        assert servers[0].stop(signal.SIGKILL) == -signal.SIGKILL
        assert client.wait(30) == 0, client.lines[-5:]
        replies = [ln for ln in client.lines if re.match(r"call \d+:", ln)]
        assert [int(ln.split()[1].rstrip(":")) for ln in replies] == list(range(30))
        assert {"inv-1", "inv-2"} <= {m for ln in replies for m in re.findall(r"inv-\d", ln)}
        assert any("remote error as expected: KeyError" in ln for ln in client.lines)
    finally:
        if client is not None:
            client.stop()
        for s in servers:
            s.stop()
