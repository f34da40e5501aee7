"""The stages of `ntdist run` that take the run's context (`context.Run`): member training (`members`, and all
members of a rank at once in `vectorized`), fine-tuning and distillation (`finetune`), and `mode: sync`, the
periodic-sync SGD pipeline (`sync`). The table of contents that calls them is `ntdist.pipeline`."""
