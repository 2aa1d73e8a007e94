"""``gpuengine serve``: embed every FASTA file dropped into a watched directory, models loaded once.

Layout of the watched directory ``DIR`` (created at start; the four folders must be on one
filesystem, since files move between them by rename)::

    inbox/          producers put files here (contract in docs/daemon.md)
    processing/     claimed files: the one being embedded, and any waiting for a retry
    done/           finished files, each with NAME.job.json
    failed/         files that cannot be embedded, each with NAME.error.json
    status.json     the daemon's state, replaced atomically every --status-interval seconds
    attempts.json   attempts per file in processing/ (a poison file cannot loop across restarts)

The main thread runs everything except the status heartbeat (one thread) and the engine's own
threads:

1. Take the directory lock (one daemon per directory), create the folders, start the status
   thread (state ``loading``).
2. Warm up (:meth:`Job.load <gpuengine.daemon.jobs.Job.load>`): embed one tiny built-in record
   (``--job predict``: predict one built-in read) into a throw-away store with the real options.
   This resolves the model, reads the weights and builds (and on GPUs calibrates) one replica
   per device into a :class:`~gpuengine.replicas.ReplicaPool` that every later run reuses.
   Model or option errors end the daemon here (exit 1 or 2), before any file is claimed. Check
   that the store's table (if any) matches, send ``READY=1`` and enter state ``ready``.
3. Recover: finish every file left in ``processing/`` (a rerun is cheap: the engine skips the
   ids already in the store).
4. Loop: poll ``inbox/`` (:class:`InboxWatcher`), claim the oldest complete file with
   ``os.replace(inbox/x, processing/x)`` and process it; retries whose delay is over go first.

Processing one file (:meth:`Daemon.process`):

* sha256 of the file; its job key is a hash of that and the table's meaning (model checksum,
  outputs, dtype, truncation) plus ``--skip-invalid`` and ``--precision``. A job already
  finished in the store (a duplicate file, or a restart after the job record was written) goes
  straight to ``done/`` without running.
* Count the attempt in ``attempts.json`` *before* running; once ``--max-attempts`` started
  attempts never finished (the daemon died during each), the file fails without a run.
* The job runs on ``processing/x`` with the shared stop event and replica pool: ``--job embed``
  (:class:`~gpuengine.daemon.embed_job.EmbedJob`) is ``run_embed``, ``--job predict``
  (:class:`~gpuengine.daemon.predict_job.PredictJob`) is ``run_predict``.
* Commit order: embeddings (by the engine, in its own transactions), then the job record (run
  record ``job-<key>`` in the store's ``runs`` database; ``--job embed`` commits it with the
  file's last embeddings), then ``done/x.job.json``, then the move to ``done/``. A crash anywhere leaves the file in ``processing/``; the restart finds the
  job record, or reruns and finds every sequence stored. Nothing is lost or stored twice.
* ``InputError`` (bad record, not FASTA, truncated gzip): ``failed/`` with ``x.error.json`` at
  once. ``DeviceError``/``ModelLoadError``: the process itself is suspect; the file stays in
  ``processing/`` (attempt counted) and the daemon exits 1 so that systemd restarts it. Any
  other error: retried after ``--retry-delay`` (doubling), then ``failed/``.
* A stop request (SIGTERM/SIGINT) drains the run; the file stays in ``processing/`` and its
  attempt is not counted.

Modules: :mod:`~gpuengine.daemon.service` (the :class:`Daemon`: start-up, loop, claims, the
rules above), :mod:`~gpuengine.daemon.jobs` (the :class:`~gpuengine.daemon.jobs.Job` interface)
with :mod:`~gpuengine.daemon.embed_job` and :mod:`~gpuengine.daemon.predict_job`,
:mod:`~gpuengine.daemon.inbox` and :mod:`~gpuengine.daemon.events` (which files are ready, and
waking up for them), :mod:`~gpuengine.daemon.books` (attempts and job records),
:mod:`~gpuengine.daemon.status` (``status.json``, ``gpuengine status``),
:mod:`~gpuengine.daemon.files` and :mod:`~gpuengine.daemon.constants`.

This package imports torch only inside functions, so ``gpuengine status`` stays fast.
"""

from gpuengine.daemon.books import AttemptBook, JobBook
from gpuengine.daemon.files import (atomic_write_json, error_record, file_sha256, free_name,
                                    gzip_complete, is_ignored, looks_complete)
from gpuengine.daemon.inbox import InboxWatcher
from gpuengine.daemon.jobs import Job
from gpuengine.daemon.service import Daemon, DaemonExit, ServeConfig, serve
from gpuengine.daemon.status import StatusBoard, check_status, read_status, status_command

__all__ = ["AttemptBook", "Daemon", "DaemonExit", "InboxWatcher", "Job", "JobBook",
           "ServeConfig", "StatusBoard", "atomic_write_json", "check_status", "error_record",
           "file_sha256", "free_name", "gzip_complete", "is_ignored", "looks_complete",
           "read_status", "serve", "status_command"]
