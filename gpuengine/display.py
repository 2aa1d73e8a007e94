"""Terminal output of the front ends: logging set-up (the CLI's and the daemon's), a rich
progress display on stderr and the closing summary.

Data (lookups, exports, ``--json`` summaries) goes to stdout; everything here goes to stderr.
"""

from __future__ import annotations

import logging
import sys
from collections import deque

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, Task, TaskID,
                           TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from gpuengine.progress import ProgressSink, ProgressSnapshot

stderr = Console(stderr=True)


def setup_logging(verbose: int = 0, quiet: bool = False, *, plain: bool = False) -> None:
    """Logging on stderr for every command: warnings only with ``quiet``, debug from ``-vv``,
    info otherwise.

    ``plain`` (the daemon): one ``time LEVEL message`` line per record, no colour, no wrapping
    (journald adds its own metadata). Otherwise rich's handler on the shared stderr console,
    tracebacks drawn by rich from ``-v``."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    if plain:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.basicConfig(level=level, handlers=[handler], force=True)
        return
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", force=True,
                        handlers=[RichHandler(console=stderr, show_path=False,
                                              rich_tracebacks=verbose > 0)])


def announce_stop(signal_name: str) -> None:
    """What ``embed`` and ``predict`` say on the first SIGINT/SIGTERM
    (:class:`~gpuengine.signals.StopOnSignals`)."""
    stderr.print("[yellow]stopping[/yellow]: finishing batches in flight and committing "
                 "(press Ctrl-C again to quit at once)")


class _Count(MofNCompleteColumn):
    """done/total, or nothing for a row without a total (a device's row)."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.total is not None else Text("")


class RichProgress(ProgressSink):
    """Records done of the input's total, percentage, tokens/s overall and per device, ETA.

    The bar's total is every valid record of the input; records already in the table count as
    done as soon as the planner finds them (at the start of a resumed run, it is usually far
    ahead of the devices), so a resumed run starts where the earlier one stopped and every run
    that completes ends at total/total, 100 %, with no ETA. (A total of only what remains would
    change as the planner finds stored records, and would not match the input's count.) The
    ETA comes from this run's own commits over the last ``eta_window`` seconds, never from
    the stored records' jump."""

    def __init__(self, enabled: bool = True, log_every: float = 30.0,
                 console: Console | None = None, eta_window: float = 30.0):
        self.enabled = enabled
        self.console = console or stderr
        self.live = enabled and self.console.is_terminal
        """A live bar on a terminal; otherwise a log line every ``log_every`` seconds."""
        self._log_every = log_every
        self._last_log = 0.0
        self._eta_window = eta_window
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0
        self._progress: Progress | None = None
        self._main: TaskID | None = None
        self._devices: dict[str, TaskID] = {}

    def stage(self, message: str) -> None:
        logging.getLogger("gpuengine").info(message)

    def start(self, total_records: int, total_residues: int) -> None:
        self._total = total_records
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), _Count(),
            TaskProgressColumn(text_format="{task.percentage:>3.0f}%", show_speed=False),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
            console=self.console, transient=False, refresh_per_second=4)
        self._progress.start()
        self._main = self._progress.add_task("records", total=total_records, rate="", eta="")

    def eta(self, snapshot: ProgressSnapshot) -> str:
        """``ETA h:mm:ss`` from this run's recent rate; empty once nothing is left."""
        done_here = snapshot.committed_records + snapshot.failed_records
        self._samples.append((snapshot.elapsed, done_here))
        while len(self._samples) > 2 and snapshot.elapsed - self._samples[1][0] >= self._eta_window:
            self._samples.popleft()
        remaining = snapshot.total_records - snapshot.done_records
        if remaining <= 0:
            return ""
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or d1 <= d0:
            return "ETA -:--:--"
        seconds = int(remaining * (t1 - t0) / (d1 - d0))
        return f"ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def update(self, snapshot: ProgressSnapshot) -> None:
        rate = snapshot.tokens_done / snapshot.elapsed if snapshot.elapsed else 0.0
        eta = self.eta(snapshot)
        if not self._progress:
            if self.enabled and snapshot.elapsed - self._last_log >= self._log_every:
                self._last_log = snapshot.elapsed
                logging.getLogger("gpuengine").info(
                    "%d/%d records done (%d already stored), %.0f tok/s%s%s",
                    snapshot.done_records, snapshot.total_records, snapshot.stored_records,
                    rate, _shares(snapshot), f", {eta}" if eta else "")
            return
        description = "records" + (f" ({snapshot.stored_records:,} already stored)"
                                   if snapshot.stored_records else "")
        self._progress.update(self._main, completed=snapshot.done_records, rate=f"{rate:,.0f} tok/s",
                              eta=eta, description=description)
        if len(snapshot.devices) > 1 or any(d.name != "cpu" for d in snapshot.devices):
            total = sum(d.tokens_per_second for d in snapshot.devices)
            for dev in snapshot.devices:
                if dev.name not in self._devices:
                    self._devices[dev.name] = self._progress.add_task(
                        f"  {dev.name}", total=None, rate="", eta="")
                share = (f"  share {dev.tokens_per_second / total:.0%}"
                         if len(snapshot.devices) > 1 and total else "")
                self._progress.update(self._devices[dev.name], rate=(
                    f"{dev.tokens_per_second:,.0f} tok/s  budget {dev.budget_tokens:,}  "
                    f"busy {dev.busy_fraction:.0%}{share}"))

    def close(self) -> None:
        """The last frame stays on screen, without an ETA (the run is over, complete or not)."""
        if self._progress:
            self._progress.update(self._main, eta="")
            self._progress.stop()
            self._progress = None


