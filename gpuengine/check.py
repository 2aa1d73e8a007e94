"""``gpuengine check``: what each precision does to *your* embeddings, before a long run.

A sample of the user's own sequences (``--sample``, default 512, spread evenly over the input)
goes through an fp32 reference on the device and through each requested precision, with the
engine's own model builders and runners (the kernels a run would use). For each precision:
min and mean cosine of the pooled vectors to fp32, the largest absolute difference, tokens/s,
and — with a classifier — how many labels stay the same.

Classifiers (``--classifier``, VirNucPro's MLP in any of the formats ``predict`` reads):

* input size = the model's width: the input FASTA holds the model's own sequences and the
  classifier scores their embeddings directly;
* input size = DNABERT-S width + ESM-2 width (VirNucPro): the input holds *reads*; they are cut
  into ``--length`` chunks and translated in six frames as ``predict`` does, the checked model
  embeds its side of each frame, the other model (``--partner-model``) embeds the other side
  once, at fp32, so only the checked precision moves the labels.

``--min-cosine X`` makes the check fail (exit code 1) when a precision's min cosine is below X.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gpuengine.config import Environment, environment
from gpuengine.errors import GpuEngineError, UsageError
from gpuengine.fidelity import Embedded, compare, embed_items, sample_evenly
from gpuengine.vocabulary import PRECISIONS

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 512
PARTNERS = {"esm2": "zhihan1996/DNABERT-S", "dnabert-s": "esm2_t36_3B_UR50D"}
"""VirNucPro's other model, by the checked model's family."""


@dataclass(frozen=True)
class CheckConfig:
    """Everything one ``gpuengine check`` needs."""

    inputs: tuple[Path, ...]
    model: str
    precisions: tuple[str, ...] | None = None
    """None: fp16, bf16 (and fp8 where the GPU runs it) on a GPU; bf16 on the CPU."""
    sample: int = DEFAULT_SAMPLE
    min_cosine: float | None = None
    classifier: Path | None = None
    length: int | None = None
    """VirNucPro chunk length (300 or 500); default: from the classifier's file name."""
    partner_model: str | None = None
    devices: str = "auto"
    layer: int = -1
    max_tokens: int | None = None
    fp8_gemms: str | None = None
    """Which GEMMs run in FP8 (``qkv,out_proj,fc1,fc2``, ``all``); None: the run default."""
    allow_download: bool = True
    env: Environment = field(default_factory=environment)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UsageError("no input FASTA file given")
        if self.sample < 1:
            raise UsageError(f"--sample must be at least 1 (got {self.sample})")
        for precision in self.precisions or ():
            if precision not in PRECISIONS or precision == "fp32":
                raise UsageError(f"--precision {precision!r}: check compares fp16, bf16 or fp8 "
                                 "against fp32")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise UsageError(f"--min-cosine {self.min_cosine}: a cosine lies in [-1, 1]")


@dataclass
class PrecisionResult:
    precision: str
    kernels: str
    min_cosine: float
    mean_cosine: float
    max_abs_error: float
    tokens_per_second: float
    worst_record: str
    label_agreement: float | None = None
    labels_changed: int | None = None


@dataclass
class CheckReport:
    model: str
    device: str
    layer: int
    sequences: int
    tokens: int
    reference_tokens_per_second: float
    invalid_skipped: int = 0
    classifier: str | None = None
    classifier_mode: str | None = None
    reference_labels: dict[str, int] | None = None
    results: list[PrecisionResult] = field(default_factory=list)
    min_cosine: float | None = None

    @property
    def failed(self) -> list[str]:
        """Precisions below ``min_cosine``."""
        if self.min_cosine is None:
            return []
        return [r.precision for r in self.results if r.min_cosine < self.min_cosine]

    def to_json(self) -> dict:
        data = asdict(self)
        data["failed"] = self.failed
        return data


@dataclass
class _Sample:
    """The sequences the checked model embeds, and for a VirNucPro classifier the partner's
    side of the same frames."""

    ids: list[str]
    sequences: list[str]
    partner_sequences: list[str] | None = None
    invalid_skipped: int = 0


