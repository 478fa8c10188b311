"""Multi-host test bed: device, edge nodes and controller in their own network namespaces."""
