"""Model registry: build any supported network from a `{name, kwargs}` spec.

Specs are stored inside checkpoints, so a model can be rebuilt from the file
alone. Names: `mlp`, `cnn1d` (1-D signals), `lenet`, `vgg11`, `resnet18`, `torchvision:<name>` for
any torchvision classification model (e.g. `torchvision:resnet18`), `hf:<folder>`
for a Hugging Face classifier saved with `save_pretrained` (`models.hf`), or an
import path `package.module:callable` for a model of one's own. Builders never
download: weights keyword arguments are refused (initial weights come from
`model.weights`, see `models.weights`), and an import path named by a file is
only built when the user names it too (see `records.checkpoint.load_model`).
"""

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from ntdist.errors import UserError, suggest
from ntdist.models.cnn1d import CNN1D
from ntdist.models.lenet import LeNet
from ntdist.models.mlp import MLP
from ntdist.models.resnet import ResNet18
from ntdist.models.vgg import VGG11
from ntdist.options import HF_PREFIX, import_callable, is_import_path, opt

REGISTRY = {"mlp": MLP, "cnn1d": CNN1D, "lenet": LeNet, "vgg11": VGG11, "resnet18": ResNet18}
IMAGE_MODELS = ("lenet", "vgg11", "resnet18")   # registry models that take in_channels and image_size
DATA_HINTS = ("num_classes", "input_dim", "in_channels", "image_size")   # filled in from the dataset
DOWNLOAD_KWARGS = ("weights", "weights_backbone", "pretrained", "progress")   # never passed to a builder


@dataclass
class ModelConfig:
    """Which network every ensemble member uses, and where its initial weights come from."""

    name: str = opt("mlp", "mlp | cnn1d | lenet | vgg11 | resnet18 | torchvision:<name> | hf:<folder> "
                         "| package.module:callable")
    kwargs: Dict[str, Any] = opt({}, "constructor arguments (width, depth, bias, ...); input shape and classes come from the data")
    weights: Optional[str] = opt(None, "initial weights of every member: a .safetensors or weights-only torch file, "
                                       "or a torchvision weights name (DEFAULT, IMAGENET1K_V1) from the local hub cache")
    reinit: List[str] = opt([], "modules (e.g. fc) left freshly initialised per member instead of loaded from model.weights")

    def __post_init__(self):
        if self.reinit and not self.weights:
            raise UserError(f"model.reinit={list(self.reinit)} needs model.weights (without it every module "
                            "is freshly initialised anyway); set model.weights or drop model.reinit")


def _torchvision_builder(name: str):
    import torchvision.models as tvm

    try:
        return tvm.get_model_builder(name)
    except ValueError:
        raise UserError(
            f"unknown torchvision model '{name}'{suggest(name, tvm.list_models())}; "
            "see torchvision.models.list_models()") from None


