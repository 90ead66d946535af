"""Virtual fleets that run the real agent code on simulated hardware and networks, to rehearse rollouts.

``slmfleet simulate SCENARIO.yaml`` (``simulations.runner.run_scenario``) starts a broker and a controller
(or uses running ones), registers the scenario's models, runs N virtual devices in worker processes (each
device: ``AgentCore``, ``DeploymentManager`` over memory slots, the outbox and spool, its own MQTT connection),
injects the scheduled faults, creates the rollout through the REST API, follows it and writes a JSON and a
self-contained HTML report with the expectations checked.

Modules: ``scenario`` (the file format), ``plan`` (devices from profiles, tags, faults), ``device`` (one
virtual device and its simulated hardware, inference and network), ``worker`` (a process of devices),
``runner`` (the phases), ``assertions``, ``report`` and ``svg`` (the HTML page), ``console`` (live view),
``models`` (small real ONNX models to register), ``infra`` (broker, controller, REST client).
"""
