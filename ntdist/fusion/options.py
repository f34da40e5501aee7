"""`NTOptions`: how Neuron Transplantation fuses, given once and checked once.

    options = NTOptions(importance="l1", dedup=True)
    fused = fuse(models, options=options)        # or fuse(models, importance="l1", dedup=True)

Every NT step (`fuse`, `fuse_pair`, `nt_step`, `dedup_fuse`, the distributed tree)
reads its options from one frozen `NTOptions`, validated in `__post_init__`, so a
bad combination fails before any model is touched. Each field carries its
default and a one-line help text; `FusionConfig` (the `fusion:` keys of
`ntdist run` and `ntdist fuse`) takes its NT fields from here. What a step
works on (example inputs, the reference model, the plan, the `merged` counts)
is data and stays a separate argument.
"""

import dataclasses
import math
from dataclasses import InitVar, dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

from ntdist.errors import UserError, check_choice, suggest
from ntdist.fusion.dedup.activations import CRITERIA
from ntdist.fusion.dedup.choice import OVERFLOWS
from ntdist.fusion.pruning.importance import DEFAULT_IMPORTANCE, IMPORTANCES, resolve
from ntdist.fusion.pruning.torch_pruning import DEFAULT_PRUNER, PRUNERS, check_pruner
from ntdist.fusion.repair import RIDGE
from ntdist.options import format_value, opt

ORDERS = ("merge_prune", "prune_merge")
DEDUP_ONLY = ("dedup_threshold", "dedup_overflow", "dedup_criterion")   # what only dedup reads
REPAIRS = ("auto", "lstsq", "none")
AUTO_REPAIRED = ("nt",)   # the methods repair auto refits; avg and ot only with repair lstsq (docs/RESULTS.md)


