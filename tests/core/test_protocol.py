"""docs/PROTOCOL.md pinned: golden bytes, and a peer written from the document alone.

The ``hex golden:<name>`` blocks of PROTOCOL.md are parsed and compared with the literals below,
and the literals with what meshmq's own encoders produce, so the document and the code cannot
drift apart. The interoperability tests drive a real Node with a peer made of plain pyzmq and
msgpack sockets that follows the document (section numbers in comments); nothing of meshmq is
used on that side.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import re
import struct
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from meshmq import Node
from meshmq._codec import decode, encode
from meshmq._engine import marker_topic
from meshmq._envelope import PubEncoder, decode_ctl, decode_pub, encode_ctl
from meshmq._topics import check_topic, matcher, zmq_prefix
from meshmq.testing import Collector, wait_until

DOC = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
NID = "3f2a9c1e5b7d4e60"

# The same bytes as the `hex golden:` blocks of docs/PROTOCOL.md (test_doc_blocks_are_the_literals).
GOLDEN_HEX = {
    "ext-uuid": "d80112345678123456781234567812345678",
    "ext-decimal": "d602392e3939",
    "ext-set": "c70303920102",
    "ext-frozenset": "c7030491a161",
    "ext-naive-datetime": "c71305323032362d30312d30315431323a33303a3030",
    "ext-date": "c70a06323032362d30312d3031",
    "ext-timestamp32": "d6ff6955b900",
    "ext-timestamp64": "d7ff773594006955b900",
    "ext-timestamp96": "c70cff00000000ffffffffffffffff",
    "ext-unknown": "d5280102",
    "marker": "ff3366326139633165356237643465363000000001",
    "marker-notice": "01ff3366326139633165356237643465363000000001",
    "task": "9301a47461736b86a171a8696e766f69636573a26964b3336632613963316535623764346536302d7431"
            "a361747401a36b6579a6637573742d37a16880a162c40881a56f726465722a",
    "ack-ok": "9301a361636b83a171a8696e766f69636573a26964b3336632613963316535623764346536302d7431"
              "a26f6bc3",
    "ack-failed": "9301a361636b84a171a8696e766f69636573a26964b3336632613963316535623764346536302d74"
                  "31a26f6bc2a16583a474797065aa56616c75654572726f72a76d657373616765a3626164a97472"
                  "6163656261636bad54726163656261636b2e2e2e0a",
    "ack-refused": "9301a361636b84a171a8696e766f69636573a26964b3336632613963316535623764346536302d"
                   "7431a26f6bc2a57265747279c3",
    "tasks": "9301a57461736b7382a171a8696e766f69636573a1749295b3336632613963316535623764346536"
             "302d743101a6637573742d3780c40881a56f726465722a95b3336632613963316535623764346536"
             "302d743202c080c40107",
    "acks": "9301a461636b7382a171a8696e766f69636573a369647392b3336632613963316535623764346536"
            "302d7431b3336632613963316535623764346536302d7432",
    "ack-ok-bt": "9301a361636b84a171a8696e766f69636573a26964b3336632613963316535623764346536302d"
                 "7431a26f6bc3a26274c3",
    "call": "9301a463616c6c84a3737663a571756f7465a26964b3336632613963316535623764346536302d6331"
            "a161c40b9291a2413181a371747902a374746ccb4012000000000000",
    "reply-ok": "9301a57265706c7983a26964b3336632613963316535623764346536302d6331a26f6bc3a172c401"
                "0c",
    "reply-error": "9301a57265706c7983a26964b3336632613963316535623764346536302d6331a26f6bc2a16583"
                   "a474797065a84b65794572726f72a76d657373616765a427413127a974726163656261636bad54"
                   "726163656261636b2e2e2e0a",
    "pub-topic": "6f72646572732e63726561746564",
    "pub-payload": "9801b2336632613963316535623764346536302d31a762696c6c696e67b0336632613963316535"
                   "6237643465363001cb41da556e4020000081a57472616365a3742d3182a56f726465722aa574"
                   "6f74616cd602392e3939",
    "hello": "9301a568656c6c6f8ba46e616d65a762696c6c696e67a26964b033663261396331653562376434653630"
             "a567726f7570a764656661756c74a363746cb37463703a2f2f31302e302e302e353a37303031a37075"
             "62b37463703a2f2f31302e302e302e353a37303032a47375627391a86f72646572732e2aa2737601a7"
             "776f726b65727391a8696e766f69636573a8736572766963657391a571756f7465a365707380a27771"
             "81a8696e766f69636573920403",
    "ping": "9301a470696e6781a26964b033663261396331653562376434653630",
    "bye": "9301a362796581a26964b033663261396331653562376434653630",
    "reset": "9301a5726573657481a26964b033663261396331653562376434653630",
}
GOLDEN = {name: bytes.fromhex(hx) for name, hx in GOLDEN_HEX.items()}

# The offer of PROTOCOL.md section 17.2, keys in the order of section 7.2.
OFFER: dict[str, Any] = {
    "name": "billing", "id": NID, "group": "default", "ctl": "tcp://10.0.0.5:7001",
    "pub": "tcp://10.0.0.5:7002", "subs": ["orders.*"], "sv": 1, "workers": ["invoices"],
    "services": ["quote"], "eps": {}, "wq": {"invoices": [4, 3]}}
OFFER_KEYS = list(OFFER)
TB = "Traceback...\n"


def doc_blocks() -> dict[str, bytes]:
    """The ``hex golden:<name>`` blocks of PROTOCOL.md: hex bytes, ``#`` starts a comment."""
    out: dict[str, bytes] = {}
    text = DOC.read_text(encoding="utf-8")
    for m in re.finditer(r"^```hex golden:([\w-]+)\n(.*?)^```$", text, re.M | re.S):
        tokens = [t for line in m.group(2).splitlines() for t in line.split("#", 1)[0].split()]
        assert all(re.fullmatch(r"(?:[0-9a-f]{2})+", t) for t in tokens), (m.group(1), tokens)
        assert m.group(1) not in out, f"golden block {m.group(1)} appears twice"
        out[m.group(1)] = bytes.fromhex("".join(tokens))
    return out


