"""What a run did: :class:`RunSummary`, filled by the engine (:mod:`gpuengine.engine`) as the
run goes, printed by the CLI, returned to library callers and handed to the callers that add
records to a run's last transaction (the daemon's job record).

It owns the counts, times and devices of one run (or one part of a run), its exit code and
its JSON form; it computes nothing from the run's threads (the engine fills it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from gpuengine.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL


STORE_BOUND_COMMITTING = 0.80
"""A writer committing this share of the embedding time or more is the run's pace-setter (the
2 M- and 6 M-read host benchmarks of ``83e4470``–``a1720fd`` with 8 no-op devices, limited by
their two writers, committed 84–93 % of it each: docs/benchmarks/results.jsonl,
``commit_seconds`` ÷ ``embed_s`` ÷ ``writers``)."""
STORE_BOUND_DEVICES = 0.85
"""…when the devices were busy less than this share (the GPU benchmark rows of the engine:
0.85–1.0, nearly all ≥ 0.97)."""
STORE_BOUND_SECONDS = 10.0


@dataclass
class RunSummary:
    """What a run did; printed by the CLI, returned to library callers."""

    store: str
    table: str
    model: str
    synthetic_weights: bool
    records_read: int = 0
    valid_records: int = 0
    invalid_skipped: int = 0
    duplicate_records: int = 0
    truncated: int = 0
    already_stored: int = 0
    deduplicated: int = 0
    embedded: int = 0
    committed_records: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    residues: int = 0
    wall_seconds: float = 0.0
    """Whole run: model resolution, reading, validation, loading, warm-up, embedding, commit."""
    embed_seconds: float = 0.0
    """From the first batch claimed to the last commit (the steady-state part)."""
    validate_seconds: float = 0.0
    """The first pass over the input (checks, hashes, repeated ids), before any weights are
    read."""
    devices: list[dict] = field(default_factory=list)
    commit_transactions: int = 0
    commit_seconds: float = 0.0
    """Time the store writer spent encoding, writing and syncing transactions."""
    commit_wait_seconds: float = 0.0
    """Time the run waited for the store writer after handing it the last group (long when
    the store's disk, not the devices, limits the run)."""
    writers: int = 1
    """Store writer processes of the run (``--writers``; the part stores of ``store``)."""
    interrupted: bool = False
    shard: str = ""
    """``I/N`` of a sharded run (``--shard``), else empty."""
    shard_records: int = 0
    """Valid records of the input in this shard (what a sharded run embeds)."""
    run_id: str = ""
    """Key of the run's progress record in the store's ``runs`` database."""
    run_started: dict = field(default_factory=dict)
    """That record as this invocation found it (counts of earlier, interrupted attempts;
    ``resumes``)."""
    fidelity: dict | None = None
    """``--precision fp8``: the fidelity guard's measurement on a sample of this input
    (:class:`gpuengine.fidelity.FidelityReport`), also in the run record."""
    group: dict = field(default_factory=dict)
    """In the summary of one part of a run (:mod:`gpuengine.run_parts`): ``parts`` (how many
    the run has), ``part`` (this one), ``run_embedded`` (sequences the run embedded so far)
    and ``run_records`` (its input records); the counts above are the part's own, the model,
    devices and times the run's so far."""

    @property
    def tokens_per_second(self) -> float:
        """Tokens (BOS/EOS included) per second of embedding time."""
        return self.tokens / self.embed_seconds if self.embed_seconds else 0.0

    @property
    def store_bound(self) -> tuple[float, float] | None:
        """(writers' share of the embedding time spent committing, the devices' mean busy
        fraction) when the store set the run's pace: writers committing at least
        :data:`STORE_BOUND_COMMITTING` of the time each while the devices were busy less than
        :data:`STORE_BOUND_DEVICES` of it, over at least :data:`STORE_BOUND_SECONDS` of
        embedding (shorter runs are mostly start-up). None otherwise."""
        if self.embed_seconds < STORE_BOUND_SECONDS or not self.devices:
            return None
        committing = self.commit_seconds / (self.embed_seconds * max(1, self.writers))
        busy = sum(d.get("busy_fraction", 0.0) for d in self.devices) / len(self.devices)
        if committing >= STORE_BOUND_COMMITTING and busy < STORE_BOUND_DEVICES:
            return committing, busy
        return None

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if self.failed else EXIT_OK

    def to_json(self) -> dict:
        data = asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        bound = self.store_bound
        data["store_bound"] = (None if bound is None else
                               {"writer_committing": bound[0], "devices_busy": bound[1]})
        data["exit_code"] = self.exit_code
        return data
