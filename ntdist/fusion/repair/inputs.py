"""The calibration inputs a repair fits on, as checked batches: what a user may pass and what it is refused for.

`calibration_batches(calibration, batch_size, model)` accepts a tensor of inputs
(split into batches) or an iterable of batches, each a tensor or a tuple/list
whose first item is the inputs (what a DataLoader yields); a one-shot iterator is
read here, once, so a caller that repairs several times (every pairwise step of a
schedule) reads the returned list instead. Each batch is checked: a tensor with
values (not on the meta device, not sparse), finite, with a batch dimension, and
of one number of dimensions and one kind (floating or not) across the batches. A
floating batch takes the model's own floating dtype (float64 or float16 inputs
for a float32 model are converted; the repair computes in that dtype anyway).
Integer inputs are passed as they are (token ids for a model that embeds them).
When `model` is given, it is run on two inputs of the first batch, so that inputs
of the wrong shape (or uint8 images for a float model) stop with one line naming
what the model raised instead of an error from deep inside the repair.

Refused with a hint, because each is a plausible slip: a map-style Dataset (its
items are single inputs, not batches: a DataLoader batches them), a dict, an
(inputs, labels) pair (its labels would be read as a second batch), and an empty
set.
"""

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import Dataset, IterableDataset

from ntdist.errors import UserError

CALIBRATION_BATCH = 256   # inputs per forward when the calibration set is one tensor
WHAT = "calibration must be a tensor of inputs or an iterable of input batches (e.g. a DataLoader)"


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')} of shape {list(t.shape)}"


def _inputs_of(item, index: int) -> torch.Tensor:
    """The inputs of batch `index`: the item itself, or the first entry of a tuple/list."""
    inputs = item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item
    if isinstance(inputs, dict):
        raise UserError(f"calibration batch {index} is a dict (keys {', '.join(map(str, list(inputs)[:4]))}); pass "
                        "the input tensor the model's forward takes, e.g. (batch['x'] for batch in loader)")
    if not isinstance(inputs, torch.Tensor):
        raise UserError(f"calibration batch {index} is of type {type(inputs).__name__}, not a tensor; {WHAT}")
    if inputs.device.type == "meta":
        raise UserError(f"calibration batch {index} is on the meta device and holds no values; pass real inputs")
    if inputs.layout != torch.strided:
        raise UserError(f"calibration batch {index} is a {inputs.layout} tensor; pass a dense one "
                        "(x.to_dense())")
    if inputs.dim() == 0:
        raise UserError(f"calibration batch {index} is a single number; pass a batch of inputs, e.g. x[:2000]")
    return inputs.detach()


def _first_dtype(model: Optional[nn.Module]) -> Optional[torch.dtype]:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None) if model is not None else None


def _read(calibration, batch_size: int) -> List[torch.Tensor]:
    """The calibration as a list of input tensors, before the checks of their values."""
    if isinstance(calibration, torch.Tensor):
        return list(_inputs_of(calibration, 0).split(batch_size))
    if isinstance(calibration, dict):
        raise UserError(f"calibration is a dict (keys {', '.join(map(str, list(calibration)[:4]))}); {WHAT}")
    if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset):
        raise UserError("calibration is a Dataset, whose items are single inputs; pass "
                        "DataLoader(dataset, batch_size=256) or a tensor of inputs")
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2 and \
            all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in calibration) and \
            calibration[0].dim() > calibration[1].dim() and len(calibration[0]) == len(calibration[1]):
        raise UserError(f"calibration is a pair ({_describe(calibration[0])}, {_describe(calibration[1])}), "
                        "read as two batches; pass the inputs alone: calibration=inputs")
    try:
        items = iter(calibration)
    except TypeError:
        raise UserError(f"calibration is of type {type(calibration).__name__}; {WHAT}") from None
    return [_inputs_of(item, i) for i, item in enumerate(items)]


def calibration_batches(calibration, batch_size: int = CALIBRATION_BATCH, model: Optional[nn.Module] = None,
                        runs: bool = True) -> List[torch.Tensor]:
    """The calibration inputs as a list of checked, non-empty batches (the repair reads them once per layer);
    UserError for anything that cannot be, with what to pass instead. `model` (a member): the batches take its
    floating dtype and, with `runs`, it must run on them (`fuse` and `fuse_pair` check that once; `repair`,
    which reads the members forward by forward, does not run them again)."""
    batches = [b for b in _read(calibration, batch_size) if len(b) > 0]
    if not batches:
        raise UserError("calibration holds no inputs; pass a few thousand training inputs")
    first = batches[0]
    for i, b in enumerate(batches[1:], 1):
        if b.dim() != first.dim() or b.is_floating_point() != first.is_floating_point():
            raise UserError(f"calibration batch {i} is {_describe(b)} but batch 0 {_describe(first)}; every batch "
                            "holds inputs alone (an (inputs, labels) pair is two batches: pass the inputs)")
    dtype = _first_dtype(model)
    if first.is_floating_point() or first.is_complex():
        for i, b in enumerate(batches):
            if not bool(torch.isfinite(b).all()):
                raise UserError(f"calibration batch {i} holds NaN or infinite values; pass finite inputs")
        if dtype is not None and first.is_floating_point():
            batches = [b.to(dtype) for b in batches]
    if model is not None and runs:
        _check_runs(model, batches[0][:2])
    return batches


def _check_runs(model: nn.Module, x: torch.Tensor) -> None:
    """UserError unless `model` runs (in eval mode, every module's own mode restored) on the inputs `x`."""
    flags: Dict[str, bool] = {name: m.training for name, m in model.named_modules()}
    device = next((t.device for t in model.state_dict().values()), x.device)
    try:
        with torch.no_grad():
            model.eval()(x.to(device))
    except Exception as err:  # noqa: BLE001 - the model's own code: one line saying what it raised
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = "" if x.is_floating_point() else \
            " (not the labels; uint8 images as the model's training converted them, e.g. x.float() / 255)"
        raise UserError(f"calibration inputs of {_describe(x[0])} (one input) do not fit "
                        f"{type(model).__name__} ({type(err).__name__}: {text}); pass inputs of the shape and kind "
                        f"the model takes{hint}") from None
    finally:
        for name, m in model.named_modules():
            m.training = flags[name]