def doc_section(number: int) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {number}. ")
    return text[start:text.index("\n## ", start + 1)]


# ---- golden bytes ------------------------------------------------------------------------------
def test_doc_blocks_are_the_literals() -> None:
    assert doc_blocks() == GOLDEN


def test_pub_message() -> None:
    assert check_topic("orders.created") == GOLDEN["pub-topic"]
    payload = PubEncoder().encode(f"{NID}-1", "billing", NID, 1, 1767225600.5, {"trace": "t-1"},
                                  {"order": 42, "total": decimal.Decimal("9.99")})
    assert payload == GOLDEN["pub-payload"]
    assert decode_pub(GOLDEN["pub-topic"], GOLDEN["pub-payload"]) == (
        "orders.created", f"{NID}-1", "billing", NID, 1, 1767225600.5, {"trace": "t-1"},
        {"order": 42, "total": decimal.Decimal("9.99")})


CONTROL = [
    ("hello", "hello", OFFER),
    ("ping", "ping", {"id": NID}),
    ("bye", "bye", {"id": NID}),
    ("reset", "reset", {"id": NID}),
    ("task", "task", {"q": "invoices", "id": f"{NID}-t1", "att": 1, "key": "cust-7", "h": {},
                      "b": encode({"order": 42})}),
    ("ack-ok", "ack", {"q": "invoices", "id": f"{NID}-t1", "ok": True}),
    ("ack-failed", "ack", {"q": "invoices", "id": f"{NID}-t1", "ok": False,
                           "e": {"type": "ValueError", "message": "bad", "traceback": TB}}),
    ("ack-refused", "ack", {"q": "invoices", "id": f"{NID}-t1", "ok": False, "retry": True}),
    ("tasks", "tasks", {"q": "invoices", "t": [
        [f"{NID}-t1", 1, "cust-7", {}, encode({"order": 42})],
        [f"{NID}-t2", 2, None, {}, encode(7)]]}),
    ("acks", "acks", {"q": "invoices", "ids": [f"{NID}-t1", f"{NID}-t2"]}),
    ("ack-ok-bt", "ack", {"q": "invoices", "id": f"{NID}-t1", "ok": True, "bt": True}),
    ("call", "call", {"svc": "quote", "id": f"{NID}-c1", "a": encode([["A1"], {"qty": 2}]),
                      "ttl": 4.5}),
    ("reply-ok", "reply", {"id": f"{NID}-c1", "ok": True, "r": encode(12)}),
    ("reply-error", "reply", {"id": f"{NID}-c1", "ok": False,
                              "e": {"type": "KeyError", "message": "'A1'", "traceback": TB}}),
]


