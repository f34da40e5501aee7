"""Initial weights for every member: a local state-dict file or torchvision weights from the local hub cache.

`model.weights` names a `.safetensors` file (an ntdist checkpoint or a plain state
dict), a Hugging Face folder (`hf:DIR`, or a folder with config.json: its
safetensors weights), a state dict saved with `torch.save` (read with `weights_only=True`, so
no code runs), or, for `torchvision:<name>` models, a weights name such as
`DEFAULT` or `IMAGENET1K_V1`. Nothing is downloaded: torchvision weights must
already be in torch's hub cache, and the error says where to put the file.
The modules in `model.reinit` keep their fresh (per-member seeded) initialisation.
Files are read and matched by the rules `ntdist fuse` applies to its checkpoints
(`models.statedict`): wrapper prefixes removed, integer tensors where the model
holds floating-point ones refused, NaN or infinite values refused with the tensor.
"""

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence
from urllib.parse import urlparse

import torch

from ntdist.errors import UserError, suggest
from ntdist.models.hf import folder, is_hf, read_state
from ntdist.models.statedict import finite, first_difference, read_weights, unwrap

if TYPE_CHECKING:   # models/__init__ defines the spec beside the registry
    from ntdist.models import ModelSpec

FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The model tensors of a weights file: an ntdist checkpoint, a plain safetensors file or a weights-only
    torch file (`models.statedict.read_weights`)."""
    return read_weights(path)[0]


def torchvision_state_dict(model_name: str, weights_name: str) -> Dict[str, torch.Tensor]:
    """torchvision weights `weights_name` of `model_name`, read from the local hub cache (never downloaded)."""
    import torchvision.models as tvm

    enum = tvm.get_model_weights(model_name)
    short = weights_name.split(".")[-1]
    if short not in enum.__members__:
        raise UserError(f"torchvision model '{model_name}' has no weights '{weights_name}'"
                        f"{suggest(short, enum.__members__)}; choose one of {list(enum.__members__)}, "
                        "or give model.weights a local file")
    weights = enum[short]
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
    if not os.path.isfile(path):
        raise UserError(f"torchvision weights {enum.__name__}.{short} are not in the local cache: download "
                        f"{weights.url} and put it at {path} (or point model.weights at a local file)")
    return read_state_dict(path)


def initial_state(name: str, weights: Optional[str]) -> Optional[Dict[str, torch.Tensor]]:
    """The state dict `model.weights` names, or None when members start from random initialisation."""
    if not weights:
        return None
    if is_hf(weights):
        path = folder(weights, "model.weights")
        return finite(path, read_state(path))
    if os.path.exists(weights) or weights.endswith(FILE_SUFFIXES):
        return read_state_dict(weights)
    if name.startswith("torchvision:"):
        return torchvision_state_dict(name.split(":", 1)[1], weights)
    raise UserError(f"model.weights '{weights}' is not a file; give a .safetensors or torch state-dict file "
                    "(weights names such as DEFAULT only exist for torchvision:<name> models)")


def _under(key: str, modules: List[str]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def load_initial(model: torch.nn.Module, state: Dict[str, torch.Tensor], reinit: List[str]) -> torch.nn.Module:
    """Copy `state` into `model`, except the modules in `reinit`; every other tensor must be there and fit."""
    names = dict(model.named_modules())
    for module in reinit:
        if module not in names or not module:
            raise UserError(f"model.reinit names '{module}', which is not a module of the model"
                            f"{suggest(module, [n for n in names if n])}")
    own = {k: v for k, v in model.state_dict().items() if not _under(k, reinit)}
    given = {k: v for k, v in unwrap(state, model.state_dict()).items() if not _under(k, reinit)}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise UserError(f"model.weights do not fit the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                        f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; check model.name and "
                        "model.kwargs, or list the differing modules in model.reinit")
    for key, value in given.items():
        if value.shape != own[key].shape:
            module = key.rsplit(".", 1)[0]
            raise UserError(f"model.weights: '{key}' has shape {list(value.shape)} but the model needs "
                            f"{list(own[key].shape)}; a new head? add '{module}' to model.reinit")
    problem = first_difference(given, own)   # what is left: a dtype, the rule ntdist fuse applies
    if problem is not None:
        raise UserError(f"model.weights do not fit the model ({problem}); save the model's own state_dict()")
    model.load_state_dict(given, strict=False)
    return model


def build_member(spec: "ModelSpec", seed: int, initial: Optional[Dict[str, torch.Tensor]] = None,
                 reinit: Sequence[str] = ()) -> torch.nn.Module:
    """A freshly initialised member (the seed fixes the initialisation), loaded from `initial` when given,
    except for the modules in `reinit`, which keep their seeded fresh weights."""
    torch.manual_seed(seed)
    model = spec.build()
    return model if initial is None else load_initial(model, initial, list(reinit))
