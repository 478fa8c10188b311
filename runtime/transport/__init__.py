"""Transport: Open Inference Protocol conversion shared by servicer and client, the client,
bearer tokens and TLS."""
