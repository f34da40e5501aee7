"""Hugging Face classifiers saved with `save_pretrained`, as ntdist models: `model.name: hf:<folder>`.

The folder holds config.json and the weights: model.safetensors, or the shards
that model.safetensors.index.json lists. Nothing is downloaded (every read is
`local_files_only`), and transformers is imported only when an `hf:` name is
used (the `hf` extra). The class is the config's `architectures[0]` when
transformers has a task class of that name, else the image classifier (a config
with `image_size` and `num_channels`) or the sequence classifier of its model
type. `model.kwargs` override config fields (`num_labels`, `hidden_size`, ...).

ntdist feeds a model one tensor and reads back the logits, so the class is
subclassed (`logits_class`) with a forward that passes that tensor as the main
input (`input_ids` or `pixel_values`) and returns `.logits`. A subclass rather
than a module around the model: the state dict keeps the Hugging Face keys,
`save_pretrained` records the original class name, and `from_pretrained` of
that class reads the fused folder back. A text model takes token ids; since
ntdist's datasets hold float32 inputs, it converts them to integers itself.
Pickle cannot find that subclass by its name (the name is `cls`'s), so its
instances pickle through `_unpickled` here: `torch.save` of the whole model,
`copy.deepcopy` and other processes rebuild the same subclass.
"""

import json
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ntdist.errors import UserError
from ntdist.options import HF_PREFIX

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TEXT_LENGTH = 16   # tokens in the example input of a text model (fewer when its positions are fewer)
FOLDER_HINT = ("give a folder written by save_pretrained (config.json and model.safetensors); ntdist never "
               "downloads: fetch a hub model first (e.g. huggingface-cli download NAME --local-dir DIR)")


def transformers():
    """The transformers module; a UserError naming the extra when it is not installed."""
    try:
        import transformers as module
    except ImportError:
        raise UserError("hf:<folder> models need transformers: pip install 'ntdist[hf]'") from None
    return module


def is_hf(name: Optional[str]) -> bool:
    """Whether `name` (a model name or a checkpoint argument) names a Hugging Face folder: hf:<folder>, or a
    folder holding config.json."""
    if not name:
        return False
    return name.startswith(HF_PREFIX) or (os.path.isdir(name) and os.path.isfile(os.path.join(name, CONFIG_FILE)))


def folder(name: str, what: str = "model.name") -> str:
    """The folder of `hf:<folder>` (or of a plain folder path), checked: a local folder with config.json."""
    path = name[len(HF_PREFIX):] if name.startswith(HF_PREFIX) else name
    if not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is not a local folder; {FOLDER_HINT}")
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        raise UserError(f"{what} '{path}' is a folder without {CONFIG_FILE}; {FOLDER_HINT}")
    return path


def load_config(path: str, overrides: Optional[dict] = None):
    """The config of the folder `path`, with the fields in `overrides` replaced."""
    hf = transformers()
    try:
        return hf.AutoConfig.from_pretrained(path, local_files_only=True, **(overrides or {}))
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"'{os.path.join(path, CONFIG_FILE)}' is not a config transformers {hf.__version__} "
                        f"reads ({first}); {FOLDER_HINT}") from None


def is_vision(config) -> bool:
    """Whether the config describes an image model (it has an image size and a channel count)."""
    return hasattr(config, "image_size") and hasattr(config, "num_channels")


def task_class(config) -> type:
    """The classifier class of `config`: its `architectures[0]` when that is a task class of transformers,
    else AutoModelForImageClassification's or AutoModelForSequenceClassification's class for its type."""
    hf = transformers()
    named = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(hf, named, None) if "For" in named else None
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return cls
    auto = hf.AutoModelForImageClassification if is_vision(config) else hf.AutoModelForSequenceClassification
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        raise UserError(f"transformers has no {auto.__name__[len('AutoModelFor'):]} class for model type "
                        f"'{config.model_type}' (config architectures: {config.architectures}); ntdist fuses "
                        "classifiers: save a ...ForSequenceClassification or ...ForImageClassification model") from None


_LOGITS_CLASSES: Dict[type, type] = {}


