"""The edge node: settings, a data plane over a registry of served models, dynamic batching,
gRPC servicers, the ``edge-node`` server and a process launcher."""
