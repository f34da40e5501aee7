"""Data mistakes caught while loading, before anything trains: one line naming the split, the first bad sample
and the fix.

`call_dataset` runs a `package.module:callable` dataset: its `data.kwargs` must fit its signature, an
exception it raises and a result that is not (train, val, test) become one-line `UserError`s.
`check_splits` checks the samples: float32 inputs of one shape, finite, and one integer class index
0..C-1 per sample.

How much is read: a split held as tensors (`TensorDataset`, `ImageTensors`, `Subset`s of them: every
built-in dataset but imagefolder, and most datasets of one's own) is checked whole, in a few vectorised
passes. A split read one sample at a time (a list, a `Dataset` class of one's own) is read whole when it
fits `data.resident_max_mb` (it is then decoded whole before training anyway) and, for a train set
without a `classes` attribute, always (its labels give the class count); of a larger one, the first
`FIRST_SAMPLES`. Image folders are checked file by file instead (`ntdist.images.list_image_files`).
"""

import inspect
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ntdist.errors import UserError, suggest
from ntdist.images import ImageTensors
from ntdist.options import import_callable

FIRST_SAMPLES = 256      # of a lazily read split too large to read whole at load
_CHUNK_ROWS = 4096       # rows per vectorised finiteness check: bounds its temporary memory


def call_dataset(name: str, kwargs: dict):
    """(train, val, test) of the dataset callable `name` called with `kwargs`; val and test may be None."""
    fn = import_callable(name, "data.name")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):   # a builtin or C callable without a signature: let the call decide
        params = None
    if params is not None and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        takes = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        for key in kwargs:
            if key not in takes:
                raise UserError(f"data.kwargs do not fit '{name}': it takes no argument '{key}'"
                                f"{suggest(key, takes)}; its arguments are {takes}")
    try:
        parts = fn(**kwargs)
    except UserError:
        raise
    except Exception as err:   # noqa: BLE001 - the user's code: name it and what it raised, in one line
        raise UserError(f"data.name '{name}' raised {type(err).__name__}: {_first_line(err)}; fix the dataset "
                        "callable or its data.kwargs (--debug shows the traceback)") from err
    if not isinstance(parts, (tuple, list)) or len(parts) != 3 or parts[0] is None:
        raise UserError(f"data.name '{name}' must return (train, val, test) datasets (val and test may be "
                        f"None), got {type(parts).__name__}")
    for split, data in zip(("train", "val", "test"), parts):
        if data is not None and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise UserError(f"data.name '{name}' returned a {type(data).__name__} as its {split} set; each set "
                            "must be a map-style Dataset or a list of (input, label) pairs")
    if len(parts[0]) == 0:
        raise UserError(f"data.name '{name}' returned an empty train set; it needs (input, label) samples")
    return tuple(parts)


def check_splits(parts: Dict[str, Optional[Dataset]], where: str, max_mb: float,
                 num_classes: Optional[int] = None) -> Tuple[tuple, int]:
    """Check every split of `parts` (name -> dataset or None; 'train' first) as the module docstring says;
    returns the shape of one input and the class count (`num_classes`, else the train set's `classes`,
    else its largest label + 1). `where` starts every message ("data.name 'pkg.mod:fn'")."""
    train = parts["train"]
    whence = "labels 0..{last}"
    if num_classes is None and hasattr(train, "classes"):
        num_classes, whence = len(train.classes), "labels 0..{last}, as the train set's `classes` lists them"
    shape, finite, labels = None, {}, {}
    for split, data in parts.items():
        if data is None or len(data) == 0:
            continue
        held = _as_tensors(data, split, where)
        if held is not None:
            shape = _check_tensors(held, split, where, shape, finite)
            labels[split] = held.labels if held.rows is None else held.labels[held.rows]
        else:
            whole = (split == "train" and num_classes is None) or \
                len(data) * _sample_bytes(data, split, where) <= max_mb * 2 ** 20
            count = len(data) if whole else min(len(data), FIRST_SAMPLES)
            shape, labels[split] = _check_samples(data, count, split, where, shape)
    if num_classes is None:
        num_classes = int(labels["train"].max()) + 1
        whence = "labels 0..{last}, counted as the train set's largest label + 1"
    for split, found in labels.items():
        _check_label_range(found, split, where, num_classes, whence.format(last=num_classes - 1))
    return shape, num_classes


class _Held(NamedTuple):
    """A split held as tensors: `rows` are its samples as indices into `inputs` and `labels` (None: all, in
    order); `images`: the inputs are `ImageTensors`' uint8 images."""

    inputs: torch.Tensor
    labels: torch.Tensor
    rows: Optional[torch.Tensor]
    images: bool


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else "(no message)"


def _as_tensors(data: Dataset, split: str, where: str) -> Optional[_Held]:
    """The tensors a split is a view of, or None for a split read one sample at a time."""
    rows = None
    while isinstance(data, Subset):
        inner = torch.as_tensor(data.indices, dtype=torch.long)
        rows = inner if rows is None else inner[rows]
        data = data.dataset
    if isinstance(data, ImageTensors):
        return _Held(data.images, data.labels, rows, True)
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise UserError(f"{where}: the {split} set is a TensorDataset of {len(data.tensors)} tensors; "
                            "ntdist needs two, (inputs, labels)")
        return _Held(*data.tensors, rows, False)
    return None