def _shares(snapshot: ProgressSnapshot) -> str:
    """`` (cuda:0#0 12,345 tok/s, cuda:0#1 ...)`` when several devices or replicas run."""
    if len(snapshot.devices) < 2:
        return ""
    return " (" + ", ".join(f"{d.name} {d.tokens_per_second:,.0f} tok/s"
                            for d in snapshot.devices) + ")"


SUMMARY_RATES = ("tokens/s is tokens ÷ embedding time, for the run and for each device (the "
                 "devices' rates add up to the run's); busy is the share of that time the device "
                 "spent computing (GPU: CUDA events; CPU: the forward's wall time); share is "
                 "its part of the tokens; budget its tokens per batch at the end (cuda:0#1: "
                 "the second replica on GPU 0).")


def print_summary(summary, console: Console | None = None) -> None:
    """The closing summary table (stderr)."""
    table = Table(title="gpuengine embed: summary", show_header=False, title_justify="left",
                  caption=SUMMARY_RATES, caption_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("store", f"{summary.store} (table {summary.table})"),
        ("model", summary.model + ("  [RANDOM WEIGHTS]" if summary.synthetic_weights else "")),
        ("records read", summary.records_read),
        ("valid distinct records", summary.valid_records),
        ("repeated records (same id and sequence)", summary.duplicate_records),
        ("invalid, skipped", summary.invalid_skipped),
        ("already in the store", summary.already_stored),
        ("deduplicated (sequence computed once)", summary.deduplicated),
        ("sequences embedded", summary.embedded),
        ("record ids committed", summary.committed_records),
        ("truncated", summary.truncated),
        ("failed", len(summary.failed)),
        ("tokens", summary.tokens),
        ("wall time", f"{summary.wall_seconds:.1f} s ({summary.validate_seconds:.1f} s validating, "
                      f"{summary.embed_seconds:.1f} s embedding)"),
        ("tokens/s (tokens ÷ embedding time)", f"{summary.tokens_per_second:,.0f}"),
        ("store writes (time; waited after the last batch)",
         f"{summary.commit_transactions} transactions, {summary.commit_seconds:.1f} s; "
         f"{summary.commit_wait_seconds:.1f} s"),
    ]
    if summary.shard:
        rows.insert(4, ("shard", f"{summary.shard}: {summary.shard_records:,} of "
                                 f"{summary.valid_records:,} records"))
    for name, value in rows:  # Text, not markup: paths and model names are user data
        table.add_row(name, Text(f"{value:,}" if isinstance(value, int) else str(value)))
    fidelity = getattr(summary, "fidelity", None)
    if fidelity:
        table.add_row(f"{fidelity['precision']} fidelity (vs {fidelity['reference']}, "
                      f"{fidelity['sequences']} sampled)",
                      Text(f"min cosine {fidelity['min_cosine']:.5f}, mean "
                           f"{fidelity['mean_cosine']:.5f}"))
    several = len(summary.devices) > 1
    for dev in summary.devices:
        share = f", share {dev['share']:.0%}" if several and "share" in dev else ""
        budget = f", budget {dev['budget_tokens']:,}" if "budget_tokens" in dev else ""
        table.add_row(f"  {dev['device']}", Text(
            f"{dev['sequences']:,} seq, {dev['tokens']:,} tok, "
            f"{dev['tokens_per_second']:,.0f} tok/s, busy {dev['busy_fraction']:.0%}"
            f"{share}{budget}"))
    console = console or stderr
    console.print(table)
    for record_id, reason in summary.failed[:20]:
        console.print(Text.assemble(("failed", "red"), f" {record_id}: {reason}"), highlight=False)
    if len(summary.failed) > 20:
        console.print(f"... and {len(summary.failed) - 20} more failed sequences")
    if summary.interrupted:
        console.print("[yellow]interrupted[/yellow]: everything committed so far is safe; "
                     "run the same command again to finish")
    hint = store_bound_hint(summary)
    if hint:
        console.print(Text.assemble(("note", "yellow"), f": {hint}"), highlight=False)


