"""The small training loop the accuracy benchmarks share (`importance.py`, `dedup_mnist1d.py`, `vit_digits.py`).

Full-batch tensors in memory, a seeded shuffle per epoch, cross-entropy; the
optimizer is given as a factory so that each script keeps its own (SGD or Adam).
Imported by the scripts next to it, which Python puts on the path when they run.
"""

import torch
import torch.nn.functional as F


def sgd(lr, momentum=0.9):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def adam(lr):
    return lambda params: torch.optim.Adam(params, lr=lr)


def train(model, x, y, epochs, seed, make_optimizer, batch=64, each=None):
    """Train in place on shuffled batches (the order from `seed`); `each(model)` after every epoch."""
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model.parameters())
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if each is not None:
            each(model.eval())
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return (model.eval()(x).argmax(1) == y).float().mean().item()
