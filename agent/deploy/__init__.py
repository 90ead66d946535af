"""The agent's deployment side: download an artifact over MQTT, verify it, self-test it, switch atomically.

Modules, from the inside out:

* ``states``: the explicit ``(state, event) -> state`` table and what resuming means.
* ``record``: the persisted record of the current deployment and its stores (disk, memory).
* ``bitmap``, ``storage``, ``disk``, ``memory``: which chunks are held, and the two slots behind
  ``SlotStorage`` (files on disk for devices; hashes in memory for simulated fleets).
* ``verify``: manifest and rollback-grant checks against the pinned key.
* ``actions``: what the manager asks for (transport actions and jobs) and the results fed back.
* ``manager``: the sans-IO ``DeploymentManager`` (commands, chunk frames, results and time in; actions out).
* ``selftest``, ``shadow``, ``modelops``, ``jobs``: the heavy work, run off the network thread.
* ``driver``: ``DeploymentDriver``, which the agent service instantiates and hands to ``AgentCore``.

This ``__init__`` imports nothing so that ``agent.core`` can use the action types without an import cycle.
"""
