"""Every option of a prune, declared once: its default, its meaning, its validation and its
command-line flag. `spa.prune(**options)` builds a PruneOptions; the command line derives its flags
from the same fields (`add_arguments`, `from_args`), so an option cannot exist in one and be
dropped by the other."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from spa.errors import SpaError

# Values the options take (the criteria are spa.score's, kept here to import nothing heavy).
CRITERIA = ("l2", "l1", "random")
DATA_CRITERIA = ("wanda", "obs")
IMPORTANCES = ("auto", *CRITERIA, *DATA_CRITERIA)
ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")
# How little OBS and the refit lean on the calibration data's statistics: the ridge lambda as a
# fraction of a layer's mean feature energy (spa.score, spa.compensate). Calibration data like the
# inputs the model will see wants it small: 0.1 cost the MNIST CNNs, calibrated on MNIST images,
# up to 8 points at ratio 0.7 (ResNet 91.3 -> 83.3%), on synthetic data up to 16 (VGG 90.8 -> 75.2).
DAMPING = 0.01


def _option(
    default: Any, help: str, *, sweep: bool = False, split: str | None = None, **cli: Any
) -> Any:
    """A field with its command-line form: `cli` holds argparse's keywords (the flag is --name
    with dashes unless `flag` says otherwise; no `help` in `cli`: None means no flag). sweep: the
    option is a method option that `spa sweep` takes too. split: a list flag whose values may be
    joined by this separator."""
    return dataclasses.field(
        default=default, metadata={"help": help, "cli": cli, "sweep": sweep, "split": split}
    )


@dataclasses.dataclass(frozen=True)
class PruneOptions:
    ratio: float = _option(
        0.5,
        "fraction of the channels of every prunable group to remove, in [0, 1) (default 0.5; a "
        "target replaces it)",
        type=float,
    )
    round_to: int | None = _option(
        None,
        "keep channel counts multiples of N (default: what the CPU's SIMD width rewards, finer "
        "where a target would be cut past by more than 0.02)",
        sweep=True,
        type=int,
        metavar="N",
    )
    ignore: tuple[str, ...] = _option(
        (),
        "glob of node or initializer names to leave alone (repeatable)",
        sweep=True,
        action="append",
        metavar="PATTERN",
    )
    exclude_ops: tuple[str, ...] = _option(
        (),
        "op types whose nodes keep all their channels, e.g. Conv,Gemm (repeatable)",
        sweep=True,
        split=",",
        action="append",
        metavar="OP[,OP...]",
    )
    importance: str = _option(
        "auto",
        "channel importance: auto (obs with calibration data; without, obs on synthetic data where "
        "that is cheap, else l2), "
        "l2, l1 (group magnitude), random, or with calibration data wanda (|W| x input RMS) or obs "
        "(output error of removing a channel, "
        "optimally compensated)",
        sweep=True,
        choices=IMPORTANCES,
    )
    allocation: str = _option(
        "auto",
        "how many channels each group loses: uniform (the ratio of every group), global (the "
        "lowest-scoring channels wherever "
        "they are), sensitivity (groups share the cut by their measured effect on the outputs per "
        "MAC saved; needs calibration data); "
        "auto: sensitivity with the user's calibration data, else uniform",
        sweep=True,
        choices=ALLOCATIONS,
    )
    global_ranking: bool = _option(
        False,
        "the same as --allocation global",
        sweep=True,
        flag="--global",
        action="store_const",
        const=True,
    )
    max_group_ratio: float = _option(
        0.8,
        "with global or sensitivity allocation: the most any group may lose (default 0.8)",
        sweep=True,
        type=float,
    )
    layer_ratios: dict[str, float] | None = _option(
        None,
        "PATTERN=R: the output channels of the layers whose node names match the glob (and all "
        "channels coupled to them) lose the "
        "fraction R, whatever the allocation; the first matching pattern wins; a target searches "
        "the other groups' cut (repeatable)",
        sweep=True,
        flag="--layer-ratio",
        action="append",
        metavar="PATTERN=R",
    )
    target_macs: float | None = _option(
        None,
        "prune until at most the fraction F of the MACs remains (searches the ratio)",
        type=float,
        metavar="F",
    )
    target_params: float | None = _option(
        None, "prune until at most the fraction F of the params remains", type=float, metavar="F"
    )
    min_fidelity: float | None = _option(
        None,
        "with calibration data: cut at most what the ratio or the target asks, less where needed "
        "to keep the fidelity on held-out "
        "calibration samples (top-1 agreement for class scores, else cosine) at least F; bisects "
        "the ratio, a prune and refit per step "
        "(about 6)",
        type=float,
        metavar="F",
    )
    prune_hidden: bool = _option(
        False,
        "also prune channels that normalizations (LayerNorm, RMSNorm) average over, such as a "
        "transformer's hidden size "
        "(lossy: outputs change)",
        sweep=True,
        action="store_const",
        const=True,
    )
    prune_cache: bool = _option(
        False,
        "let a decoder's key/value cache lose the heads pruned: the past_key_values inputs and "
        "present outputs get fewer heads (the signature changes; the runtime's config must say "
        "the new head counts)",
        sweep=True,
        action="store_const",
        const=True,
    )
    calibration: Any = _option(
        None,
        "sample inputs (.npy for one input, .npz keyed by input name; from Python also arrays, a "
        "dict of arrays or a "
        "CalibrationDataReader) for data-aware importance and the refit; 'synthetic' (noise) or "
        "'generated' (text a causal language "
        "model samples itself, its default without data) for data-free",
        sweep=True,
        metavar="FILE|synthetic|generated",
    )
    damping: float = _option(
        DAMPING,
        "how little the OBS scores and the refit trust the calibration data: their ridge, as a "
        "fraction of each layer's mean input energy (default 0.01; the refit cross-validates 1 "
        "to 1000 times it per layer). Raise it (0.1) when the calibration data holds few "
        "independent samples or is unlike what the model will see: EfficientNet-Lite0 "
        "calibrated on crops of 10 photos kept top-1 agreement 0.75 -> 0.81 on ImageNet at 0.8 "
        "of the MACs",
        sweep=True,
        type=float,
    )
    compensate: bool | None = _option(
        None,
        "do not repair the layers that lost inputs (no refit from calibration data, no "
        "BatchNormalization means)",
        sweep=True,
        flag="--no-compensate",
        action="store_const",
        const=False,
    )
    plan: Any = _option(
        None,
        "apply the kept channels of an earlier prune's JSON report (a file, or its dict from "
        "Python) instead of planning: "
        "the same model or a re-export with the same node names; ratio and targets are then "
        "ignored",
        metavar="REPORT.json",
    )
    # --input-shapes: every command
    input_shapes: dict[str, list[int]] | None = _option(
        None, "concrete shapes for symbolic input dims, for the analysis only"
    )
    verify: bool = _option(
        True,
        "skip the checker and onnxruntime checks of the result",
        flag="--no-verify",
        action="store_const",
        const=False,
    )
    seed: int = _option(
        0, "seed for --importance random and the synthetic data", sweep=True, type=int
    )

    def __post_init__(self) -> None:
        for name in ("ignore", "exclude_ops"):  # lists from Python, tuples when frozen
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "layer_ratios", _layer_ratios(self.layer_ratios or {}))
        if self.allocation not in ALLOCATIONS:
            raise SpaError(
                f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}"
            )
        if not 0.0 <= self.ratio < 1.0:
            raise SpaError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.importance not in IMPORTANCES:
            raise SpaError(
                f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}"
            )
        if self.round_to is not None and self.round_to < 1:
            raise SpaError(f"round_to must be a positive integer, got {self.round_to}")
        if not 0.0 < self.max_group_ratio < 1.0:
            raise SpaError(f"max_group_ratio must be in (0, 1), got {self.max_group_ratio}")
        if not 0.0 < self.damping < float("inf"):
            raise SpaError(f"damping must be a positive number, got {self.damping}")
        if self.target_macs is not None and self.target_params is not None:
            raise SpaError("give target_macs or target_params, not both")
        if self.plan is not None and (
            self.target_macs is not None
            or self.target_params is not None
            or self.min_fidelity is not None
            or self.layer_ratios
        ):
            raise SpaError(
                "a plan decides the channels: give it without target_macs, target_params, "
                "min_fidelity or layer_ratios"
            )
        for name in ("target_macs", "target_params", "min_fidelity"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise SpaError(f"{name} must be a fraction in (0, 1], got {value}")

    @classmethod
    def of(cls, options: dict[str, Any]) -> PruneOptions:
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise SpaError(
                f"unknown option(s) {', '.join(unknown)}; spa.options.PruneOptions lists them"
            )
        return cls(**options)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields, for spa.prune(**...) (shallow: calibration arrays are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def record(self, describe_calibration) -> dict:
        """The options as the report and the model's metadata record them."""
        record = self.as_kwargs()
        plan = (
            self.plan
            if self.plan is None or isinstance(self.plan, (str, os.PathLike))
            else "a report (dict)"
        )
        record.update(
            ignore=list(self.ignore),
            exclude_ops=list(self.exclude_ops),
            calibration=describe_calibration(self.calibration),
            plan=plan and str(plan),
        )
        return record

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, sweep: bool = False) -> None:
        """Every option's flag (sweep: the method options only). Defaults are None: an option not
        given takes the field's default in `from_args`."""
        for f in dataclasses.fields(cls):
            cli = dict(f.metadata["cli"])
            if not cli or (sweep and not f.metadata["sweep"]):
                continue
            flag = cli.pop("flag", "--" + f.name.replace("_", "-"))
            parser.add_argument(flag, dest=f.name, default=None, help=f.metadata["help"], **cli)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **given: Any) -> PruneOptions:
        """The options a command line gave (those its parser has), plus `given`."""
        options = {}
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is None or not f.metadata["cli"]:
                continue
            if f.metadata["split"]:
                value = [part for item in value for part in item.split(f.metadata["split"]) if part]
            options[f.name] = value
        return cls.of({**options, **given})


def _layer_ratios(given) -> dict[str, float]:
    """{pattern: ratio} from a dict or from "PATTERN=R" strings (the command line's), validated."""
    if isinstance(given, dict):
        pairs = []
        for pattern, ratio in given.items():
            try:
                pairs.append((str(pattern), float(ratio)))
            except (TypeError, ValueError):
                raise SpaError(f"layer ratio for {pattern!r}: {ratio!r} is not a number") from None
    else:
        pairs = []
        for item in given:
            pattern, sep, ratio = str(item).rpartition("=")
            if not sep or not pattern:
                raise SpaError(f"layer ratio {item!r}: give PATTERN=R, e.g. 'blocks.0.*=0.2'")
            try:
                pairs.append((pattern, float(ratio)))
            except ValueError:
                raise SpaError(f"layer ratio {item!r}: {ratio!r} is not a number") from None
    for pattern, ratio in pairs:
        if not 0.0 <= ratio < 1.0:
            raise SpaError(f"layer ratio for {pattern!r} must be in [0, 1), got {ratio}")
    return dict(pairs)