@pytest.mark.parametrize(("name", "kind", "fields"), CONTROL, ids=[c[0] for c in CONTROL])
def test_control_message(name: str, kind: str, fields: dict[str, Any]) -> None:
    assert encode_ctl(kind, fields) == GOLDEN[name]
    assert decode_ctl(GOLDEN[name]) == (kind, fields)


UTC = dt.UTC
EXT = [
    ("ext-uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("ext-decimal", decimal.Decimal("9.99")),
    ("ext-set", {1, 2}),
    ("ext-frozenset", frozenset({"a"})),
    ("ext-naive-datetime", dt.datetime(2026, 1, 1, 12, 30)),
    ("ext-date", dt.date(2026, 1, 1)),
    ("ext-timestamp32", dt.datetime(2026, 1, 1, tzinfo=UTC)),
    ("ext-timestamp64", dt.datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ("ext-timestamp96", dt.datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ("ext-unknown", msgpack.ExtType(40, b"\x01\x02")),
]


@pytest.mark.parametrize(("name", "value"), EXT, ids=[e[0] for e in EXT])
def test_ext_type(name: str, value: Any) -> None:
    assert encode(value) == GOLDEN[name]
    out = decode(GOLDEN[name])
    assert out == value and type(out) is type(value)


def test_aware_datetime_travels_as_utc() -> None:
    plus2 = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert encode(plus2) == GOLDEN["ext-timestamp32"]
    assert decode(GOLDEN["ext-timestamp32"]).utcoffset() == dt.timedelta(0)


def test_marker() -> None:
    assert marker_topic(NID, 1) == GOLDEN["marker"]
    assert GOLDEN["marker-notice"] == b"\x01" + GOLDEN["marker"]


@pytest.mark.parametrize(("pattern", "prefix"), [
    ("orders.created", b"orders.created"), ("orders.*", b"orders."), ("orders.>", b"orders."),
    ("a.b.>", b"a.b."), ("a.*.c", b"a."), ("*.created", b""), (">", b""),
])
def test_zmq_prefix_of_a_pattern(pattern: str, prefix: bytes) -> None:
    """PROTOCOL.md 6.3, the prefix rules and their examples."""
    assert zmq_prefix(pattern) == prefix
    shown = f"`{prefix.decode()}`" if prefix else "empty"
    assert f"`{pattern}` → {shown}" in doc_section(6)


def test_pattern_table() -> None:
    """Every row of the matching table in PROTOCOL.md 6.3 holds."""
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| (.+?) \|$", doc_section(6), re.M)
    assert len(rows) == 5
    for pattern, yes, no in rows:
        match = matcher(pattern)
        for topic in re.findall(r"`([^`]+)`", yes):
            assert match(topic), (pattern, topic)
        for topic in re.findall(r"`([^`]+)`", no):
            assert not match(topic), (pattern, topic)


# ---- a peer written from the document ------------------------------------------------------------
# Section 5: msgpack with str/bin distinguished, str map keys, ext types of 5.1.
def _doc_default(obj: Any) -> Any:
    if isinstance(obj, uuid.UUID):
        return msgpack.ExtType(1, obj.bytes)
    if isinstance(obj, decimal.Decimal):
        return msgpack.ExtType(2, str(obj).encode("ascii"))
    if isinstance(obj, set | frozenset):
        return msgpack.ExtType(3 if isinstance(obj, set) else 4, pack(list(obj)))
    if isinstance(obj, dt.datetime):  # only naive ones get here: aware ones are timestamps (-1)
        return msgpack.ExtType(5, obj.isoformat().encode("ascii"))
    if isinstance(obj, dt.date):
        return msgpack.ExtType(6, obj.isoformat().encode("ascii"))
    raise TypeError(f"no wire form for {type(obj).__name__}")


def _doc_ext(code: int, data: bytes) -> Any:
    if code == 1:
        return uuid.UUID(bytes=data)
    if code == 2:
        return decimal.Decimal(data.decode("ascii"))
    if code in (3, 4):
        items = unpack(data)
        assert type(items) is list
        return set(items) if code == 3 else frozenset(items)
    if code == 5:
        return dt.datetime.fromisoformat(data.decode("ascii"))
    if code == 6:
        return dt.date.fromisoformat(data.decode("ascii"))
    return msgpack.ExtType(code, data)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, datetime=True, default=_doc_default)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=True, timestamp=3, ext_hook=_doc_ext)


class DocPeer:
    """A peer that dials a node (section 18), built on plain zmq + msgpack."""

    def __init__(self, ctx: zmq.Context[Any], name: str, subs: list[str],
                 wq: dict[str, list[int]], services: list[str]) -> None:
        self.name, self.id = name, os.urandom(8).hex()
        self.subs, self.wq, self.services, self.sv = subs, wq, services, 1
        self.router = ctx.socket(zmq.ROUTER)  # not used here, but our ctl must be ours (8.3)
        self.xpub = ctx.socket(zmq.XPUB)
        self.dealer = ctx.socket(zmq.DEALER)
        self.sub = ctx.socket(zmq.SUB)
        for s in (self.router, self.xpub, self.dealer, self.sub):
            s.linger = 0
        self.router.bind("tcp://127.0.0.1:*")
        self.xpub.bind("tcp://127.0.0.1:*")
        self.ctl = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pub = self.xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inbox: list[tuple[str, dict[str, Any]]] = []
        self.node_id = ""  # the node's id, once welcomed
        self.last_sent = 0.0

    def close(self) -> None:
        for s in (self.router, self.xpub, self.dealer, self.sub):
            s.close()

    def offer(self) -> dict[str, Any]:  # 7.2
        return {"name": self.name, "id": self.id, "group": "default", "ctl": self.ctl,
                "pub": self.pub, "subs": self.subs, "sv": self.sv, "workers": sorted(self.wq),
                "services": self.services, "eps": {}, "wq": self.wq}

    def send(self, kind: str, fields: dict[str, Any]) -> None:  # 7.1, one frame (4)
        self.dealer.send(pack([1, kind, fields]))
        self.last_sent = time.monotonic()

    def hello(self, address: str, timeout: float = 3.0) -> dict[str, Any]:  # 8.1
        self.dealer.connect(address)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send("hello", self.offer())
            if self.dealer.poll(250):
                welcome = self.recv({"welcome"})
                self.node_id = welcome["id"]
                return welcome
        raise AssertionError("no welcome")

    def recv(self, kinds: Iterable[str], timeout: float = 3.0) -> dict[str, Any]:
        """The fields of the next control message of one of ``kinds``; keep the others."""
        kinds = set(kinds)
        deadline = time.monotonic() + timeout
        while True:
            for i, (kind, fields) in enumerate(self.inbox):
                if kind in kinds:
                    del self.inbox[i]
                    return fields
            if time.monotonic() - self.last_sent > 0.25:  # 9: stay alive
                self.send("ping", {"id": self.id})
            left = deadline - time.monotonic()
            assert left > 0, f"no {kinds} within {timeout}s (have {self.inbox})"
            if self.dealer.poll(min(100, int(left * 1000) + 1)):
                frames = self.dealer.recv_multipart()
                assert len(frames) == 1  # 4: one frame, no delimiter
                arr = unpack(frames[0])
                assert type(arr) is list and len(arr) >= 3 and arr[0] == 1
                assert type(arr[1]) is str and type(arr[2]) is dict
                if arr[1] == "ping" and "ping" not in kinds:
                    assert arr[2] == {"id": self.node_id}  # 9: pings come and go, unasked
                else:
                    self.inbox.append((arr[1], arr[2]))

    def subscribe(self, pub: str) -> None:  # 11.1: prefixes of our patterns, then the marker
        for pattern in self.subs:
            self.sub.setsockopt(zmq.SUBSCRIBE, _prefix(pattern))
        self.sub.setsockopt(zmq.SUBSCRIBE, b"\xff" + self.id.encode() + struct.pack(">I", self.sv))
        self.sub.connect(pub)

    def recv_pub(self, timeout: float = 3.0) -> tuple[str, list[Any]]:  # 4, 10.1
        assert self.sub.poll(int(timeout * 1000)), "no published message"
        frames = self.sub.recv_multipart()
        assert len(frames) == 2
        return frames[0].decode("utf-8"), unpack(frames[1])

    def wait_marker(self, node_id: str, sv: int, timeout: float = 3.0) -> list[bytes]:
        """11.2: read XPUB notices until the node's marker; return the notices before it."""
        marker = b"\x01\xff" + node_id.encode() + struct.pack(">I", sv)
        seen: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.xpub.poll(int(left * 1000) + 1):
                note = self.xpub.recv()
                if note[:2] == b"\x01\xff" and note[2:-4] == node_id.encode() \
                        and struct.unpack(">I", note[-4:])[0] >= sv:
                    return seen
                seen.append(note)
        raise AssertionError(f"no marker {marker!r}; saw {seen}")

    def publish(self, topic: str, body: Any, seq: int, headers: dict[str, Any] | None) -> None:
        self.xpub.send_multipart([topic.encode(), pack(
            [1, f"{self.id}-{seq:x}", self.name, self.id, seq, time.time(), headers, body])])


def _prefix(pattern: str) -> bytes:  # 6.3
    out: list[str] = []
    for seg in pattern.split("."):
        if seg in ("*", ">"):
            return (".".join(out) + ".").encode() if out else b""
        out.append(seg)
    return pattern.encode()


BODY = {"order": 42, "total": decimal.Decimal("9.99"),
        "ref": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "at": dt.datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC), "day": dt.date(2026, 1, 1),
        "local": dt.datetime(2026, 1, 1, 12, 30), "tags": {"a", "b"}, "raw": b"\x00\xff"}


