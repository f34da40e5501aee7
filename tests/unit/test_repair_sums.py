"""The repair's sums: bounded memory while accumulating, and sums taken over several processes (`reduce`).

Run: .venv/bin/python -m pytest tests/unit/test_repair_sums.py
"""

import copy
import threading

import pytest
import torch
import torch.nn as nn
from userpkg.attention import Block

from ntdist.commands.bench import peak_tensor_bytes
from ntdist.fusion.analysis.graph import analyze
from ntdist.fusion.pruning.select import select, targets
from ntdist.fusion.repair import accumulate, packed, repair, solve, unpacked
from ntdist.fusion.repair import rows as rows_module
from ntdist.fusion.wide.assemble import assemble, tensors_of
from ntdist.models import LeNet


def test_accumulating_a_convolution_stays_within_a_few_gram_matrices(monkeypatch):
    monkeypatch.setattr(rows_module, "CHUNK_FLOOR", 0)      # the floor for small layers off: d x d is the bound
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
    x = torch.randn(4, 8, 32, 32)                             # 4096 positions, all of them rows
    with torch.no_grad():
        y = conv(x)
    d = 8 * 9 + 1                                             # the patch and the ones column
    sums = 8 * (d * d + d * 8)                                # the Gram matrix and the cross term, float64
    box = []

    def run():
        normal = None
        for rows, target in rows_module.row_chunks(conv, x, y, 0, torch.Generator()):
            normal = accumulate(normal, rows, target, True)
        box.append(normal)

    peak = peak_tensor_bytes(run)
    assert box[0].rows == 4 * 32 * 32
    assert 4096 * (d - 1) * 4 > 10 * sums                     # all rows at once would hold ten times the sums
    assert peak < 4 * sums, (peak, sums)


def _nt(models, x):
    plan = analyze(models[0], x[:2])
    w = [0.5, 0.5]
    keep = select(models, plan, "group_l2", targets(plan, plan.space_sizes(tensors_of(models[0])), 1.0), w)
    return plan, w, keep


SHARDED = {    # model, input shape, regressions that repair solves (a MultiheadAttention is two: q/k/v, out_proj)
    "lenet": (lambda: LeNet(num_classes=10, in_channels=1, image_size=8), (1, 8, 8), 4),
    "attention": (Block, (5, 6), 5),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sums_over_two_shards_solve_what_all_the_inputs_solve(name):
    """Two processes simulated by two threads in lockstep: after each layer both get the sum of their sums
    (what an all-reduce gives), and both repair exactly as one process with every input does."""
    make, shape, fits = SHARDED[name]
    torch.manual_seed(0)
    models = [make().eval() for _ in range(2)]
    x = torch.randn(200, *shape)
    plan, w, keep = _nt(models, x)
    alone = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, positions=0)
    shards, slots, calls = (x[:90], x[90:]), [None, None], [0, 0]
    meet, out, errors = threading.Barrier(2, timeout=60), [None, None], []

    def all_reduce(i):
        def reduce(normal):
            slots[i] = packed(normal)
            meet.wait()
            total = slots[0] + slots[1]
            meet.wait()                                   # both have read the slots before they are reused
            calls[i] += 1
            return unpacked(total, normal)
        return reduce

    def rank(i):
        try:
            mine = copy.deepcopy(models)                  # the hooks that read layers are per model
            pruned = assemble(mine, plan, w, keep)
            out[i] = repair(mine, plan, w, keep, pruned, shards[i], positions=0, reduce=all_reduce(i))
        except BaseException as err:      # noqa: BLE001 - reported below, in the test's thread
            errors.append(err)
            meet.abort()

    threads = [threading.Thread(target=rank, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls[0] == calls[1] == fits
    on_half = repair(models, plan, w, keep, assemble(models, plan, w, keep), shards[0], positions=0)
    for key, value in alone.state_dict().items():
        for i in range(2):
            torch.testing.assert_close(out[i].state_dict()[key], value, rtol=0, atol=1e-5)
    assert any((on_half.state_dict()[k] - v).abs().max() > 1e-3 for k, v in alone.state_dict().items()
               if v.is_floating_point())


def test_packed_sums_round_trip():
    torch.manual_seed(0)
    normal = accumulate(None, torch.randn(2, 30, 4), torch.randn(2, 30, 3), True)
    back = unpacked(packed(normal), normal)
    assert back.rows == 30 and back.bias and torch.equal(back.gram, normal.gram)
    assert torch.equal(back.cross, normal.cross) and back.gram.data_ptr() != normal.gram.data_ptr()


def test_fewer_rows_than_columns_solve_as_the_summed_normal_equations():
    torch.manual_seed(0)
    x, y = torch.randn(2, 40, 90), torch.randn(2, 40, 6)
    for bias in (True, False):
        held = accumulate(accumulate(None, x[:, :25], y[:, :25], bias), x[:, 25:], y[:, 25:], bias)
        assert held.rows == 40 and len(held.held) == 2 and held.gram is None     # 40 rows < 91 columns: kept
        dual = solve(held, 1e-3)
        primal = solve(held.summed(), 1e-3)
        assert held.gram.any() and not held.held
        torch.testing.assert_close(dual, primal, rtol=0, atol=1e-8)


def test_targets_read_for_several_layers_at_once_fit_as_targets_read_per_layer(monkeypatch):
    from ntdist.fusion.repair import refit
    assert refit.waves(["a", "b", "c", "d"], {"a": 10, "b": 10, "c": 50, "d": 10}, 2, budget=45) == \
        [["a", "b"], ["c"], ["d"]]                       # c alone exceeds the budget: read per batch
    torch.manual_seed(0)
    models = [LeNet(num_classes=10, in_channels=1, image_size=8).eval() for _ in range(2)]
    x = torch.randn(300, 1, 8, 8)
    plan, w, keep = _nt(models, x)
    stored = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, batch_size=128)
    calls = []
    monkeypatch.setattr(refit, "TARGET_BYTES", 0)
    monkeypatch.setattr(refit, "reach_all", lambda *a: calls.append(a) or {})
    per_layer = repair(models, plan, w, keep, assemble(models, plan, w, keep), x, batch_size=128)
    assert not calls
    for key, value in stored.state_dict().items():
        assert torch.equal(per_layer.state_dict()[key], value), key