def store_bound_hint(summary) -> str | None:
    """What to try when the store's writers, not the devices, set a run's pace (None when
    they did not: :attr:`~gpuengine.run_summary.RunSummary.store_bound`)."""
    bound = summary.store_bound
    if bound is None:
        return None
    committing, busy = bound
    who = "the store's writer" if summary.writers == 1 else f"each of the {summary.writers} store writers"
    text = (f"{who} committed {committing:.0%} of the embedding time while the devices were busy "
            f"{busy:.0%}: the store, not the devices, set this run's pace.")
    if summary.shard:
        return text + " A --shard run writes one store; a faster disk for it is what helps."
    if summary.writers == 1:
        return text + (" A new store written with --writers 2 (a directory of part stores; "
                       "see --help) commits in parallel; a faster disk helps too.")
    return text + (f" A new store written with more writers (--writers "
                   f"{min(2 * summary.writers, 16)}) or a faster disk may help.")


class MergeBar:
    """``gpuengine merge``'s progress (a :class:`~gpuengine.store.merge.MergeProgress`): one
    bar per stage with vectors/s and MB/s; a log line every ``log_every`` seconds when
    stderr is not a terminal."""

    def __init__(self, enabled: bool = True, log_every: float = 30.0):
        self.enabled = enabled
        self.live = enabled and stderr.is_terminal
        self._log_every = log_every
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def stage(self, message: str) -> None:
        if self.enabled:
            logging.getLogger("gpuengine").info(message)

    def start(self, what: str, total: int) -> None:
        import time

        self._what, self._total, self._done, self._bytes = what, total, 0, 0
        self._started = self._last_log = time.perf_counter()
        if not self.live:
            self.stage(f"{what}: {total:,}")
            return
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=stderr, transient=False, refresh_per_second=4)
            self._progress.start()
        self._task = self._progress.add_task(what, total=total, rate="")

    def advance(self, done: int, nbytes: int = 0) -> None:
        import time

        self._done += done
        self._bytes += nbytes
        now = time.perf_counter()
        elapsed = max(now - self._started, 1e-9)
        rate = f"{self._done / elapsed:,.0f}/s" + (f"  {self._bytes / elapsed / 1e6:,.0f} MB/s"
                                                  if self._bytes else "")
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self._done, rate=rate)
        elif self.enabled and now - self._last_log >= self._log_every:
            self._last_log = now
            logging.getLogger("gpuengine").info("%s: %d/%d, %s", self._what, self._done,
                                                self._total, rate)

    def close(self) -> None:
        if self._progress:
            self._progress.stop()
            self._progress = None


