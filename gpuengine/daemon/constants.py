"""File names and limits of the watch-directory daemon."""

FOLDERS = ("inbox", "processing", "done", "failed")
STATUS_FILE = "status.json"
ATTEMPTS_FILE = "attempts.json"
LOCK_FILE = ".gpuengine-serve.lock"
WARMUP_PREFIX = ".warmup-"
MARKER_SUFFIX = ".done"
IGNORED_SUFFIXES = (".part", ".tmp", ".fai", ".fxi")
JOB_SUFFIX = ".job.json"
ERROR_SUFFIX = ".error.json"
JOB_PREFIX = "job-"
STALE_FACTOR = 3
"""``gpuengine status`` calls a heartbeat older than this many status intervals stale."""
WARMUP_RECORD = ">gpuengine-warmup\nACGTACGTACGTACGT\n"
"""Valid for every model family (protein and DNA alphabets both hold A, C, G, T)."""
TICK_NS = 50_000_000
"""Slack for coarse file timestamps (the kernel stamps files from a clock a tick behind)."""
MAX_LISTED_FAILURES = 1000
