"""tml.sampler: the streaming sampler (paged sessions, the engine tick, counter-based sampling)."""
