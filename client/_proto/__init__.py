"""Generated protobuf and gRPC code; regenerate with proto/generate.py."""