@pytest.mark.timeout(20)
def test_doc_peer_dials_a_node() -> None:
    node = Node("proto-node", peers=[])
    inbox = Collector()
    node.subscribe("orders.*")(inbox)

    @node.rpc("node.add")
    def add(a: int, b: int = 0) -> int:
        return a + b

    @node.rpc("node.fail")
    def fail() -> None:
        raise KeyError("A1")

    node.start()
    ctx: zmq.Context[Any] = zmq.Context()
    peer = DocPeer(ctx, "doc-peer", ["orders.>", "deadletter.>"],
                   {"doc.jobs": [2, 3], "doc.doomed": [1, 1]}, ["doc.echo"])
    caller: threading.Thread | None = None
    try:
        # 8: handshake; 7.2: the welcome is the node's offer
        welcome = peer.hello(node.address)
        assert list(welcome) == OFFER_KEYS
        assert welcome["id"] == node.id and welcome["name"] == "proto-node"
        assert welcome["subs"] == ["orders.*"] and welcome["sv"] >= 1
        assert welcome["services"] == ["node.add", "node.fail"] and welcome["wq"] == {}
        wait_until(lambda: node.stats()["peers"] == 1, 3.0, what="the node to register us")

        # 10, 11: subscriber. The marker makes the node count us as a subscriber.
        peer.subscribe(welcome["pub"])
        assert node.wait_for_subscribers("orders.created", 1, timeout=3.0) == 1
        node.publish("orders.created", BODY, headers={"trace": "t-1"})
        topic, arr = peer.recv_pub()
        assert topic == "orders.created" and len(arr) >= 8 and arr[0] == 1
        _, mid, source, source_id, seq, ts, headers, body = arr[:8]
        assert (source, source_id, seq, headers, body) == (
            "proto-node", node.id, 1, {"trace": "t-1"}, BODY)
        assert type(mid) is str and type(ts) is float and abs(ts - time.time()) < 60

        # 10, 11: publisher. Once the node's marker arrives, its filters are in place.
        before = peer.wait_marker(welcome["id"], welcome["sv"])
        assert b"\x01orders." in before
        peer.publish("orders.paid", BODY, 1, None)
        peer.publish("orders.shipped", {"n": 1}, 1, {"k": "v"})
        peer.publish("orders.paid", {"n": 3}, 3, None)  # seq 2 never sent: a gap of 1 (10.3)
        got = [m for m in inbox.wait(4) if m.source_id == peer.id]  # 10.2: + its own message
        assert [(m.topic, m.seq, m.gap) for m in got] == [
            ("orders.paid", 1, 0), ("orders.shipped", 1, 0), ("orders.paid", 3, 1)]
        assert got[0].body == BODY and got[0].headers == {} and got[1].headers == {"k": "v"}
        assert got[0].source == "doc-peer" and got[0].source_id == peer.id
        assert node.stats()["gaps_by_sender"] == {"doc-peer": 1}

        # 13: RPC client
        peer.send("call", {"svc": "node.add", "id": "c1", "a": pack([[2], {"b": 3}]),
                           "ttl": 2.0})
        reply = peer.recv({"reply"})
        assert reply["id"] == "c1" and reply["ok"] is True and unpack(reply["r"]) == 5
        peer.send("call", {"svc": "node.fail", "id": "c2", "a": pack([[], {}]), "ttl": 2.0})
        reply = peer.recv({"reply"})
        assert reply["id"] == "c2" and reply["ok"] is False and "r" not in reply
        assert reply["e"]["type"] == "KeyError" and reply["e"]["message"] == "'A1'"
        assert "Traceback" in reply["e"]["traceback"]

        # 13: RPC server
        result: list[Any] = []
        caller = threading.Thread(
            target=lambda: result.append(node.call("doc.echo", "hi", n=2, timeout=3.0)))
        caller.start()
        call = peer.recv({"call"})
        assert set(call) == {"svc", "id", "a", "ttl"} and call["svc"] == "doc.echo"
        assert type(call["ttl"]) is float and 0 < call["ttl"] <= 3.0
        assert unpack(call["a"]) == [["hi"], {"n": 2}]
        peer.send("reply", {"id": call["id"], "ok": True, "r": pack({"echo": "hi"})})
        caller.join(3.0)
        assert result == [{"echo": "hi"}]

        # 12: worker. A failure is redelivered with att + 1; success finishes the task.
        tid = node.push("doc.jobs", {"n": 1}, key="k1", headers={"h": 1})
        task = peer.recv({"task"})
        assert list(task) == ["q", "id", "att", "key", "h", "b"]
        assert (task["q"], task["id"], task["att"], task["key"], task["h"]) == (
            "doc.jobs", tid, 1, "k1", {"h": 1})
        assert type(task["b"]) is bytes and unpack(task["b"]) == {"n": 1}
        peer.send("ack", {"q": "doc.jobs", "id": tid, "ok": False,
                          "e": {"type": "ValueError", "message": "try again", "traceback": ""}})
        task = peer.recv({"task"})
        assert (task["id"], task["att"]) == (tid, 2)
        peer.send("ack", {"q": "doc.jobs", "id": tid, "ok": True})
        node.wait_for_tasks("doc.jobs", timeout=3.0)

        # 12.6: max_attempts 1 -> the first failure dead-letters the task
        tid = node.push("doc.doomed", ["x"])
        task = peer.recv({"task"})
        peer.send("ack", {"q": "doc.doomed", "id": task["id"], "ok": False,
                          "e": {"type": "RuntimeError", "message": "no", "traceback": "tb"}})
        topic, arr = peer.recv_pub()
        assert topic == "deadletter.doc.doomed" and arr[2] == "proto-node"
        dead = arr[7]
        assert {k: dead[k] for k in ("queue", "id", "key", "body", "headers", "attempts")} == {
            "queue": "doc.doomed", "id": tid, "key": None, "body": ["x"], "headers": {},
            "attempts": 1}
        (err,) = dead["errors"]
        assert err["type"] == "RuntimeError" and err["worker"] == "doc-peer"
        assert err["attempt"] == 1 and type(err["at"]) is float
        node.wait_for_tasks("doc.doomed", timeout=3.0)
        assert node.stats()["deadlettered"] == 1

        # 14, 15: another version, garbage, an unknown kind: counted and dropped, no answer
        peer.send("ping", {"id": peer.id})
        peer.dealer.send(pack([2, "ping", {"id": peer.id}]))
        peer.dealer.send(b"\xc1")
        peer.dealer.send_multipart([b"", pack([1, "ping", {}])])  # a REQ-style delimiter
        peer.send("no-such-kind", {})
        wait_until(lambda: node.stats()["malformed"] == 4, 3.0, what="malformed == 4")
        assert node.stats()["bad_version"] == 1 and node.stats()["peers"] == 1

        # 9: the node pings us; our goodbye drops us at once
        assert peer.recv({"ping"}, timeout=1.0) == {"id": node.id}
        peer.send("bye", {"id": peer.id})
        wait_until(lambda: node.stats()["peers"] == 0, 3.0, what="the node to drop us")
        assert node.stats()["peer_leaves"] == 1
        # 9: a hello from an id that said bye is a stray overtaken by the bye: ignored
        joins = node.stats()["peer_joins"]
        peer.send("hello", peer.offer())
        assert not peer.dealer.poll(300), "a departed id was welcomed again"
        assert node.stats()["peers"] == 0 and node.stats()["peer_joins"] == joins

        # 15: every stats key is documented
        table = doc_section(15)
        for key in node.stats():
            assert f"`{key}`" in table, key
    finally:
        if caller is not None:
            caller.join(5.0)
        peer.close()
        ctx.term()
        node.stop()


