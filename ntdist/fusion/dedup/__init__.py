"""NT that merges near-duplicate units instead of keeping both: the walk over the spaces and the merge
(`merge`), which units are kept, merged or dropped (`choice`), the activation criterion (`activations`)."""