def build_model(name: str, kwargs: Dict[str, Any] | None = None) -> nn.Module:
    """Instantiate the model `name` with `kwargs` (randomly initialised)."""
    kwargs = dict(kwargs or {})
    refused = sorted(set(kwargs) & set(DOWNLOAD_KWARGS))
    if refused:
        raise UserError(f"model.kwargs may not set {refused}: builders never download; give initial weights "
                        "with model.weights (a local file or a torchvision weights name)")
    if name.startswith(HF_PREFIX):
        from ntdist.models.hf import build   # imports transformers: only for hf:<folder> models
        return build(name, kwargs)
    if is_import_path(name):
        builder = import_callable(name, "model.name")
        try:
            inspect.signature(builder).bind(**kwargs)
        except TypeError as err:
            raise UserError(f"model.kwargs do not fit '{name}': {err}") from None
        except ValueError:   # a builtin without a signature: the call decides
            pass
        try:
            model = builder(**kwargs)
        except UserError:
            raise
        except (Exception, SystemExit) as err:   # noqa: BLE001 - the user's code: name it and what it raised
            what = f"called sys.exit({err.code})" if isinstance(err, SystemExit) else \
                f"raised {type(err).__name__}: {(str(err).strip().splitlines() or ['(no message)'])[0]}"
            raise UserError(f"model.name '{name}' {what} while building the model; fix the model callable or "
                            "model.kwargs (--debug shows the traceback)") from err
        if not isinstance(model, nn.Module):
            raise UserError(f"model.name '{name}' returned {type(model).__name__}, not a torch.nn.Module")
        return model
    if name.startswith("torchvision:"):
        builder = _torchvision_builder(name.split(":", 1)[1])
        # dataset hints that most torchvision constructors do not take (ViTs take image_size)
        hints = {key: kwargs.pop(key) for key in ("in_channels", "image_size", "input_dim") if key in kwargs}
        weights = sorted(key for key in kwargs if key.startswith("weights"))
        if weights:
            raise UserError(f"model.kwargs of '{name}' may not set {weights}: ntdist trains members from scratch "
                            "(each from its own seed); remove them")
        try:
            try:
                return builder(weights=None, **kwargs, **hints)
            except TypeError:
                if not hints:
                    raise
                return builder(weights=None, **kwargs)
        except (TypeError, ValueError) as err:
            raise UserError(f"model.kwargs do not fit '{name}': {err}") from None
    if name not in REGISTRY:
        raise UserError(f"unknown model '{name}'{suggest(name, REGISTRY)}; "
                        f"choose one of {sorted(REGISTRY)}, torchvision:<name> or package.module:callable")
    try:
        return REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as err:   # an unknown argument, or a width or depth out of range
        raise UserError(f"model.kwargs do not fit '{name}': {err}") from None


def complete_kwargs(name: str, kwargs: Dict[str, Any], in_shape, num_classes: int) -> Dict[str, Any]:
    """Fill in the input shape and class count a model needs from the dataset, unless given."""
    out = dict(kwargs)
    n = 1
    for d in in_shape:
        n *= d
    hints = {"num_classes": num_classes, "input_dim": n, "in_channels": in_shape[0], "image_size": in_shape[-1]}
    if is_import_path(name):
        # a callable of one's own gets the hints its signature names, and nothing else
        params = inspect.signature(import_callable(name, "model.name")).parameters
        return {**{k: hints[k] for k in DATA_HINTS if k in params}, **out}
    if name.startswith(HF_PREFIX):   # kwargs are config fields; the input shape stays the config's business
        out.setdefault("num_labels", num_classes)
        return out
    out.setdefault("num_classes", num_classes)
    if name == "mlp":
        out.setdefault("input_dim", n)
    elif name == "cnn1d":
        out.setdefault("in_channels", in_shape[0])
        out.setdefault("length", in_shape[-1])
    elif name in IMAGE_MODELS:
        out.setdefault("in_channels", in_shape[0])
        out.setdefault("image_size", in_shape[-1])
    return out


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a member from nothing: a model name and its complete constructor arguments.

    Every checkpoint stores its spec, so `ntdist fuse` and `--resume` rebuild models from files alone.
    `input_shape`, one input's shape where known (from the data), is stored beside it for the commands
    that must feed the model (`ntdist fuse` traces it); it does not take part in comparisons.
    """

    name: str
    kwargs: Dict[str, Any]
    input_shape: Optional[Tuple[int, ...]] = field(default=None, compare=False)

    @classmethod
    def for_data(cls, cfg: ModelConfig, in_shape, num_classes: int) -> "ModelSpec":
        """The spec of `cfg`, with the input shape and class count filled in from the data."""
        return cls(cfg.name, complete_kwargs(cfg.name, dict(cfg.kwargs), in_shape, num_classes),
                   tuple(int(d) for d in in_shape))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpec":
        return cls(data["name"], dict(data["kwargs"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def build(self) -> nn.Module:
        """A randomly initialised model (from torch's global RNG as it stands)."""
        return build_model(self.name, self.kwargs)


__all__ = ["ModelConfig", "ModelSpec", "build_model", "complete_kwargs", "REGISTRY", "MLP", "CNN1D", "LeNet", "VGG11",
           "ResNet18"]
