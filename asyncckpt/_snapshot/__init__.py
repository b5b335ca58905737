"""Snapshot: plan a state, copy it into pooled host buffers (eagerly or pipelined)."""
