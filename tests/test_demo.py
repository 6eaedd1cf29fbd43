"""`make demo` runs examples/demo.py: it must finish by itself, exit 0 and show all three patterns and the journal."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshmq.testing import Script

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("discovery", ["mdns", "static"])
def test_demo_exits_zero_with_every_result(discovery: str) -> None:
    demo = Script([str(DEMO), "--discovery", discovery, "--timeout", "60"])
    try:
        assert demo.wait(100) == 0, "\n".join(demo.lines[-30:])
        out = "\n".join(demo.lines)
        assert "10 of 10 orders received" in out
        assert "40 of 40 results at the sink, each once" in out
        assert "answered by ['inventory-1', 'inventory-2']" in out
        assert "10 of 10 orders confirmed on disk; the late auditor got 10 of 10, each once" in out
    finally:
        demo.stop()
