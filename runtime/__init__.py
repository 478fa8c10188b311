"""Runtime: plans, codec, metrics and the CLI, with the node, the device side and the transport.

- ``plan``, ``codec``, ``inference`` (transport-neutral messages), ``metrics``, ``cli``;
- ``node/``: settings, the data plane over a registry of served models, dynamic batching,
  gRPC servicers, the ``edge-node`` server and a process launcher;
- ``device/``: the device runner, failover across nodes, the circuit breaker;
- ``transport/``: Open Inference Protocol conversion (shared by servicer and client), the
  client, bearer tokens and TLS.

The engine (models, the node's data plane, the device runner) imports no gRPC; the
servicers and the client convert messages and delegate.
"""