def run_check(config: CheckConfig, progress=None) -> CheckReport:
    """Measure each precision against fp32 on a sample of ``config.inputs`` (module docstring)."""
    from gpuengine.devices import parse_devices
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve
    from gpuengine.store.schema import OutputSpec

    stage = progress.stage if progress is not None else (lambda text: log.info("%s", text))
    source = resolve(config.model, allow_download=config.allow_download and not config.env.offline)
    fam = family(source.family)
    device = parse_devices(config.devices)[0]
    precisions = config.precisions or default_precisions(device, fam.name)
    _check_precisions(precisions, fam.name, device)
    stage(f"reading weights {source.path}")
    weights = fam.read(source)
    if weights.synthetic:
        log.warning("model %s has RANDOM weights (a gpuengine test checkpoint): what a precision "
                    "does to trained weights can differ a lot", source.path)
    classifier = (_load_classifier(config, fam, weights.embed_dim, source.name)
                  if config.classifier else None)
    stage(f"sampling {config.sample} sequences from {', '.join(map(str, config.inputs))}")
    sample = _sample(config, fam, classifier)
    layer = _resolve_layer(config.layer, weights.num_layers)
    outputs = [OutputSpec(layer, "mean")]
    tokenizer = fam.tokenizer(source)
    max_residues = fam.default_max_residues
    items = _items(sample.sequences, tokenizer, max_residues)
    budget = config.max_tokens or (16384 if device.type == "cuda" else 4096)

    def runner(precision: str):
        return _runner(fam, weights, device, precision, outputs, config)

    stage(f"fp32 reference on {device} ({len(items)} sequences)")
    reference = _embed(runner("fp32"), items, budget)
    report = CheckReport(model=source.name, device=_device_name(device), layer=layer,
                         sequences=len(items), tokens=sum(i.n_tokens for i in items),
                         reference_tokens_per_second=reference[1].tokens_per_second,
                         invalid_skipped=sample.invalid_skipped, min_cosine=config.min_cosine)
    scorer = None
    if classifier is not None:
        stage("classifier features")
        scorer = _Scorer(classifier, fam.name, sample, device, budget, config)
        report.classifier, report.classifier_mode = str(config.classifier), scorer.mode
        ref_labels = scorer.labels(reference[1].vectors[outputs[0]])
        report.reference_labels = {"virus": int(ref_labels.sum()),
                                   "others": int((~ref_labels).sum())}
    for precision in precisions:
        stage(f"{precision} on {device}")
        kernels, embedded = _embed(runner(precision), items, budget)
        result = _result(precision, kernels, embedded, reference[1], sample.ids, outputs[0])
        if scorer is not None:
            labels = scorer.labels(embedded.vectors[outputs[0]])
            result.label_agreement = float((labels == ref_labels).mean())
            result.labels_changed = int((labels != ref_labels).sum())
        report.results.append(result)
    return report


def default_precisions(device, family_name: str) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("bf16",)
    from gpuengine.models.fp8 import fp8_unsupported_reason

    fp8 = family_name == "esm2" and fp8_unsupported_reason(device) is None
    return ("fp16", "bf16", "fp8") if fp8 else ("fp16", "bf16")


def _check_precisions(precisions, family_name: str, device) -> None:
    if "fp8" not in precisions:
        return
    from gpuengine.models.fp8 import require_fp8_device

    if family_name != "esm2":
        raise UsageError(f"fp8 is implemented for ESM-2 only (this model is {family_name})")
    require_fp8_device(device, allow_cpu=True)
    if device.type == "cpu":
        log.warning("fp8 on the CPU runs the eager reference path (e4m3 GEMMs through torch "
                    "on the CPU): its numbers match a GPU's to rounding, its speed does not")


def _resolve_layer(layer: int, num_layers: int) -> int:
    index = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= index <= num_layers:
        raise UsageError(f"--layer {layer}: the model has layers 0..{num_layers}")
    return index


def _items(sequences: list[str], tokenizer, max_residues: int | None):
    from gpuengine.packing import WorkItem
    from gpuengine.store.codec import sequence_digest

    items = []
    for seq in sequences:
        seq = seq[:max_residues] if max_residues else seq
        items.append(WorkItem(sequence_digest(seq), tokenizer.encode(seq), len(seq)))
    return items


def _runner(fam, weights, device, precision: str, outputs, config: CheckConfig):
    """The runner a run of ``precision`` would use (:func:`gpuengine.replicas.make_runner`):
    the engine's kernels on a GPU (fp32: the exact eager layers, the reference)."""
    from gpuengine.models.fp8 import DEFAULT_FP8, Fp8Config
    from gpuengine.replicas import make_runner

    fp8 = Fp8Config.parse(config.fp8_gemms) if config.fp8_gemms else DEFAULT_FP8
    return make_runner(fam, weights, device, precision, outputs,
                       compile=device.type == "cuda" and precision != "fp32", fp8=fp8,
                       fp8_on_cpu=True)


