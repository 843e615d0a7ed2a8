"""traces.assert_one_complete_trace on Jaeger answers of the shapes the platform tests see (no platform): it
looks again until the trace is complete, says what it saw last when it never is, and finds a second root."""

from __future__ import annotations

import json

import pytest

from .traces import SHOWN, assert_one_complete_trace

GATEWAY = "emporium-ingressgateway.istio-system"
SPANS = [
    # (span id, parent span id, service, operation)
    ("a", None, GATEWAY, "router outbound|8000||orders.emporium.svc.cluster.local egress"),
    ("b", "a", "orders", "POST /orders"),
    ("c", "b", "products", "POST /internal/stock/reservations"),
    ("d", "b", "orders", "emporium.events publish"),
    ("e", "d", "notifications", "notifications.events process"),
    ("f", "e", "notifications", "smtp send"),
]


def answer(spans: list[tuple[str, str | None, str, str]]) -> str:
    """Jaeger's answer to /api/traces/<id> holding these spans."""
    processes = {f"p-{service}": {"serviceName": service} for _, _, service, _ in spans}
    rows = [
        {
            "spanID": span,
            "operationName": operation,
            "processID": f"p-{service}",
            "references": [] if parent is None else [{"refType": "CHILD_OF", "spanID": parent}],
        }
        for span, parent, service, operation in spans
    ]
    return json.dumps({"data": [{"traceID": "t1", "spans": rows, "processes": processes}]})


class Jaeger:
    """Answers (or raises) the given things in turn, the last one for ever."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers, self.asked = list(answers), []

    def __call__(self, trace_id: str) -> str:
        self.asked.append(trace_id)
        reply = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_looks_again_until_the_trace_is_complete():
    jaeger = Jaeger(
        RuntimeError("the proxy is not ready"),
        '{"data": null, "errors": [{"code": 404, "msg": "trace not found"}]}',
        answer(SPANS[:3]),  # stored so far: the HTTP part only
        answer(SPANS),
    )
    data = assert_one_complete_trace(jaeger, "t1", timeout=10, interval=0.01)
    assert jaeger.asked == ["t1"] * 4
    assert {s["spanID"] for s in data["spans"]} == {"a", "b", "c", "d", "e", "f"}


def test_an_incomplete_trace_fails_with_the_last_answer_seen():
    long = answer(SPANS[:3])
    assert len(long) > SHOWN
    with pytest.raises(AssertionError) as failure:
        assert_one_complete_trace(Jaeger(long), "t1", timeout=0.2, interval=0.01)
    message = str(failure.value)
    assert "trace t1 incomplete" in message
    assert "'orders', 'products'" in message  # what it had
    assert f"last seen: the answer {long[:SHOWN]}... ({len(long)} characters)" in message


def test_a_trace_never_answered_fails_with_the_last_error_seen():
    jaeger = Jaeger(answer(SPANS[:3]), RuntimeError("kubectl get --raw: 503 Service Unavailable"))
    with pytest.raises(AssertionError) as failure:
        assert_one_complete_trace(jaeger, "t1", timeout=0.2, interval=0.01)
    assert "last seen: RuntimeError('kubectl get --raw: 503 Service Unavailable')" in str(failure.value)

    with pytest.raises(AssertionError) as failure:
        assert_one_complete_trace(Jaeger("<html>bad gateway</html>"), "t1", timeout=0.2, interval=0.01)
    assert "reading the answer <html>bad gateway</html>" in str(failure.value)


def test_a_span_whose_parent_is_missing_is_a_second_root():
    orphan = [*SPANS[:5], ("f", "x", "notifications", "smtp send")]
    with pytest.raises(AssertionError, match="smtp send"):
        assert_one_complete_trace(Jaeger(answer(orphan)), "t1", timeout=10, interval=0.01)


def test_the_root_must_be_the_gateways():
    spans = [(s, p, "orders" if s == "a" else svc, op) for s, p, svc, op in SPANS]
    spans.append(("g", "b", GATEWAY, "egress"))  # the gateway is in the trace, not at its root
    with pytest.raises(AssertionError, match=r"the root is orders's .*, not the gateway's"):
        assert_one_complete_trace(Jaeger(answer(spans)), "t1", timeout=10, interval=0.01)