def print_merge_summary(summary) -> None:
    """The closing summary of ``gpuengine merge`` (stderr)."""
    how = ("already complete: nothing to do" if summary.already_complete
           else "continued an interrupted merge" if summary.resumed
           else "started over (an input changed since the interrupted merge)"
           if summary.restarted else "new merge")
    table = Table(title="gpuengine merge: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [("output", f"{summary.out} ({how})"), ("inputs", f"{len(summary.stores)} stores"),
            ("merge record", summary.run_id)]
    for name, c in summary.tables.items():
        rows.append((f"table {name}",
                     f"{c.get('emb_added', 0):,} vectors and {c.get('ids_added', 0):,} ids "
                     f"written; {c.get('emb_duplicates', 0):,} vectors and "
                     f"{c.get('ids_duplicates', 0):,} ids already there (kept once)"))
        if c.get("emb_differing"):
            rows.append(("  same sequence, other bytes",
                         f"{c['emb_differing']:,} (the first copy kept; "
                         f"{c.get('emb_differing_existing', 0):,} of them OUT's own)"))
    rows += [("run records carried", summary.runs_carried),
             ("read this time", f"{summary.vectors_read:,} vectors, "
                                f"{summary.bytes_read / 1e6:,.1f} MB, {summary.ids_read:,} ids "
                                f"in {summary.transactions:,} transactions"),
             ("wall time", f"{summary.seconds:.1f} s ({summary.merge_seconds:.1f} s merging)"
                           + (f", verify {summary.verify_seconds:.1f} s"
                              if summary.verify is not None else "")),
             ("vectors/s (merging)", f"{summary.vectors_per_second:,.0f} "
                                     f"({summary.megabytes_per_second:,.0f} MB/s)")]
    verify = summary.verify
    if verify is not None:
        rows.append(("verify", f"{verify.vectors:,} vectors and {verify.ids:,} ids compared: "
                               + ("identical" if verify.ok else
                                  f"{verify.differences:,} differences")))
    for name, value in rows:
        table.add_row(name, Text(f"{value:,}" if isinstance(value, int) else str(value)))
    stderr.print(table)
    for example in (verify.examples if verify is not None else []):
        stderr.print(Text.assemble(("difference", "red"), f" {example}"), highlight=False)
    if summary.interrupted:
        stderr.print("[yellow]interrupted[/yellow]: everything committed so far is safe; "
                     "run the same command again to finish")


def print_predict_summary(summary) -> None:
    """``predict``'s one-line summary on stderr: counts, stage times, where the outputs are,
    and the fidelity guard's measurement when the ESM-2 stage ran in fp8."""
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items())
    reads = (f"shard {summary.shard}: {summary.reads:,} of {summary.valid_reads:,} reads"
             if getattr(summary, "shard", "") else f"{summary.reads:,} reads")
    text = (f"predict: {reads}, {summary.chunks:,} chunks, {summary.frames:,} frames, "
            f"{summary.virus_chunks:,} chunks called virus; {stages}; outputs in "
            f"{summary.out_dir}")
    fidelity = summary.embed.get("esm", {}).get("fidelity")
    if fidelity:
        text += (f"; ESM-2 {fidelity['precision']} against {fidelity['reference']} on "
                 f"{fidelity['sequences']} frames: min cosine {fidelity['min_cosine']:.5f}")
    stderr.print(Text(text), highlight=False)


def format_info(data: dict, indent: str = "") -> str:
    """YAML-like text: nested dicts indented, a list of dicts as one "- " item per dict."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            if value:
                lines.append(format_info(value, indent + "  "))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            for item in value:
                body = format_info(item, indent + "    ").splitlines() or [indent + "    {}"]
                body[0] = indent + "  - " + body[0][len(indent) + 4:]
                lines.extend(body)
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


class StageLog:
    """Progress of a command made of a few stages (``gpuengine check``): one line per stage on
    stderr, prefixed with the command's name."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def stage(self, text: str) -> None:
        stderr.print(f"{self.prefix}: {text}", markup=False, highlight=False)
