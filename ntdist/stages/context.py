"""The frozen context of one run: what never changes during `ntdist run`, handed to every stage.

`make_run` loads the data and checks the model, everything that can fail on bad input, before any file
is written (`check_shards` and `check_template`, which `ntdist run --dry-run` runs too, once for each
distinct `checked_settings` of a sweep); the stages (`ntdist.stages`, `ntdist.pipeline`) read the run's
constants from the `Run` it returns and pass what changes (held members, fused models, results) explicitly.
"""

import hashlib
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
from torch.utils.data import Dataset

from ntdist.config import Config, to_yaml
from ntdist.data import Splits, load_splits
from ntdist.distributed.layout import MemberLayout
from ntdist.distributed.world import World
from ntdist.errors import UserError
from ntdist.fusion import analyze
from ntdist.fusion.nt import PLANNED
from ntdist.models import ModelSpec
from ntdist.models.probe import check_model
from ntdist.models.weights import build_member, initial_state
from ntdist.records.rundir import RunDir, config_digest
from ntdist.shards import member_shards
from ntdist.stages.given import check_members, members_digest
from ntdist.training.config import member_seed
from ntdist.training.state import StateOwner


def member_part(index: int) -> str:
    """The part of a run that trains member `index`: named in messages and in its files' owner."""
    return f"training of member {index}"


def finetune_part(label: str) -> str:
    """The part of a run that fine-tunes `label` (a fusion method or the control)."""
    return f"fine-tuning ({label})"


