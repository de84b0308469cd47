"""Batch-invariant kernels: one API, two modes (batch_invariant, standard)."""
