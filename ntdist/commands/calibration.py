"""The training inputs `ntdist fuse` reads: `--calibration`, `--dedup-inputs` and the training split of `--data`.

`--calibration` is a file written by `torch.save` holding one tensor of inputs, or
`package.module:callable`, a callable without arguments returning such a tensor, a
dataset of (input, label) pairs (or of bare inputs), `(train, val, test)` datasets
(train is used), or an iterable of batches such as a DataLoader. Of a file or a
dataset, `fusion.calibration_samples` inputs are drawn with seed 0; of a tensor a
callable returns or of its batches, the first ones. A torch file is memory-mapped
where its format allows, so a file much larger than memory costs only the inputs
drawn from it. Whatever a user plausibly gives instead (labels, uint8 images, an
(inputs, labels) pair, a dict, a numpy pickle, an empty or unreadable file) is one
line naming what was found and what to save instead. Floating-point inputs of
another precision are converted to float32, what the rebuilt models compute in;
integer inputs of at least two dimensions (token ids, [N, tokens]) are passed as
they are, for a model that embeds them.
"""

import pickle
import warnings
import zipfile

import torch

from ntdist.errors import UserError
from ntdist.options import import_callable, is_import_path


def _fix(verb: str) -> str:
    """What to give instead, for a file ('holds') or a callable ('returned')."""
    if verb == "returned":
        return "return the inputs alone, as the model's forward takes them"
    return "save the inputs alone, as the model's forward takes them: torch.save(x[:2000], path)"


def _load(path: str, flag: str):
    """What torch.load finds in `path` (tensors only; memory-mapped when it is a zip-format torch file)."""
    try:
        with warnings.catch_warnings():   # torch's notes on sparse tensors and the like: the checks below speak
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        why = "it holds objects other than tensors (a numpy array? save torch.as_tensor(x))"
    except EOFError:
        why = "the file is empty or cut short"
    except Exception as err:  # noqa: BLE001 - any file at all: torch raises many kinds for what is not its own
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = text if isinstance(err, OSError) else f"not a file written by torch.save: {type(err).__name__}: {text}"
    raise UserError(f"{flag} '{path}' is not a readable torch file ({why})") from None


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of {str(value.dtype).replace('torch.', '')} of shape {list(value.shape)}"
    if isinstance(value, dict):
        return f"a dict (keys {', '.join(map(str, list(value)[:4]))})"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"


def _check_kind(value, what: str, verb: str = "holds") -> torch.Tensor:
    """`value` unless it is no floating-point tensor of at least 2 inputs: then a UserError naming `what`
    (`verb`: 'holds' for a file, 'returned' for a callable) and what it found. Reads no values."""
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{what} {verb} {_kind(value)}, not a tensor of inputs; {_fix(verb)}")
    if value.layout != torch.strided:
        raise UserError(f"{what} {verb} a {value.layout} tensor; save a dense one (x.to_dense())")
    if value.dtype == torch.uint8:
        raise UserError(f"{what} {verb} {_kind(value)} (raw images?); convert them as the model's training did "
                        "(e.g. x.float() / 255, then its normalisation) and save that")
    if not value.is_floating_point() and value.dim() < 2:
        raise UserError(f"{what} {verb} {_kind(value)}; inputs are floating point, or token ids of shape [N, tokens] "
                        "(labels are not inputs); " + _fix(verb))
    if value.dim() < 2 or len(value) < 2:
        raise UserError(f"{what} {verb} {_kind(value)}; give at least 2 inputs, the batch dimension first; "
                        f"{_fix(verb)}")
    return value


def _finite(value: torch.Tensor, what: str) -> torch.Tensor:
    """`value` as float32 (what the rebuilt models compute in), integers (token ids) as they are; UserError if it
    holds NaN or inf."""
    if not value.is_floating_point():
        return value
    if not bool(torch.isfinite(value).all()):
        raise UserError(f"{what} holds NaN or infinite values; give finite inputs")
    return value.to(torch.float32)


def read_inputs(path: str, flag: str = "--dedup-inputs") -> torch.Tensor:
    """A batch of inputs saved with torch.save (one floating-point tensor, at least 2 rows)."""
    what = f"{flag} '{path}'"
    return _finite(_check_kind(_load(path, flag), what), what)


def _drawn(count: int, total: int) -> torch.Tensor:
    """`count` sorted indices of `total`, drawn with seed 0."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:count].sort().values


def _one_input(item, source: str):
    """The input of a dataset's item: the item itself (a tensor) or the first of an (input, label) pair."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item:
        return torch.as_tensor(item[0])
    raise UserError(f"--calibration '{source}' gave an item that is {_kind(item)}; a dataset's items are (input, "
                    "label) pairs or inputs")


def _from_callable(value, source: str, count: int) -> torch.Tensor:
    """The inputs in what a --calibration callable returned (not a tensor): a dataset or an iterable of batches."""
    if isinstance(value, dict) or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") and \
            not hasattr(value, "__getitem__"):
        raise UserError(f"--calibration '{source}' returned {_kind(value)}; return a tensor of inputs, a dataset of "
                        "(input, label) pairs or a DataLoader")
    if hasattr(value, "__getitem__") and hasattr(value, "__len__"):     # a map-style dataset (or a list)
        return torch.stack([_one_input(value[int(i)], source) for i in _drawn(count, len(value))])
    batches, held = [], 0
    for batch in value:                                                  # an iterable of batches: the first ones
        batches.append(_one_input(batch, source))
        held += len(batches[-1]) if batches[-1].dim() > 0 else 1
        if held >= count:
            break
    if not batches:
        raise UserError(f"--calibration '{source}' returned an iterable without batches; give training inputs")
    return torch.cat([b if b.dim() > 0 else b[None] for b in batches])[:count]


def read_calibration(source: str, count: int) -> torch.Tensor:
    """`--calibration`: at most `count` inputs (fusion.calibration_samples) of a torch file or of what
    `package.module:callable` returns (module docstring), checked as float32."""
    what = f"--calibration '{source}'"
    if not is_import_path(source):
        value = _check_kind(_load(source, "--calibration"), what)
        return _finite(value[_drawn(count, len(value))], what)     # only these are read from a memory-mapped file
    call = import_callable(source, "--calibration")
    try:
        value = call()
        if isinstance(value, (tuple, list)) and len(value) == 3 and not isinstance(value[0], torch.Tensor):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            value = _from_callable(value, source, count)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code: one line naming it
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"--calibration '{source}' raised {type(err).__name__}: {text}") from None
    return _finite(_check_kind(value, what, "returned")[:count], what)


def data_inputs(splits, count: int) -> torch.Tensor:
    """`count` training inputs of the data --data names, drawn with seed 0 as --calibration draws them."""
    return torch.stack([splits.train[int(i)][0] for i in _drawn(count, len(splits.train))])
