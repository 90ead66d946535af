"""Tunables of the deployment manager, with the defaults the agent settings use."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeployConfig:
    """How the manager paces downloads and guards against crash loops."""

    #: no new chunk for this long: ask for the missing ones (the broadcast is over or we lost some)
    chunk_idle_s: float = 2.0
    #: at most this many chunks asked for and not yet received (one ChunkRequest carries at most 256 ranges)
    request_window: int = 256
    #: chunks asked for that have not come after this long are asked for again
    request_timeout_s: float = 10.0
    #: a device that lacks at most this share of an artifact's bytes after copying what its installed model
    #: shares with it asks for the missing chunks alone instead of following the broadcast (``delta.py``)
    sparse_fraction: float = 0.05
    #: download progress is reported (and the held-chunks bitmap checkpointed) at most this often
    progress_interval_s: float = 1.0
    #: starts in the same state without progress before the deployment is given up (crash-loop guard)
    max_starts: int = 3
    #: a switched model that served this long is healthy: the crash-loop counter of ACTIVE is reset
    healthy_after_s: float = 60.0
    #: corrupt chunks found after assembly are fetched again at most this many times
    max_repairs: int = 3
    #: cap on the bytes the two slots may use together (0: no cap besides the free space)
    store_max_bytes: int = 0
    #: free space to leave on the file system for everything else (spool, logs)
    disk_reserve_bytes: int = 16 * 1024 * 1024
    #: deployment ids remembered with their outcome so a repeated command is answered, not redone
    history_size: int = 64
