"""What the DeploymentManager asks for, and the results its driver feeds back.

Transport actions (``Publish``, ``Subscribe``, ``Unsubscribe``) go to the MQTT connection. Jobs are heavy
or blocking work (allocating and copying files, hashing, loading and self-testing models, switching)
that the driver runs one at a time off the network thread; each job that the state machine waits for
carries a ``token`` and comes back as a result with the same token, so a result that arrives after the
deployment moved on (cancelled, superseded) is recognised and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.actions import Publish, Subscribe
from agent.core.core import Unsubscribe
from agent.deploy.bitmap import ChunkBitmap
from wire.manifest import SignedManifest
from wire.messages import ShadowSpec


@dataclass(frozen=True, slots=True)
class InstalledChanged:
    """The installed or active models changed: publish a fresh (retained) birth message."""


# ------------------------------------------------------------------- jobs --


@dataclass(frozen=True, slots=True)
class Prepare:
    """Make ``slot`` ready for ``signed`` (resume or empty it, preallocate) and copy the chunks that
    ``source_slot`` already holds (delta for free)."""

    token: int
    slot: str
    signed: SignedManifest
    source_slot: str | None
    #: chunks found corrupt after assembly: no longer held, fetched (or copied) again
    discard: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Make the chunks written so far durable and record ``held`` as held."""

    token: int
    slot: str
    held: bytes


@dataclass(frozen=True, slots=True)
class Verify:
    """Check the files, then self-test the candidate; keep it loaded when it is about to serve or shadow.

    ``fresh`` (a chunk bitmap, ``ChunkBitmap.to_bytes``) names the chunks this process received, checked
    against their signed sha256 and wrote during this download: they are not read back. Every other
    chunk (copied, resumed after a restart, held by a slot verified before) is read back and checked,
    and a file the manifest's chunks do not cover whole is hashed whole (``jobs.JobRunner._verify``).
    """

    token: int
    slot: str
    signed: SignedManifest
    keep: bool
    fresh: bytes = b""


@dataclass(frozen=True, slots=True)
class Switch:
    """Load ``slot`` (None: the model that served before any slot), point at it and serve it."""

    token: int
    slot: str | None
    signed: SignedManifest | None
    purpose: str


@dataclass(frozen=True, slots=True)
class Serve:
    """At start: serve what the pointer names (no pointer change)."""

    token: int
    slot: str
    signed: SignedManifest


@dataclass(frozen=True, slots=True)
class StartShadow:
    token: int
    slot: str
    signed: SignedManifest
    spec: ShadowSpec


@dataclass(frozen=True, slots=True)
class StopShadow:
    token: int


@dataclass(frozen=True, slots=True)
class Discard:
    """Drop a loaded candidate of ``slot`` that will not serve (cancel, failure)."""

    slot: str


@dataclass(frozen=True, slots=True)
class Release:
    """Free ``slot`` (after a Commit)."""

    token: int
    slot: str


Job = Prepare | Checkpoint | Verify | Switch | Serve | StartShadow | StopShadow | Discard | Release
TransportAction = Publish | Subscribe | Unsubscribe
Action = TransportAction | InstalledChanged | Job


# ---------------------------------------------------------------- results --


@dataclass(frozen=True, slots=True)
class Prepared:
    token: int
    bitmap: ChunkBitmap | None
    copied: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class Checkpointed:
    token: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class Verified:
    token: int
    ok: bool
    reason: str = ""
    corrupt: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Switched:
    token: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Served:
    token: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ShadowReport:
    token: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True, slots=True)
class Released:
    token: int
    error: str = ""


Result = Prepared | Checkpointed | Verified | Switched | Served | ShadowReport | Released
