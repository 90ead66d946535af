import pytest

from wire import topics
from wire.topics import DeviceChannel


def test_topics_are_versioned_and_carry_the_device_id() -> None:
    assert topics.state("pump-7") == "slmfleet/v1/dev/pump-7/state"
    assert topics.telemetry("pump-7") == "slmfleet/v1/dev/pump-7/telemetry"
    assert topics.events("pump-7") == "slmfleet/v1/dev/pump-7/events"
    assert topics.cmd("pump-7") == "slmfleet/v1/dev/pump-7/cmd"
    assert topics.all_devices(DeviceChannel.TELEMETRY) == "slmfleet/v1/dev/+/telemetry"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+b", "dev#1", "-lead", "x" * 129, "sp ace"])
def test_ids_that_would_break_topics_or_acls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid device id"):
        topics.state(bad)
    assert topics.parse_device(f"slmfleet/v1/dev/{bad}/state") is None


def test_parse_device_round_trips_and_rejects_other_topics() -> None:
    parsed = topics.parse_device(topics.events("edge.01:a"))
    assert parsed == topics.DeviceTopic("edge.01:a", DeviceChannel.EVENTS)
    for other in ["slmfleet/v2/dev/a/state", "slmfleet/v1/dev/a/other", "slmfleet/v1/dev/a/state/x", "x"]:
        assert topics.parse_device(other) is None


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("$share/g/a/+", "a/b", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_matching(filter_: str, topic: str, expected: bool) -> None:
    assert topics.matches(filter_, topic) is expected


def test_parsed_device_topics_are_cached_and_bad_ones_stay_refused() -> None:
    good = topics.telemetry("cache-dev-1")
    before = topics.parse_device.cache_info().hits
    first = topics.parse_device(good)
    assert topics.parse_device(good) is first  # the same (immutable) answer, from the cache
    assert first == topics.DeviceTopic("cache-dev-1", topics.DeviceChannel.TELEMETRY)
    for bad in ("slmfleet/v1/dev/-bad/telemetry", "slmfleet/v1/dev/a/nope", "slmfleet/v1/dev/a+b/state"):
        assert topics.parse_device(bad) is None
        assert topics.parse_device(bad) is None
    assert topics.parse_device.cache_info().hits >= before + 4
    assert topics.parse_device.cache_info().maxsize == 65_536  # bounded: forged topics cannot grow it
