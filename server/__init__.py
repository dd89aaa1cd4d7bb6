"""lossd server: the loss registry, compute engine and gRPC service."""