def _check_tensors(held: _Held, split: str, where: str, shape, finite: dict) -> tuple:
    """Check every sample of a split held as tensors; returns the shape of one input. `finite` keeps the
    finite rows of inputs already checked: the carved splits share their inputs, one pass serves them all."""
    x, rows = held.inputs, held.rows
    if not held.images:
        _check_input_dtype(x.dtype, split, 0, where)
    _check_shape(tuple(x.shape[1:]), shape, split, 0, where)
    _check_label_kind(held.labels[0 if rows is None else int(rows[0])], split, 0, where)
    if not held.images:   # uint8 images are finite
        if id(x) not in finite:
            finite[id(x)] = _finite_rows(x)
        ok = finite[id(x)] if rows is None else finite[id(x)][rows]
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0])
            _refuse_non_finite(x[bad if rows is None else int(rows[bad])], split, bad, int((~ok).sum()), where)
    return tuple(x.shape[1:])


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[N] bool: which rows of x hold only finite values. A finite sum means every value is (NaN and inf
    propagate), the common case in one cheap pass; otherwise each row's extremes, chunk by chunk."""
    if bool(torch.isfinite(x.sum())):
        return torch.ones(len(x), dtype=torch.bool)
    parts = [torch.aminmax(part.reshape(len(part), -1), dim=1) for part in x.split(_CHUNK_ROWS)]
    return torch.cat([torch.isfinite(low) & torch.isfinite(high) for low, high in parts])


def _sample_bytes(data: Dataset, split: str, where: str) -> int:
    """Bytes of one sample as a resident tensor (the first sample's), as `training.batches` estimates them."""
    x, _ = _read(data, 0, split, where)
    return x.numel() * x.element_size() + 8


def _read(data: Dataset, index: int, split: str, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    try:
        sample = data[index]
    except Exception as err:   # noqa: BLE001 - the user's __getitem__
        raise UserError(f"{where}: reading {split} sample {index} raised {type(err).__name__}: "
                        f"{_first_line(err)}") from err
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise UserError(f"{where}: {split} sample {index} is a {type(sample).__name__}"
                        f"{f' of {len(sample)}' if isinstance(sample, (tuple, list)) else ''}; "
                        "each sample must be an (input, label) pair")
    try:
        return torch.as_tensor(sample[0]), torch.as_tensor(sample[1])
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{where}: {split} sample {index} is not a pair of tensors or arrays "
                        f"({_first_line(err)})") from None


def _check_samples(data: Dataset, count: int, split: str, where: str, shape) -> Tuple[tuple, torch.Tensor]:
    """Check the first `count` samples of a split read one at a time; returns the input shape and their labels."""
    labels, inputs = [], []

    def check_finite(start: int):
        ok = _finite_rows(torch.stack(inputs))
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0])
            _refuse_non_finite(inputs[bad], split, start + bad, None, where)
        inputs.clear()

    for i in range(count):
        x, y = _read(data, i, split, where)
        _check_input_dtype(x.dtype, split, i, where)
        _check_shape(tuple(x.shape), shape, split, i, where)
        shape = tuple(x.shape)
        _check_label_kind(y, split, i, where)
        labels.append(int(y))
        inputs.append(x)
        if len(inputs) == _CHUNK_ROWS or i == count - 1:
            check_finite(i + 1 - len(inputs))
    return shape, torch.tensor(labels, dtype=torch.long)


def _check_input_dtype(dtype: torch.dtype, split: str, index: int, where: str) -> None:
    if dtype == torch.float32:
        return
    scale = "" if dtype.is_floating_point else " (and scale them, e.g. pixels / 255)"
    raise UserError(f"{where}: {split} sample {index} has {dtype} inputs; models take float32: convert the "
                    f"inputs with .float(){scale}")


def _check_shape(found: tuple, expected, split: str, index: int, where: str) -> None:
    if expected is None or found == expected:
        return
    whose = "the train set's" if split != "train" else "sample 0's"
    raise UserError(f"{where}: {split} sample {index} has inputs of shape {list(found)}, {whose} are "
                    f"{list(expected)}; every input needs the same shape (pad, crop or resize them)")


def _check_label_kind(label: torch.Tensor, split: str, index: int, where: str) -> None:
    """One class index per sample, int64 (or uint8): not a float, not a bool, not a vector (one-hot)."""
    if label.dim() > 0:
        raise UserError(f"{where}: {split} sample {index} has a label of shape {list(label.shape)} "
                        f"({label.flatten()[:6].tolist()}); ntdist needs one class index per sample: one-hot "
                        "labels become indices with .argmax(-1)")
    if label.dtype not in (torch.int64, torch.uint8):   # the class indices cross_entropy takes
        raise UserError(f"{where}: {split} sample {index} has a {label.dtype} label ({label.item()}); labels "
                        "must be integer class indices 0..C-1: convert them with .long()")


def _check_label_range(labels: torch.Tensor, split: str, where: str, num_classes: int, whence: str) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if not bool(bad.any()):
        return
    index = int(bad.nonzero()[0])
    label = int(labels[index])
    if label < 0:
        fix = "labels are class indices (no ignore-index labels): drop or relabel those samples"
    else:
        fix = "fix the labels, or give the train set a `classes` attribute that lists every class"
    raise UserError(f"{where}: {split} sample {index} has label {label}, but there are {num_classes} classes "
                    f"({whence}); {fix}")


def _refuse_non_finite(x: torch.Tensor, split: str, index: int, count: Optional[int], where: str) -> None:
    kind = "NaN" if bool(torch.isnan(x).any()) else "an infinite value"
    how_many = f" (one of {count} such samples)" if count else ""
    raise UserError(f"{where}: {split} sample {index} has {kind} in its inputs{how_many}; drop those samples or "
                    "replace the values (e.g. torch.nan_to_num) before training")
