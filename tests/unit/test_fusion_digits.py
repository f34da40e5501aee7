"""Real data: NT on MLPs trained on sklearn digits beats vanilla averaging right after fusion.

Two width-32 MLPs per seed from different initialisations and data orders,
three seeds. Right after fusion NT must be far above weight averaging (and OT
must not be worse than averaging); after 3 epochs of fine-tuning NT must reach
the mean member's accuracy.

Run: .venv/bin/python -m pytest tests/unit/test_fusion_digits.py
"""

import statistics

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ntdist.fusion import fuse
from ntdist.models import build_model


def split_digits():
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
    return (torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte))


def train(model, x, y, epochs, seed, lr):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matrices: threading only adds overhead
    yield
    torch.set_num_threads(before)


def test_nt_beats_averaging_on_digits(one_thread):
    xtr, ytr, xte, yte = split_digits()
    spec = {"input_dim": 64, "width": 32, "depth": 2}
    acc = {"member": [], "nt": [], "avg": [], "ot": [], "nt_tuned": []}
    for seed in range(3):
        models = []
        for m in range(2):
            torch.manual_seed(100 * seed + m)
            models.append(train(build_model("mlp", spec), xtr, ytr, 20, 100 * seed + m, lr=0.05))
        acc["member"].append(statistics.mean(accuracy(m, xte, yte) for m in models))
        for method in ("nt", "avg", "ot"):
            acc[method].append(accuracy(fuse(models, method=method), xte, yte))
        tuned = train(fuse(models, method="nt", schedule="recursive"), xtr, ytr, 3, seed, lr=0.01)
        acc["nt_tuned"].append(accuracy(tuned, xte, yte))
    mean = {k: statistics.mean(v) for k, v in acc.items()}
    assert mean["member"] > 0.93, mean
    assert mean["nt"] > 0.90, mean
    assert mean["nt"] >= mean["avg"] + 0.10, mean          # NT keeps the members' knowledge, averaging loses it
    assert mean["ot"] >= mean["avg"], mean
    assert mean["nt_tuned"] >= mean["member"] - 0.005, mean
