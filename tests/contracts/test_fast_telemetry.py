"""The controller's msgspec telemetry decoder (issue 16) against the wire contract's pydantic model: on payloads
at and past every bound, of every wrong type, left out, null, extra, too long, not JSON, both accept the same
ones, store the same JSON, and refuse the others with the same reason and detail."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from controller.telemetry import fast
from wire import codec
from wire.messages import (
    MAX_BYTES,
    MAX_CPU_PERCENT,
    MAX_LATENCY_MS,
    MAX_METRIC,
    MAX_RATE,
    MAX_TEMPERATURE_C,
    MAX_TS,
    MAX_UPTIME_S,
    MIN_TEMPERATURE_C,
)
from wire.topics import DeviceChannel

LIMIT = 65536

FULL: dict[str, Any] = {
    "v": 1,
    "ts": 1_700_000_000.25,
    "type": "telemetry",
    "seq": 7,
    "interval_s": 10.0,
    "uptime_s": 3600,
    "cpu_percent": 23.5,
    "rss_bytes": 118_000_000,
    "temperature_c": 41.5,
    "model": {"model": "intent", "version": 3, "variant": "int8"},
    "inference": {
        "count": 100,
        "errors": 1,
        "drops": 2,
        "queue_depth": 3,
        "throughput_per_s": 9.5,
        "latency": {
            "p50_ms": 3.1,
            "p95_ms": 7.9,
            "p99_ms": 12.4,
            "mean_ms": 3.6,
            "max_ms": 15.0,
            "buckets": [[64, 80], [70, 20]],
        },
        "tokens": 5,
        "tokens_per_s": 1.5,
        "drift": {"label_counts": {"a": 1, "b": 2}, "score_hist": [1, 2, 3], "score_edges": [0.0, 0.5, 1.0, 1.5]},
    },
    "spool_depth": 4,
    "spool_dropped": 5,
    "serving_s": 60.0,
    "model_rss_bytes": 1_000_000,
}

BOUNDS = [MAX_TS, MAX_LATENCY_MS, MAX_CPU_PERCENT, MAX_BYTES, MAX_UPTIME_S, MAX_RATE, MAX_METRIC, 86_400, 2**63 - 1]
BOUNDS += [MIN_TEMPERATURE_C, MAX_TEMPERATURE_C, -MAX_METRIC, 2**31 - 1]
VALUES: list[Any] = [0, 1, -1, 0.0, -0.0, 0.5, -0.5, 2, 2.0, 2.5, 1e-300, 1e300, -1e300, 2**63, 2**64, 10**30]
VALUES += [b + d for b in BOUNDS for d in (0, 1, -1)] + [b * f for b in BOUNDS for f in (1.0000001, 0.9999999)]
VALUES += ["5", "2.5", "", "x", "a" * 128, "a" * 129, "é" * 128, True, False, None, [], {}, [1, 2], [1, 2, 3]]
VALUES += [{"model": "m", "version": 1, "variant": "v"}, {"count": 1}, {"p50_ms": 1}, 1, "telemetry", "online"]


def _leaves(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    out = copy.deepcopy(obj)
    target = out
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return out


def _payloads() -> Iterator[bytes]:
    bare = {k: FULL[k] for k in ("ts", "seq", "interval_s", "uptime_s", "cpu_percent", "rss_bytes")}
    for base in (FULL, bare):
        yield json.dumps(base).encode()
        for path in _leaves(base):
            if not path:
                continue
            yield json.dumps(_set(base, path, None, delete=True)).encode()
            for value in VALUES:
                yield json.dumps(_set(base, path, value)).encode()
    inf = FULL["inference"]
    for key, item, n in (("buckets", [1, 1], 256), ("score_hist", 1, 64), ("score_edges", 0.5, 65)):
        for count in (n, n + 1):
            where = inf["latency"] if key == "buckets" else inf["drift"]
            where = {**where, key: [item] * count}
            part = "latency" if key == "buckets" else "drift"
            yield json.dumps({**FULL, "inference": {**inf, part: where}}).encode()
    for count in (256, 257):
        drift = {**inf["drift"], "label_counts": {f"l{i}": i for i in range(count)}}
        yield json.dumps({**FULL, "inference": {**inf, "drift": drift}}).encode()
    for key in ("", "k" * 128, "k" * 129):
        yield json.dumps({**FULL, "inference": {**inf, "drift": {"label_counts": {key: 1}}}}).encode()
    text = json.dumps(FULL)
    yield text.replace('"cpu_percent": 23.5', '"cpu_percent": NaN').encode()
    yield text.replace('"cpu_percent": 23.5', '"cpu_percent": Infinity').encode()
    yield text.replace('"cpu_percent": 23.5', '"cpu_percent": -Infinity').encode()
    yield text.replace('"cpu_percent": 23.5', '"cpu_percent": 1e400').encode()
    yield text.replace('"seq": 7', '"seq": 7, "seq": -1').encode()  # a repeated key
    yield text.replace('"seq": 7', '"seq": -1, "seq": 7').encode()
    yield text.replace('"variant": "int8"', '"variant": "\\ud800"').encode()  # a lone surrogate
    yield text.replace('"variant": "int8"', '"variant": "in\\u0000t8"').encode()
    yield text.replace('"int8"', '"\\u00e9t\\u00e9"').encode()
    yield text.encode().replace(b"int8", b"in\xfft8")  # not UTF-8
    yield text.encode() + b" x"
    yield text.encode() + b"  \n"
    yield (" " + text).encode()
    yield b'{"extra": {"deep": [1, 2, {"x": null}]}, ' + text[1:].encode()  # unknown fields are ignored
    yield text.replace('"seq": 7', '"seq": 7.0').encode()
    yield text.replace('"seq": 7', '"seq": 7.5').encode()
    yield text.replace('"seq": 7', '"seq": 7e0').encode()
    yield text.replace('"rss_bytes": 118000000', '"rss_bytes": 1.18e8').encode()
    yield from (b"", b"{}", b"[]", b"null", b"1", b'"x"', b"{", b"not json", b"{" * 5000, b" " * 10)
    yield b"{" + b" " * (LIMIT + 10) + b"}"


def _outcome(decode: Any, payload: bytes) -> tuple[Any, ...]:
    try:
        msg = decode(payload)
    except codec.PayloadError as exc:
        return ("refused", exc.reason, exc.detail)
    # the same text, but that pydantic writes 1e18 as 1e+18 (msgspec: 1e18): the same JSON number
    return ("accepted", fast.to_json(msg).replace("e+", "e"), json.dumps(fast.to_dict(msg)))


def test_the_fast_decoder_accepts_and_refuses_as_the_contract_does() -> None:
    def contract(p: bytes) -> Any:
        return codec.decode(DeviceChannel.TELEMETRY, p, LIMIT)

    payloads = list(_payloads())
    assert len(payloads) > 2000
    fast_taken = accepted = 0
    for payload in payloads:
        want = _outcome(contract, payload)
        got = _outcome(lambda p: fast.decode(p, LIMIT), payload)
        assert got == want, payload[:300]
        if want[0] == "accepted":
            accepted += 1
            fast_taken += isinstance(fast.decode(payload, LIMIT), fast.FastTelemetry)
    # both kinds are exercised: most accepted payloads take msgspec's path, the looser ones pydantic's
    assert accepted > 1000 and accepted - 100 > fast_taken > accepted // 2, (accepted, fast_taken)


def test_stored_json_and_replaced_values_are_the_contract_s() -> None:
    payload = json.dumps(FULL).encode()
    quick = fast.decode(payload, LIMIT)
    model = codec.decode(DeviceChannel.TELEMETRY, payload, LIMIT)
    assert isinstance(quick, fast.FastTelemetry)
    assert fast.to_json(quick) == model.model_dump_json(exclude_none=True)
    assert fast.to_dict(quick) == model.model_dump(mode="json", exclude_none=True)
    clamped = fast.replace(quick, cpu_percent=400.0, rss_bytes=2**30)
    assert fast.to_json(clamped) == model.model_copy(update={"cpu_percent": 400.0, "rss_bytes": 2**30}).model_dump_json(
        exclude_none=True
    )
    assert quick.cpu_percent == 23.5  # a copy: the decoded message is left as it was
    left_out = fast.decode(
        b'{"ts": 1, "seq": 0, "interval_s": 1, "uptime_s": 0, "cpu_percent": 0, "rss_bytes": 0}', LIMIT
    )
    assert not left_out.inference and not left_out.model and not left_out.temperature_c  # UNSET: false, as None


@pytest.mark.parametrize("size", [0, LIMIT + 1])
def test_size_limits_are_the_contract_s(size: int) -> None:
    payload = b" " * size
    with pytest.raises(codec.PayloadError) as exc:
        fast.decode(payload, LIMIT)
    assert exc.value.reason == ("empty" if size == 0 else "too_large")


def test_the_structs_name_every_field_of_the_contract_in_its_order() -> None:
    """A field added to ``wire.messages.Telemetry`` (or its parts) and not to the structs would be dropped
    silently from what is stored: this fails first."""
    import msgspec
    from pydantic import BaseModel

    from wire import messages

    pairs = [(fast.FastTelemetry, messages.Telemetry)]
    pairs += [(getattr(fast, name), getattr(messages, name)) for name in ("ModelRef", "LatencySummary")]
    pairs += [(getattr(fast, name), getattr(messages, name)) for name in ("DriftStats", "InferenceStats")]
    for struct, model in pairs:
        assert issubclass(model, BaseModel)
        assert [f.name for f in msgspec.structs.fields(struct)] == list(model.model_fields), struct.__name__
        for f in msgspec.structs.fields(struct):
            required = model.model_fields[f.name].is_required()
            assert required == (f.required), (struct.__name__, f.name)
