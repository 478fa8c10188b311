"""Runtime: tensor codec, data plane, node server, device runner, metrics, link emulator, CLI.

The engine modules (``codec``, ``dataplane``, ``device``) import no gRPC; ``grpc_server``
and ``client`` convert messages and delegate.
"""
