"""The device side: the runner (head, exits, offload, local completion), failover across
nodes, and the per-node circuit breaker."""
