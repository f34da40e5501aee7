"""A freshly built model checked before anything trains or fuses: one line naming what does not fit.

`check_runs` feeds the model one small batch and names the layer it fails in; `check_model` also checks
what training needs of a member: trainable float32 parameters and one score per class for each input.
`ntdist run` checks its untrained template (`stages.context.make_run`), `ntdist fuse` and `ntdist eval`
their loaded checkpoints.
"""

import torch
import torch.nn as nn

from ntdist.errors import UserError


def check_runs(model: nn.Module, inputs: torch.Tensor, what: str, hint: str):
    """The model's output on `inputs`; UserError naming the layer where `model` fails on them ("in layer '0'
    (Conv1d)"), if it does.

    Run once before a command feeds the model for real: a model that does not fit its input then stops with
    one line instead of a traceback from deep inside training, fusion or evaluation."""
    where = {"text": "before its first layer"}

    def enter(name):
        return lambda module, args: where.update(text=f"in layer '{name}' ({type(module).__name__})")

    def leave(name):
        return lambda module, args, out: where.update(text=f"after layer '{name}' ({type(module).__name__})")

    leaves = [(name, m) for name, m in model.named_modules() if name and not any(True for _ in m.children())]
    hooks = [h for name, m in leaves for h in (m.register_forward_pre_hook(enter(name)),
                                                m.register_forward_hook(leave(name)))]
    training = model.training
    try:
        with torch.no_grad():
            return model.eval()(inputs)
    except Exception as err:  # noqa: BLE001 - the model's own code: one line naming where it failed
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"{what} does not run on inputs of shape {list(inputs.shape)}: {where['text']} raised "
                        f"{type(err).__name__}: {first}; {hint}") from None
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()


def check_model(model: nn.Module, inputs: torch.Tensor, num_classes: int, what: str, hint: str) -> None:
    """UserError unless `model` has trainable parameters of torch's default dtype (float32) and maps `inputs`
    (a small batch of training inputs) to one score per class, [batch, num_classes]; `what` names the model,
    `hint` how to fix its input."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"{what} has no trainable parameters; ntdist trains and fuses the weights of Linear, "
                        "Conv and similar layers: build the model from such layers")
    dtype = torch.get_default_dtype()   # float32 unless a caller chose otherwise: what the training loop feeds
    odd = next(((name, p.dtype) for name, p in model.named_parameters()
                if p.is_floating_point() and p.dtype != dtype), None)
    if odd is not None:
        raise UserError(f"{what} has {odd[1]} parameters ('{odd[0]}'); members train in {dtype} (mixed precision "
                        "is train.precision=bf16 or fp16): drop the .double() or .half() from the model callable")
    inputs = inputs.to(dtype)
    out = check_runs(model, inputs, what, hint)
    expected = [len(inputs), num_classes]
    if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
        got = f"an output of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else \
            f"a {type(out).__name__}"
        raise UserError(f"{what} gives {got} for {len(inputs)} inputs, but the data have {num_classes} classes: "
                        f"it must return one score per class, shape {expected}; let its last layer have "
                        "num_classes outputs (a model callable gets num_classes when its signature names it)")
