"""chanseg's model server (FastAPI, dynamic batching, Prometheus metrics)."""
