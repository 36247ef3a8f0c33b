"""`ember serve --replicas`: ember on Ray Serve (ingress, prefix-aware router, replicas). Only the CLI imports
this package, and only for --replicas, so that ember works without Ray installed."""