@pytest.mark.timeout(20)
def test_a_node_dials_a_doc_peer() -> None:
    """The acceptor's side (8.1, 4): ROUTER frames, hello, update, pings, reset."""
    ctx: zmq.Context[Any] = zmq.Context()
    router, xpub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.XPUB)
    router.linger = xpub.linger = 0
    router.bind("tcp://127.0.0.1:*")
    xpub.bind("tcp://127.0.0.1:*")
    ctl = router.getsockopt_string(zmq.LAST_ENDPOINT)
    my_id = os.urandom(8).hex()
    node = Node("dialer", peers=[ctl])
    node.subscribe("x.*")(Collector())

    def recv(timeout: float = 2.0) -> tuple[bytes, str, dict[str, Any]]:
        assert router.poll(int(timeout * 1000)), "nothing from the node"
        frames = router.recv_multipart()
        assert len(frames) == 2  # routing id + one payload frame
        arr = unpack(frames[1])
        assert arr[0] == 1 and len(arr) == 3
        return frames[0], arr[1], arr[2]

    def recv_kind(kind: str, timeout: float = 2.0) -> tuple[bytes, dict[str, Any], float]:
        deadline = time.monotonic() + timeout
        while True:
            rid, k, fields = recv(deadline - time.monotonic())
            if k == kind:
                return rid, fields, time.monotonic()
            assert k in ("hello", "ping"), k  # hellos repeat until our welcome lands

    node.start()
    try:
        rid, fields, _ = recv_kind("hello")
        assert list(fields) == OFFER_KEYS
        assert fields["id"] == node.id and fields["ctl"] == node.address
        assert fields["subs"] == ["x.*"] and fields["sv"] == 1 and fields["eps"] == {}
        offer = {"name": "acceptor", "id": my_id, "ctl": ctl,
                 "pub": xpub.getsockopt_string(zmq.LAST_ENDPOINT)}  # the required keys only
        router.send_multipart([rid, pack([1, "welcome", offer])])
        _, update, _ = recv_kind("update")
        assert update["id"] == node.id and list(update) == OFFER_KEYS
        # 11.1: the node's SUB sends its prefixes, then its marker
        notes: list[bytes] = []
        while not notes or notes[-1][:2] != b"\x01\xff":
            assert xpub.poll(2000)
            notes.append(xpub.recv())
        assert notes == [b"\x01x.", b"\x01\xff" + node.id.encode() + struct.pack(">I", 1)]
        # 9: pings every heartbeat_interval / 2
        _, ping, t1 = recv_kind("ping")
        _, _, t2 = recv_kind("ping")
        assert ping == {"id": node.id} and 0.1 < t2 - t1 < 0.6
        # 9: a reset makes the dialer drop us and say hello again
        router.send_multipart([rid, pack([1, "reset", {"id": my_id}])])
        _, again, _ = recv_kind("hello")
        assert again["id"] == node.id
        assert node.stats()["peer_leaves"] == 1
    finally:
        node.stop()
        router.close()
        xpub.close()
        ctx.term()


