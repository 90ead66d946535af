"""The core's actions carried out over a transport and the store-and-forward outbox.

The one action interpreter of the device process (``agent.runtime.service``) and of the virtual devices
(``simulations.device.virtual``): what the sans-IO core and the deployment driver ask for (publish,
subscribe, unsubscribe, reconnect) becomes calls on the transport, durable messages going through the
outbox first. Runs on the thread that owns the transport (the event loop).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.core.actions import Publish, Subscribe
from agent.core.core import CoreAction, Reconnect, Unsubscribe
from agent.core.outbox import Outbox
from agent.transport.base import Transport

__all__ = ["CoreShell"]


class CoreShell:
    """Carries out ``CoreAction``s.

    ``transport`` returns the current connection (None while there is none: durable messages wait in the
    outbox, the rest is dropped). ``reconnect`` is called for a ``Reconnect`` (ignored without it);
    ``on_publish`` sees every message before it is sent or spooled.
    """

    def __init__(
        self,
        outbox: Outbox,
        transport: Callable[[], Transport | None],
        *,
        reconnect: Callable[[Reconnect], None] | None = None,
        on_publish: Callable[[Publish], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self._transport = transport
        self._reconnect = reconnect
        self._on_publish = on_publish

    def execute(self, actions: Iterable[CoreAction], pump: bool = True) -> None:
        """Carry out ``actions`` in order; then (with ``pump``) send what the outbox may send now."""
        transport = self._transport()
        for action in actions:
            if isinstance(action, Publish):
                if self._on_publish is not None:
                    self._on_publish(action)
                if action.durable:
                    self.outbox.add(action)
                elif transport is not None:
                    transport.publish(action.topic, action.payload, action.qos, action.retain)
            elif isinstance(action, Subscribe):
                if transport is not None:
                    transport.subscribe(action.filter, action.qos)
            elif isinstance(action, Unsubscribe):
                if transport is not None:
                    transport.unsubscribe(action.filter)
            elif isinstance(action, Reconnect) and transport is not None and self._reconnect is not None:
                self._reconnect(action)
        if pump:
            self.pump()

    def pump(self) -> None:
        """Send spooled messages, oldest first, as far as the outbox's in-flight limit allows (when connected)."""
        transport = self._transport()
        if transport is not None and transport.connected:
            self.outbox.pump(transport.publish)

    def acked(self, mid: int) -> bool:
        """The broker has message ``mid``: True when it was the outbox's (its entry leaves the spool and the
        next ones go out)."""
        if not self.outbox.acked(mid):
            return False
        transport = self._transport()
        if transport is not None:
            self.outbox.pump(transport.publish)
        return True