def _embed(runner, items, budget: int) -> tuple[str, Embedded]:
    from gpuengine.fidelity import _release_device_memory

    embedded = embed_items(runner, items, budget)
    kernels = runner.kernels
    del runner
    _release_device_memory()
    return kernels, embedded


def _result(precision, kernels, test: Embedded, reference: Embedded, ids,
            output) -> PrecisionResult:
    cos, _ = compare(test, reference)
    a = np.stack(test.vectors[output]).astype(np.float64)
    b = np.stack(reference.vectors[output]).astype(np.float64)
    return PrecisionResult(precision=precision, kernels=kernels, min_cosine=float(cos.min()),
                           mean_cosine=float(cos.mean()),
                           max_abs_error=float(np.nan_to_num(np.abs(a - b), nan=np.inf).max()),
                           tokens_per_second=test.tokens_per_second,
                           worst_record=ids[int(cos.argmin())])


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# -- sampling ------------------------------------------------------------------------------------

def _sample(config: CheckConfig, fam, classifier) -> _Sample:
    from gpuengine.fasta import stream_valid, validate

    virnucpro = classifier is not None and classifier.mode == "virnucpro"
    if virnucpro:
        from gpuengine.dna_tokenizer import DNA_ALPHABET

        alphabet = DNA_ALPHABET
    else:
        alphabet = fam.alphabet
    paths = list(config.inputs)
    report = validate(paths, alphabet=alphabet, skip_invalid=True)
    skipped = len(report.skip) - report.duplicate_records
    if skipped:
        log.warning("%d invalid records skipped (the sample is drawn from the valid ones)", skipped)
    if report.valid == 0:
        raise UsageError(f"no valid sequence in {', '.join(map(str, paths))} to check")
    if not virnucpro:
        records = sample_evenly(stream_valid(paths, report, alphabet=alphabet), report.valid,
                                config.sample)
        return _Sample([r.id for r in records], [r.sequence for r in records],
                       invalid_skipped=skipped)
    return _frames_sample(config, fam, paths, report, skipped, classifier.length)


def _frames_sample(config: CheckConfig, fam, paths, report, skipped: int, length: int) -> _Sample:
    """VirNucPro: an even sample of reads, their kept frames as ``predict`` makes them, then an
    even sample of those frames; the checked model's side and the partner's side of each."""
    from gpuengine.fasta import stream_valid
    from gpuengine.workflows.virnucpro.frames import frames_for_batch

    reads = sample_evenly(stream_valid(paths, report, alphabet=None), report.valid, config.sample)
    frames = frames_for_batch([r.id for r in reads], [r.sequence for r in reads], length)
    if len(frames) == 0:
        raise UsageError(f"none of the sampled reads gives a {length}-bp chunk with a "
                         "kept frame (are these reads, and is --length right?)")
    picked = sorted(set(np.linspace(0, len(frames) - 1, min(config.sample, len(frames)))
                        .round().astype(int).tolist()))
    mine, theirs = ((frames.proteins, frames.nucleotides) if fam.name == "esm2"
                    else (frames.nucleotides, frames.proteins))
    return _Sample([frames.frame_ids[i] for i in picked], [mine[i] for i in picked],
                   [theirs[i] for i in picked], invalid_skipped=skipped)


# -- classifiers ---------------------------------------------------------------------------------

@dataclass
class _Classifier:
    model: object
    """A loaded :class:`~gpuengine.workflows.virnucpro.classifier.LoadedClassifier`."""
    mode: str
    """``direct`` (input = the model's width) or ``virnucpro`` (DNABERT-S + ESM-2 widths)."""
    partner: str | None = None
    partner_width: int | None = None
    length: int | None = None


