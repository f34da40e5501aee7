"""The resumable epoch loop that member training (one by one or vectorised) and fine-tuning share.

`ResumableEpochs` restores a state file, runs the remaining epochs, writes the
state after each (and every `checkpoint_every_steps` batches inside them) and
stops cleanly when preempted: at an epoch end, or inside an epoch at the next
checkpoint batch, with every rank of the group stopping at the same batch.
`LockstepEpochs` runs the same loop for several models trained as one (the
vectorised members), each with its own `ResumableEpochs` for its state file.
"""

import os
from typing import Callable, List, Optional, Sequence

import torch

from ntdist.errors import Preempted, UserError
from ntdist.preempt import preempt_requested
from ntdist.training.loop import EpochPosition
from ntdist.training.state import StateOwner, load_state, save_state


class ResumableEpochs:
    """Epochs 1..`epochs` of one model, resumable after any of them and, with `every_steps`, inside them.

    Construct it before wrapping the model (DDP, an engine): with `resume` and an
    existing state file the model, optimizer, scheduler, RNG and the fp16 grad
    `scaler` (when given) are restored here.
    `train(one_epoch, should_stop, loader, reduce)` positions `loader` (`set_epoch`)
    and calls `one_epoch(epoch, position) -> record` for each remaining epoch, which
    passes `position` on to `train_epoch`. The state is written after each epoch (when
    `writer`) and every `every_steps` batches inside one. Preemption is honoured at
    these points: at an epoch end when `should_stop()` (where the ranks agree), inside
    an epoch when any rank's SIGTERM flag is up, which the ranks learn from the same
    single `reduce` (a sum over the ranks sharing `loader`) that gathers their loss sums.
    `run_id` (the run's config digest) and `seed` go into the state's owner, which a resume checks.
    """

    def __init__(self, what: str, epochs: int, model, optimizer, scheduler, spec, state_path: Optional[str],
                 writer: bool, resume: bool, every_steps: int = 0, scaler=None, *, run_id: str, seed: int):
        self.what, self.epochs, self.spec, self.every_steps, self.scaler = what, epochs, spec, every_steps, scaler
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.owner = StateOwner.of(run_id, what, seed, model, epochs)
        self.source = state_path   # the file restored from, named in errors (every rank of a group reads it)
        self.state_path = state_path if writer else None
        self.start, self.history, self.resumed = 1, [], None
        if resume and state_path and os.path.exists(state_path):
            done, self.history, self.resumed = load_state(state_path, model, optimizer, scheduler, epochs, scaler,
                                                          self.owner)
            self.start = done + 1

    def train(self, one_epoch: Callable[[int, EpochPosition], dict], should_stop: Callable[[], bool],
            loader, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> List[dict]:
        for epoch in range(self.start, self.epochs + 1):
            position = self._position(epoch, loader)
            if self.every_steps > 0:
                position.at_step = self._at_step(epoch, loader, reduce or (lambda t: t))
            self.record(epoch, one_epoch(epoch, position))
            stop_if_requested(self.what, epoch, self.epochs, should_stop)
        return self.history

    def _position(self, epoch: int, loader) -> EpochPosition:
        """Where `epoch` starts: at its first batch, or where the restored state left it (checked against `loader`)."""
        saved = self.resumed if epoch == self.start else None
        loader.set_epoch(epoch)
        if saved is None:
            return EpochPosition()
        layout = (len(saved["order"]), saved["batch_size"], saved["replicas"])
        here = (len(loader.order()), loader.batch_size, loader.num_replicas)
        if layout != here or not torch.equal(saved["order"], loader.order()):
            fields = [f"{name} {a} there, {b} now"
                      for name, a, b in zip(("samples", "batch size", "ranks"), layout, here) if a != b]
            if not fields:   # same sizes, another shuffle: the seed or the data differ
                at = int((saved["order"] != loader.order()).nonzero()[0])
                fields = [f"the shuffled order: position {at} holds sample {int(saved['order'][at])} there, "
                          f"{int(loader.order()[at])} now"]
            raise UserError(f"the state of {self.what} was written inside epoch {epoch} with another data order "
                            f"({'; '.join(fields)}); resume with the config and world size the run started with")
        if not 0 < saved["step"] < len(loader) or saved["count"] > len(saved["order"]):
            raise UserError(f"state file '{self.source}' stands at batch {saved['step']} of epoch {epoch} after "
                            f"{saved['count']} samples, but the epoch has {len(loader)} batches of "
                            f"{len(saved['order'])} samples; delete it to redo that stage from its start")
        loader.set_epoch(epoch, saved["step"])
        return EpochPosition(saved["step"], saved["loss_sums"][loader.rank], saved["count"])

    def _at_step(self, epoch: int, loader, reduce: Callable[[torch.Tensor], torch.Tensor]
                 ) -> Callable[[EpochPosition], None]:
        steps = len(loader)

        def at_step(position: EpochPosition) -> None:
            if position.step % self.every_steps or position.step >= steps:   # the epoch's end writes its own state
                return
            shared = torch.zeros(loader.num_replicas + 1, dtype=torch.float64)   # loss sum per rank, then the flag
            shared[loader.rank] = position.loss_sum.item()
            shared[-1] = float(preempt_requested())
            shared = reduce(shared)
            if self.state_path:
                where = {"epoch": epoch, "step": position.step, "loss_sums": shared[:-1].tolist(),
                         "count": position.count, "batch_size": loader.batch_size, "replicas": loader.num_replicas}
                save_state(self.state_path, self.model, self.spec, self.optimizer, self.scheduler, epoch - 1,
                           self.history, where, loader.order(), self.scaler, self.owner)
            if shared[-1] > 0:
                raise Preempted(f"preempted during {self.what} at batch {position.step} of epoch {epoch}; "
                                "the state is saved: rerun the same command with --resume")
        return at_step

    def record(self, epoch: int, record: dict) -> None:
        """Add the epoch's record to the history and write the state (model, optimizer, scheduler as they are)."""
        self.history.append(record)
        if self.state_path:
            save_state(self.state_path, self.model, self.spec, self.optimizer, self.scheduler, epoch, self.history,
                       scaler=self.scaler, owner=self.owner)


class LockstepEpochs(ResumableEpochs):
    """The epochs of models trained in one loop (vectorised members), each model's state in its own `parts` entry.

    The parts must stand at the same epoch end (`aligned`). `train(one_epoch, should_stop, loaders)`
    sets the epoch of every loader; `one_epoch` returns one record per part, in order. Each part's
    state is then written as its own loop would write it, with the RNG seeded by its `seeds` entry
    first: models trained in lockstep draw no random numbers, so that is where their own loops stand.
    """

    def __init__(self, what: str, parts: Sequence[ResumableEpochs], seeds: Sequence[int]):
        assert self.aligned(parts), "lockstep models resume together, at an epoch end"
        # the loop's own fields only: the models, optimizers and state files are the parts'
        self.what, self.epochs, self.every_steps = what, parts[0].epochs, 0
        self.start, self.history, self.resumed = parts[0].start, [], None
        self.parts, self.seeds = list(parts), list(seeds)

    @staticmethod
    def aligned(parts: Sequence[ResumableEpochs]) -> bool:
        """Whether the parts' states stand at the same epoch end (not e.g. trained one after another, then cut)."""
        return all(part.start == parts[0].start and part.resumed is None for part in parts)

    def _position(self, epoch: int, loaders) -> EpochPosition:
        for loader in loaders:
            loader.set_epoch(epoch)
        return EpochPosition()

    def record(self, epoch: int, records: List[dict]) -> None:
        self.history.append(records)
        for part, seed, record in zip(self.parts, self.seeds, records):
            torch.manual_seed(seed)
            part.record(epoch, record)


def stop_if_requested(what: str, epoch: int, epochs: int, should_stop: Callable[[], bool]) -> None:
    """At an epoch boundary, once every state is on disk: raise `Preempted` if `should_stop()`."""
    if epoch < epochs and should_stop():
        raise Preempted(f"preempted during {what} after epoch {epoch}; "
                        "the state is saved: rerun the same command with --resume")
