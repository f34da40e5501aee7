"""Every fine-tuning engine (ddp, accelerate, deepspeed at ZeRO 0 and 2) takes the training recipe: AdamW with its
no-decay group, gradient clipping and label smoothing give the same weights as a plain torch loop.

Run: .venv/bin/python -m pytest tests/multiproc/test_engine_recipe.py
"""

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import ROOT, spawn

RECIPE = ["finetune.optimizer=adamw", "finetune.lr=0.02", "finetune.weight_decay=0.1", "finetune.grad_clip=0.3",
          "finetune.label_smoothing=0.1"]
ENGINES = [["finetune.engine=ddp"], ["finetune.engine=accelerate"],
           *[["finetune.engine=deepspeed", f"finetune.zero_stage={stage}"] for stage in (0, 2)]]


def _reference(model, batches, clip: float):
    """The recipe written out with torch alone."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    flat = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay}, {"params": flat, "weight_decay": 0.0}], lr=0.02,
                                  weight_decay=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y, label_smoothing=0.1).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def _each_engine(rank: int, out: str) -> None:
    from ntdist.config import load_config
    from ntdist.distributed.world import World
    from ntdist.training.engines import make_engine
    from ntdist.training.optim import make_optimizer
    from ntdist.training.loop import train_epoch

    os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(ROOT, ".torch_extensions")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    batches = [(torch.randn(16, 8) * 4, torch.randint(0, 3, (16,))) for _ in range(4)]
    results = {"clipped": _reference(copy.deepcopy(base), batches, 0.3),
               "unclipped": _reference(copy.deepcopy(base), batches, 0.0)}
    for engine in ENGINES:
        cfg = load_config(None, [*RECIPE, *engine]).finetune
        model = copy.deepcopy(base)
        optimizer = make_optimizer(model, cfg)
        wrapped = make_engine(cfg, model, optimizer, World(), 16)
        train_epoch(wrapped.model, batches, optimizer, "cpu", engine=wrapped, progress=False,
                    label_smoothing=cfg.label_smoothing, clip=wrapped.clipper(cfg.grad_clip))
        wrapped.finish()
        results[" ".join(engine)] = [p.detach().clone() for p in model.parameters()]
    torch.save(results, out)


def test_every_engine_trains_with_adamw_clip_and_label_smoothing_as_torch_does(tmp_path):
    out = str(tmp_path / "weights.pt")
    spawn(_each_engine, 1, out, timeout=500)
    results = torch.load(out)
    clipped, unclipped = results.pop("clipped"), results.pop("unclipped")
    assert max((a - b).abs().max().item() for a, b in zip(clipped, unclipped)) > 1e-3   # the clip acts
    assert list(results) == [" ".join(e) for e in ENGINES]
    for engine, weights in results.items():
        for a, b in zip(weights, clipped):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=engine)