def _load_classifier(config: CheckConfig, fam, dim: int, model_name: str) -> _Classifier:
    """The classifier and how its features are made from the checked model's ``dim`` values."""
    from gpuengine.workflows.virnucpro.classifier import (expected_length_hint, load_classifier,
                                                          read_classifier_state)

    state, _, _ = read_classifier_state(config.classifier)
    weight = state.get("hidden_layer.weight")
    if weight is None or weight.dim() != 2:
        raise GpuEngineError(f"classifier {config.classifier} has no hidden_layer.weight matrix")
    width = int(weight.shape[1])
    model = load_classifier(config.classifier, feature_size=width)
    if width == dim:
        return _Classifier(model, "direct")
    partner = config.partner_model or PARTNERS.get(fam.name)
    if width <= dim or partner is None:
        raise UsageError(f"classifier {config.classifier} takes {width} values; {model_name} "
                         f"gives {dim} (a VirNucPro classifier takes DNABERT-S + ESM-2 widths)")
    length = config.length or expected_length_hint(config.classifier)
    if length is None:
        raise UsageError("a VirNucPro classifier scores chunks of reads: give --length 300 or "
                         "500 (its file name does not say which)")
    return _Classifier(model, "virnucpro", partner, width - dim, length)


class _Scorer:
    """Labels from the checked model's vectors: directly, or joined with the partner model's
    fp32 vectors of the same frames (VirNucPro: DNABERT-S first, then ESM-2)."""

    def __init__(self, classifier: _Classifier, family_name: str, sample: _Sample, device,
                 budget: int, config: CheckConfig):
        self.model, self.mode = classifier.model, classifier.mode
        self.family_name = family_name
        self.partner = None
        if self.mode == "virnucpro":
            self.partner = _partner_vectors(classifier.partner, classifier.partner_width,
                                            sample.partner_sequences, device, budget, config)

    def labels(self, vectors: list[np.ndarray]) -> np.ndarray:
        mine = np.stack(vectors).astype(np.float32)
        if self.partner is None:
            features = mine
        elif self.family_name == "esm2":
            features = np.concatenate([self.partner, mine], axis=1)
        else:
            features = np.concatenate([mine, self.partner], axis=1)
        return self.model.score(features).virus


def _partner_vectors(name: str, width: int, sequences: list[str], device, budget: int,
                     config: CheckConfig) -> np.ndarray:
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve
    from gpuengine.store.schema import OutputSpec

    source = resolve(name, allow_download=config.allow_download and not config.env.offline)
    fam = family(source.family)
    weights = fam.read(source)
    if weights.embed_dim != width:
        raise UsageError(f"the classifier needs {width} values from the other model; {name} "
                         f"gives {weights.embed_dim} (choose it with --partner-model)")
    items = _items(sequences, fam.tokenizer(source), fam.default_max_residues)
    runner = _runner(fam, weights, device, "fp32", [OutputSpec(weights.num_layers, "mean")],
                     config)
    _, embedded = _embed(runner, items, budget)
    return np.stack(next(iter(embedded.vectors.values()))).astype(np.float32)


# -- output --------------------------------------------------------------------------------------

def format_report(report: CheckReport) -> str:
    """The plain-text table ``gpuengine check`` prints on stdout."""
    lines = [f"model {report.model}, layer {report.layer}, mean pooling; {report.sequences} "
             f"sequences ({report.tokens:,} tokens) on {report.device}",
             f"reference fp32: {report.reference_tokens_per_second:,.0f} tokens/s"]
    if report.classifier:
        lines.append(f"classifier {report.classifier} ({report.classifier_mode}); fp32 labels: "
                     f"{report.reference_labels['virus']} virus, "
                     f"{report.reference_labels['others']} others")
    header = f"{'precision':<10} {'kernels':<14} {'min cos':>9} {'mean cos':>9} " \
             f"{'max |err|':>10} {'tokens/s':>11}"
    if report.classifier:
        header += f" {'labels same':>12}"
    lines.append(header)
    for r in report.results:
        line = (f"{r.precision:<10} {r.kernels:<14} {r.min_cosine:>9.6f} {r.mean_cosine:>9.6f} "
                f"{r.max_abs_error:>10.3g} {r.tokens_per_second:>11,.0f}")
        if r.label_agreement is not None:
            line += f" {100 * r.label_agreement:>11.2f}%"
        lines.append(line)
    worst = min(report.results, key=lambda r: r.min_cosine, default=None)
    if worst is not None:
        lines.append(f"lowest cosine: {worst.precision} on record {worst.worst_record!r}")
    if report.min_cosine is not None:
        verdict = (f"FAILED: {', '.join(report.failed)} below --min-cosine {report.min_cosine}"
                   if report.failed else f"all precisions at or above --min-cosine "
                                         f"{report.min_cosine}")
        lines.append(verdict)
    return "\n".join(lines)
