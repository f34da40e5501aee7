"""The concatenated model: members' units side by side (`assemble`), each member's LayerNorm block kept apart
(`norms`), channel shuffles and constant channel counts rewritten in the traced graph (`widegraph`)."""
