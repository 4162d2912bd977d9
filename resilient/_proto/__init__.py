"""Generated protobuf/gRPC code (do not edit): regenerate with ``python proto/generate.py``."""