def logits_class(cls: type) -> type:
    """`cls` with a forward that takes its main input as one tensor and returns the logits (same class name)."""
    if cls not in _LOGITS_CLASSES:
        key = cls.main_input_name
        text = key == "input_ids"

        def forward(self, x):
            if text and not isinstance(x, torch.fx.Proxy):
                x = x.long()    # token ids stored as float32 by a dataset
            return cls.forward(self, **{key: x}).logits

        def __reduce_ex__(self, protocol):
            # pickle finds a class by its module and name, which name `cls`: rebuild through this module
            if type(self) is not wrapped:   # a user's subclass, which pickle can find
                return cls.__reduce_ex__(self, protocol)
            return _unpickled, (cls,), self.__getstate__()

        doc = f"{cls.__name__} whose forward({key}) returns the logits."
        wrapped = type(cls.__name__, (cls,), {"forward": forward, "__reduce_ex__": __reduce_ex__,
                                              "__doc__": doc, "__module__": cls.__module__})
        _LOGITS_CLASSES[cls] = wrapped
    return _LOGITS_CLASSES[cls]


def _unpickled(cls: type) -> nn.Module:
    """An empty instance of `logits_class(cls)`, for pickle to restore the state into."""
    wrapped = logits_class(cls)
    return wrapped.__new__(wrapped)


def build(name: str, kwargs: Optional[dict] = None) -> nn.Module:
    """A randomly initialised model of the folder `hf:<folder>` (from torch's global RNG as it stands)."""
    config = load_config(folder(name), kwargs)
    cls = logits_class(task_class(config))
    try:
        return cls(config)
    except (TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{cls.__name__} cannot be built from '{name}' with model.kwargs {kwargs or {}} "
                        f"({type(err).__name__}: {err})") from None


def input_shape(config) -> Tuple[int, ...]:
    """One input's shape: (channels, height, width) for an image model, (tokens,) for a text model."""
    if is_vision(config):
        size = config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return int(config.num_channels), int(height), int(width)
    return (min(TEXT_LENGTH, getattr(config, "max_position_embeddings", TEXT_LENGTH)),)


def example_input(name: str, kwargs: dict, shape: Optional[Tuple[int, ...]]) -> torch.Tensor:
    """Two inputs to trace the model of `hf:<folder>` on: token ids for a text model, zero images otherwise."""
    config = load_config(folder(name), kwargs)
    shape = tuple(shape) if shape else input_shape(config)
    if is_vision(config):
        return torch.zeros(2, *shape)
    count = 2 * int(torch.Size(shape).numel())
    return (torch.arange(count) % max(1, getattr(config, "vocab_size", 2))).reshape(2, *shape)


def weight_files(path: str) -> List[str]:
    """The safetensors files that hold the weights of the folder `path` (the shards, when sharded)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"'{index}' is not a readable shard index ({type(err).__name__}: {err}); "
                            f"{FOLDER_HINT}") from None
        return [os.path.join(path, shard) for shard in shards]
    single = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(single):
        raise UserError(f"'{path}' holds no {WEIGHTS_FILE} (nor {INDEX_FILE}); ntdist reads safetensors only: "
                        "re-save the model with save_pretrained(DIR)")
    return [single]


def read_state(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of the folder `path`, over all its shards."""
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                state.update((k, f.get_tensor(k)) for k in f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"'{file}' is not a readable safetensors file ({err}); {FOLDER_HINT}") from None
    return state


def folder_state(path: str, model: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict of the folder `path` in `model`'s keys: the stored tensors (tied ones added), or, when
    transformers stores this class under other names than its modules' (ViT's `encoder.layer.0.attention.query`
    for `layers.0.attention.q_proj`: save_pretrained writes the checkpoint format, from_pretrained converts it),
    the tensors from_pretrained loads, provided it loads every one of them."""
    state = with_tied(read_state(path), model)
    if set(model.state_dict()) <= set(state):
        return state
    try:
        loaded, info = type(model).from_pretrained(path, config=model.config, local_files_only=True,
                                                   output_loading_info=True)
    except Exception:  # noqa: BLE001 - the stored keys are then reported as they are
        return state
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        return state
    return loaded.state_dict()


def with_tied(state: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """`state` plus the tied tensors save_pretrained leaves out (a key whose parameter is another key's)."""
    owners: Dict[int, str] = {}
    out = dict(state)
    own = model.state_dict(keep_vars=True)
    for key, t in own.items():
        owners.setdefault(id(t), key)
    for key, t in own.items():
        if key not in out and owners[id(t)] in out:
            out[key] = out[owners[id(t)]]
    return out