@pytest.mark.timeout(20)
def test_batched_tasks_and_acks_only_between_peers_that_accept_them() -> None:
    """12.8 with a peer written from the document: who may send `tasks`/`acks`, and what they
    mean, both ways."""
    node = Node("proto-batch", peers=[])
    ran: list[Any] = []

    @node.worker("node.work", concurrency=4)
    def work(msg: Any) -> None:
        ran.append((msg.id, msg.attempt, msg.key, msg.headers, msg.body))
        if msg.body == "bad":
            raise ValueError("bad body")

    node.start()
    ctx: zmq.Context[Any] = zmq.Context()
    peer = DocPeer(ctx, "doc-batcher", [], {"doc.plain": [8, 3], "doc.batch": [8, 3]}, [])

    def take(want: int) -> list[tuple[str, list[Any]]]:
        """(kind, entries) of the next task messages, until ``want`` tasks have come."""
        got: list[tuple[str, list[Any]]] = []
        while sum(len(e) for _, e in got) < want:
            fields = peer.recv({"task", "tasks"})
            if "t" in fields:
                got.append(("tasks", fields["t"]))
            else:
                got.append(("task", [[fields[k] for k in ("id", "att", "key", "h", "b")]]))
        return got

    try:
        peer.hello(node.address)
        wait_until(lambda: node.stats()["peers"] == 1, 3.0, what="the node to register us")

        # A worker that never sets bt only ever gets single tasks, however many are waiting.
        for i in range(12):
            node.push("doc.plain", i)
        got = take(8)
        assert {kind for kind, _ in got} == {"task"}
        for _, [entry] in got:
            peer.send("ack", {"q": "doc.plain", "id": entry[0], "ok": True})
        got = take(4)
        assert {kind for kind, _ in got} == {"task"}
        for _, [entry] in got:
            peer.send("ack", {"q": "doc.plain", "id": entry[0], "ok": True})
        node.wait_for_tasks("doc.plain", timeout=3.0)

        # An ack with bt true: from then on, tasks come batched, [id, att, key, h, b] each.
        tid = node.push("doc.batch", "first", key="k", headers={"h": 1})
        task = peer.recv({"task"})
        assert task["id"] == tid
        peer.send("ack", {"q": "doc.batch", "id": tid, "ok": True, "bt": True})
        node.wait_for_tasks("doc.batch", timeout=3.0)
        ids = [node.push("doc.batch", i) for i in range(10)]
        got = take(8)   # the credit: 8 at most un-acked
        assert {kind for kind, _ in got} == {"tasks"}
        entries = [e for _, batch in got for e in batch]
        assert [e[0] for e in entries] == ids[:8]
        assert all(e[1:4] == [1, None, {}] and unpack(e[4]) == i for i, e in enumerate(entries))
        wait_until(lambda: (node.stats()["tasks_inflight"], node.stats()["tasks_backlog"])
                   == (8, 2), 3.0, what="8 in flight, 2 waiting for credit")
        # acks: each id is an ok ack; an unknown id is a late ack
        peer.send("acks", {"q": "doc.batch", "ids": ids[:8] + ["no-such-task"]})
        rest = [e for _, batch in take(2) for e in batch]
        assert [e[0] for e in rest] == ids[8:]
        # a failure goes back as a single ack, and is redelivered with att + 1
        peer.send("acks", {"q": "doc.batch", "ids": [ids[8]]})
        peer.send("ack", {"q": "doc.batch", "id": ids[9], "ok": False,
                          "e": {"type": "ValueError", "message": "again", "traceback": ""}})
        [(kind, [again])] = take(1)
        assert (kind, again[0], again[1]) == ("tasks", ids[9], 2)
        peer.send("acks", {"q": "doc.batch", "ids": [ids[9]]})
        node.wait_for_tasks("doc.batch", timeout=3.0)
        stats = node.stats()
        assert stats["late_acks"] == 1 and stats["tasks_failed"] == 1
        assert stats["tasks_completed"] == 12 + 1 + 10 and stats["malformed"] == 0

        # The other way: a single task is acked with bt true ...
        peer.send("task", {"q": "node.work", "id": "p1", "att": 1, "key": None, "h": {},
                           "b": pack("one")})
        assert peer.recv({"ack"}) == {"q": "node.work", "id": "p1", "ok": True, "bt": True}
        # ... and a pusher that sends tasks gets acks; failures and refusals stay single.
        peer.send("tasks", {"q": "node.work", "t": [
            ["p2", 1, "k2", {"h": 2}, pack("two")],
            ["p3", 3, None, {}, pack("bad")],
            [4, 1, None, {}, pack("id is not a str")],   # malformed entry: skipped
            ["p4", 1, None, {}, pack("four"), "extra elements are ignored"]]})
        peer.send("tasks", {"q": "not.worked.here", "t": [["p5", 1, None, {}, pack(5)]]})
        acked: list[str] = []
        while len(acked) < 2:
            acked += peer.recv({"acks"})["ids"]
        assert sorted(acked) == ["p2", "p4"]
        failed = peer.recv({"ack"})
        refused = peer.recv({"ack"})
        if failed["id"] == "p5":
            failed, refused = refused, failed
        assert failed["id"] == "p3" and failed["ok"] is False and failed["bt"] is True
        assert failed["e"]["type"] == "ValueError" and failed["e"]["message"] == "bad body"
        assert refused == {"q": "not.worked.here", "id": "p5", "ok": False, "retry": True,
                           "bt": True}
        assert sorted(r[:4] for r in ran) == [
            ("p1", 1, None, {}), ("p2", 1, "k2", {"h": 2}), ("p3", 3, None, {}),
            ("p4", 1, None, {})]
        # malformed batches: counted and dropped (15)
        peer.send("tasks", {"q": "node.work", "t": "not an array"})
        peer.send("acks", {"q": 7, "ids": []})
        wait_until(lambda: node.stats()["malformed"] == 3, 3.0, what="malformed == 3")
    finally:
        peer.close()
        ctx.term()
        node.stop()