@dataclass(frozen=True)
class Run:
    """The constants of one run, handed to every stage."""

    cfg: Config
    world: World
    layout: MemberLayout
    splits: Splits
    spec: ModelSpec
    rundir: RunDir
    dtype: str   # of the members' floating-point tensors, read from member 0 as `make_run` built it
    resume: bool = False
    initial: Optional[Dict[str, torch.Tensor]] = None   # model.weights, loaded into every member
    shards: Optional[Tuple[Dataset, ...]] = None          # data.member_split: each member's training set
    members_digest: str = ""   # of the fusion.members files' bytes (`stages.given.members_digest`), "" without

    def member_train(self, index: int) -> Dataset:
        """The training samples of member `index`: its shard, or the whole training set (`iid`)."""
        return self.splits.train if self.shards is None else self.shards[index]

    def template(self) -> torch.nn.Module:
        """A model of the members' architecture whose weights are about to be overwritten."""
        return self.spec.build()

    @property
    def run_id(self) -> str:
        """The digest of the config keys that decide the results, and of the fusion.members files' bytes: the run
        a state file records as its owner (a member file replaced before a resume is another run)."""
        digest = config_digest(to_yaml(self.cfg))
        if not self.members_digest:
            return digest
        return hashlib.sha256(f"{digest} {self.members_digest}".encode()).hexdigest()[:len(digest)]

    def owner(self, part: str, seed: int, epochs: int) -> StateOwner:
        """Whose the state files and the final checkpoint of `part` (`member_part`, `finetune_part`) are."""
        return StateOwner(self.run_id, part, seed, self.dtype, epochs)

    def member_owner(self, index: int) -> StateOwner:
        """Whose member `index`'s files are: its training, from its seed, for `train.epochs`."""
        return self.owner(member_part(index), member_seed(self.cfg.train, index), self.cfg.train.epochs)

    def calibration_inputs(self, share: int = 0, shares: int = 1) -> torch.Tensor:
        """`fusion.calibration_samples` training inputs drawn with the run's seed: what the repair fits on.

        Each rank of the fusion tree draws its own (`share` of `shares`): the next block of the same seeded
        order, so the ranks' inputs differ while the training set lasts (each block is at most a 1/shares part
        of it), and share 0 is what one process draws."""
        train = self.splits.train
        count = min(self.cfg.fusion.calibration_samples, max(1, len(train) // shares))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.cfg.train.seed))
        mine = order.roll(-share * count)[:count]
        return torch.stack([train[i][0] for i in sorted(mine.tolist())])

    def example_inputs(self) -> torch.Tensor:
        """The first training inputs: two to trace shapes, more for NT dedup's activation criterion."""
        return example_inputs(self.cfg, self.splits.train)


def example_inputs(cfg: Config, train: Dataset) -> torch.Tensor:
    """The first `fusion.example_count()` inputs of `train`: what fusion and the template's checks are given."""
    return torch.stack([train[i][0] for i in range(min(cfg.fusion.example_count(), len(train)))])


def make_run(cfg: Config, world: World, resume: bool = False) -> Run:
    """Load the data and check the model: everything that can fail on bad input, before any file is written."""
    splits = load_splits(cfg.data)
    spec = ModelSpec.for_data(cfg.model, splits.in_shape, splits.num_classes)
    initial = initial_state(cfg.model.name, cfg.model.weights)
    template = build_member(spec, 0, initial, cfg.model.reinit)   # the model builds and the weights fit
    check_members(cfg.fusion.members, spec)                        # members trained elsewhere fit it too
    shards = check_shards(cfg, splits)
    run = Run(cfg, world, MemberLayout(cfg.fusion.k, world.size), splits, spec,
              RunDir(cfg.output.dir, world.is_main, cfg.output.trackers), StateOwner.dtype_of(template), resume,
              initial, shards, members_digest(cfg.fusion.members))
    check_template(cfg, splits, run.example_inputs(), template)
    return run


LOADER_KEYS = ("batch_size", "eval_batch_size", "loader_workers")   # data keys only the batch loaders read


def checked_settings(cfg: Config) -> str:
    """What the checks before training read from `cfg`, as one string: the data and model sections (but
    `LOADER_KEYS`), the mode, the fusion methods, fusion.members, the number of example inputs, and fusion.k
    where data.member_split deals the data out. Two configs with the same string pass or fail `make_run`'s
    checks alike, whatever their lr, epochs or seed: a sweep's dry run checks each distinct one once."""
    fc = cfg.fusion
    data = {key: value for key, value in asdict(cfg.data).items() if key not in LOADER_KEYS}
    methods = cfg.sync.methods if cfg.mode == "sync" else fc.methods
    dealt = fc.k if cfg.data.member_split != "iid" else None
    return repr((asdict(cfg.model), data, cfg.mode, list(methods), list(fc.members), fc.example_count(), dealt))


def check_shards(cfg: Config, splits: Splits) -> Optional[Tuple[Dataset, ...]]:
    """Each member's training set under data.member_split (None: all of it); UserError for a split that leaves
    a member without samples or that meets members ntdist does not train (mode: sync, fusion.members)."""
    shards = member_shards(splits.train, cfg.fusion.k, cfg.data)
    if shards is not None and (cfg.mode == "sync" or cfg.fusion.members):
        what = ("mode: sync trains its replicas on the whole training set" if cfg.mode == "sync"
                else "fusion.members brings members trained elsewhere")
        raise UserError(f"data.member_split={cfg.data.member_split} deals the training set out to the members "
                        f"ntdist trains, but {what}: leave data.member_split=iid")
    return None if shards is None else tuple(shards)


def check_template(cfg: Config, splits: Splits, examples: torch.Tensor, model: torch.nn.Module) -> None:
    """UserError, before any member trains, for a model that training or fusion would fail on: one that does
    not run on the training inputs `examples` or gives no score per class (`models.probe.check_model`), and
    one whose channels the configured fusion methods cannot analyse (a recurrent layer, a layer used twice, a
    tensor under two names). `ntdist run` checks member 0 on the CPU; `ntdist run --dry-run` runs the same
    check, on `meta` for a large model (`commands.dryrun_plan`)."""
    with torch.random.fork_rng(devices=[]):   # a traced forward may draw (dropout): the run's RNG stays as it was
        _check_template(cfg, splits, examples, model)


def _check_template(cfg: Config, splits: Splits, examples: torch.Tensor, model: torch.nn.Module) -> None:
    examples = examples.to(torch.get_default_dtype())   # float32 but where a caller chose otherwise
    shape = list(splits.in_shape)
    check_model(model, examples[:2], splits.num_classes, f"model.name '{cfg.model.name}'",
                f"the data's inputs have shape {shape}: give the model that input (model.kwargs), or other data")
    methods = cfg.sync.methods if cfg.mode == "sync" else cfg.fusion.methods
    if any(method in PLANNED for method in methods):
        try:
            analyze(model, examples)
        except UserError as err:
            avg = "" if "method avg" in str(err) else "; or fuse with method avg, which averages any model"
            raise UserError(f"model.name '{cfg.model.name}' cannot be fused with {', '.join(methods)}: "
                            f"{err}{avg}") from None
