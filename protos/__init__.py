"""Generated gRPC code for the data plane (``inference``) and control plane (``edgesplit.v1``).

Sources are the ``.proto`` files beside this module; regenerate with
``python -m edgesplit.protos.generate``.
"""
