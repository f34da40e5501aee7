"""Which units stay: importance scores (`importance`), NT's selection per channel space (`select`) and the
Torch-Pruning path of the authors' code (`torch_pruning`, imported only when chosen)."""
