"""What ``status.json`` and ``gpuengine status`` say while the daemon embeds: records counted
as the progress bar counts them (stored before, committed now or failed, of every valid
record), a group of files shown as a group, and the median file latency."""

from __future__ import annotations

from gpuengine.daemon.status import StatusBoard, _FileProgress, format_status, status_line
from gpuengine.progress import ProgressSnapshot


def _board(tmp_path) -> StatusBoard:
    board = StatusBoard(tmp_path, 5.0, notify=lambda message: None)
    board.update(state="ready", processing={"file": "a.fa", "attempt": 2, "since": "now",
                                            "done_records": 0, "committed_records": 0,
                                            "total_records": None, "stage": "starting"})
    return board


def test_a_resumed_file_counts_its_stored_records_as_done_like_the_bar(tmp_path):
    board = _board(tmp_path)
    progress = _FileProgress(board)
    progress.start(100, 5000)
    progress.update(ProgressSnapshot(committed_records=10, total_records=100, tokens_done=0,
                                     elapsed=1.0, stored_records=60, failed_records=1))
    current = board.data["processing"]
    assert (current["done_records"], current["committed_records"], current["stored_records"],
            current["failed_records"], current["total_records"]) == (71, 10, 60, 1, 100)
    assert "embedding a.fa (71/100 records)" in status_line(board.data)
    assert "a.fa: 71 of 100 records done (attempt 2, embedding)" in format_status(
        board.data, "ready")


def test_an_older_status_file_without_done_records_still_reads(tmp_path):
    data = {"state": "ready", "processing": {"file": "a.fa", "committed_records": 5,
                                            "total_records": 9}}
    assert "(5/9 records)" in status_line(data)


def test_a_group_and_the_file_latency(tmp_path):
    board = _board(tmp_path)
    board.update_processing(file="b.fa", group={"files": 200, "done": 37, "pending": 163})
    for seconds in (1.0, 2.0, 3.0, 10.0):
        board.file_latency(seconds)
    assert board.data["file_latency_seconds"] == {"median": 2.5, "p90": 10.0, "files": 4}
    text = format_status(board.data, "ready")
    assert "b.fa and 162 more files (37 of 200 done)" in text
    assert "latency    median 2.5 s, 90th percentile 10.0 s" in text