@dataclass(frozen=True)
class NTOptions:
    """The options of an NT fusion. From Python, `importance` may also be a callable scoring a `SpaceView`;
    `prefix` says how error messages name the options ('fusion.' for the config keys)."""

    importance: Union[str, Callable] = opt(DEFAULT_IMPORTANCE,
                                           "unit importance for pruning: " + " | ".join(IMPORTANCES))
    order: str = opt("merge_prune", "merge_prune (concat then prune) | prune_merge (prune each member, then concat)")
    width: Optional[int] = opt(None, "fused width of the first hidden layer (others scaled alike); default: the "
                                     "members' width")
    keep_ratio: Optional[float] = opt(None, "fused width relative to one member's, in (0, k]; default 1")
    pruner: str = opt(DEFAULT_PRUNER, " | ".join(PRUNERS) + ": ntdist never builds the wide model; torch_pruning "
                                      "builds it and prunes it with Torch-Pruning, as the authors' code does "
                                      "(needs the torch-pruning package, importance group_l2)")
    dedup: bool = opt(False, "off | on. On merges a unit whose signature nearly duplicates a kept unit's into it "
                             "(outgoing weights added) instead of keeping both")
    # the threshold's default was chosen on digits and MNIST-1D (docs/RESULTS.md, "Dedup")
    dedup_threshold: float = opt(0.9, "similarity in (0, 1) (see dedup_criterion) above which dedup merges two "
                                      "units")
    dedup_overflow: str = opt("drop", "with dedup, what becomes of units that duplicate no kept unit once the "
                                      "slots are full: drop (as plain NT) | merge (each into its most similar kept "
                                      "unit) | match (units of different members joined, most similar pair first, "
                                      "until the classes fit the slots: averaging for aligned replicas)")
    dedup_criterion: str = opt("weights", "with dedup, what makes two units duplicates: weights (cosine of their "
                                          "incoming parameters) | activations (correlation of their outputs on "
                                          "example inputs)")
    # on MNIST-1D repair lifts NT right after fusion from 31 to 61 % (MLP) and 54 to 92 % (CNN): docs/RESULTS.md
    repair: str = opt("auto", "after the selection, refit each layer's incoming weights by ridge least squares so "
                              "the fused model reproduces the concatenated one on calibration inputs: lstsq | none "
                              "| auto (lstsq where calibration inputs are given and the selection is plain NT's, "
                              "i.e. without dedup and with the ntdist pruner)")
    repair_ridge: float = opt(RIDGE, "repair: ridge penalty relative to each layer's mean input energy")
    prefix: InitVar[str] = ""

    def __post_init__(self, prefix: str):
        p = prefix
        check_choice(self.order, ORDERS, f"{p}order")
        if not callable(self.importance):
            resolve(self.importance, f"{p}importance")
        if self.width is not None and (isinstance(self.width, bool) or not isinstance(self.width, int)
                                       or self.width < 1):
            raise UserError(f"{p}width must be a positive number of units, got {self.width!r}; leave it unset to "
                            "keep the members' width")
        if self.keep_ratio is not None and (isinstance(self.keep_ratio, bool)
                                            or not isinstance(self.keep_ratio, (int, float))
                                            or not math.isfinite(self.keep_ratio) or self.keep_ratio <= 0):
            raise UserError(f"{p}keep_ratio must be in (0, k] for k models (1 keeps one member's width), "
                            f"got {self.keep_ratio!r}")
        if self.width is not None and self.keep_ratio is not None:
            raise UserError(f"give either {p}width or {p}keep_ratio, not both")
        if not isinstance(self.dedup, bool):
            raise UserError(f"{p}dedup must be true or false (on | off), got {self.dedup!r}")
        threshold = self.dedup_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise UserError(f"{p}dedup_threshold must be a cosine similarity in (0, 1), e.g. 0.9, got {threshold!r}")
        check_choice(self.dedup_overflow, OVERFLOWS, f"{p}dedup_overflow")
        check_choice(self.dedup_criterion, CRITERIA, f"{p}dedup_criterion")
        unused = [name for name in DEDUP_ONLY if name in self.changed()]
        if unused and not self.dedup:
            raise UserError(f"{p}{unused[0]} only applies with {p}dedup on; turn {p}dedup on or leave "
                            f"{p}{unused[0]} at its default {format_value(self.default(unused[0]))}")
        if self.dedup and self.order != "merge_prune":
            raise UserError(f"{p}dedup needs {p}order merge_prune (it merges duplicates while selecting from all "
                            f"members at once), got {self.order!r}")
        check_pruner(self.pruner, self.order, self.dedup, self.importance, where=f"{p}pruner")
        check_choice(self.repair, REPAIRS, f"{p}repair")
        ridge = self.repair_ridge
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 <= ridge < math.inf:
            raise UserError(f"{p}repair_ridge must be a number >= 0 (relative to each layer's input energy), "
                            f"e.g. 1e-3, got {ridge!r}")
        if self.repair == "none" and "repair_ridge" in self.changed():
            raise UserError(f"{p}repair_ridge only applies with {p}repair lstsq or auto; leave it at its default "
                            f"{format_value(self.default('repair_ridge'))} or turn repair on")
        if self.repair == "lstsq" and (self.dedup or self.pruner != DEFAULT_PRUNER):
            raise UserError(f"{p}repair lstsq refits the units plain NT selects; {p}dedup on and {p}pruner "
                            f"torch_pruning select differently: set {p}repair auto or none, or turn those off")

    def repairs(self, calibration, method: str = "nt") -> bool:
        """Whether a fusion by `method` (an NT step by default) with these options refits its result on
        `calibration` (None: no inputs)."""
        if self.repair == "lstsq" and calibration is None:
            raise UserError("repair lstsq needs calibration inputs: fuse(..., calibration=x) in Python, "
                            "ntdist fuse --calibration FILE; or set repair auto or none")
        if method not in AUTO_REPAIRED:
            return self.repair == "lstsq"
        plain = not self.dedup and self.pruner == DEFAULT_PRUNER
        return self.repair != "none" and calibration is not None and plain

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The option names, in declaration order (the keys of `ntdist fuse` and the keyword form of `fuse`)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name: str):
        """The default of option `name`."""
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)

    @classmethod
    def config_field(cls, name: str, help_prefix: str = ""):
        """A config field (`opt`) with option `name`'s default and help text, for a config dataclass."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return opt(f.default, help_prefix + f.metadata["help"])

    @classmethod
    def build(cls, options: Optional["NTOptions"], keywords: dict, caller: str) -> "NTOptions":
        """The keyword form of `caller`: `options` (default NTOptions()) with the fields in `keywords` replaced."""
        for name in keywords:
            if name not in cls.names():
                raise TypeError(f"{caller}() got an unexpected keyword argument '{name}'"
                                f"{suggest(name, cls.names())}")
        options = options if options is not None else cls()
        return dataclasses.replace(options, **keywords) if keywords else options

    def changed(self) -> Tuple[str, ...]:
        """The names of the options set away from their defaults."""
        return tuple(name for name in self.names() if getattr(self, name) != self.default(name))

    def check_methods(self, methods: Sequence[str], prefix: str = "", names: Optional[Sequence[str]] = None) -> None:
        """UserError when an option (of `names`, default all) is set away from its default although no method
        in `methods` reads it: nt reads them all; avg and ot read `repair`, and `repair_ridge` with repair lstsq."""
        if "nt" in methods:
            return
        read = ("repair", "repair_ridge") if self.repair == "lstsq" else ("repair",)
        unused = [name for name in self.changed() if (names is None or name in names) and name not in read]
        if unused:
            p, name = prefix, unused[0]
            if name == "repair_ridge":
                raise UserError(f"{p}repair_ridge applies to {', '.join(methods)} only with {p}repair lstsq "
                                f"({p}repair {self.repair} does not repair them): set {p}repair lstsq or leave "
                                f"{p}repair_ridge at its default {format_value(self.default(name))}")
            raise UserError(f"{p}{name} only applies to method nt, not to {', '.join(methods)}; leave {p}{name} "
                            f"at its default {format_value(self.default(name))} or use method nt")
