"""The artifact id of a manifest, computed once per manifest object.

``Manifest.artifact_id`` hashes the canonical JSON of the whole manifest on every access: tens of
milliseconds for a large model's chunk list. The deployment code asks for it often, so it goes
through here. Entries hold the manifest itself so an ``id()`` cannot be reused while cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from wire.manifest import Manifest

_MAX = 256
_lock = threading.Lock()
_cache: OrderedDict[int, tuple[Manifest, str]] = OrderedDict()


def artifact_id(manifest: Manifest) -> str:
    """``manifest.artifact_id``, cached."""
    key = id(manifest)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is manifest:
            _cache.move_to_end(key)
            return hit[1]
    value = manifest.artifact_id
    with _lock:
        _cache[key] = (manifest, value)
        while len(_cache) > _MAX:
            _cache.popitem(last=False)
    return value
