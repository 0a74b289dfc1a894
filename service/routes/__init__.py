"""One router per resource: health, predict, model metadata, metrics (and v2)."""
