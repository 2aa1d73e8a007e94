"""A stand-in for the model in engine tests: each item's vector is derived from its digest
(so equal sequences get equal vectors), and every computation is listed, so that a test can
check that each sequence was computed once."""

from __future__ import annotations

import time

import numpy as np


class DigestRunner:
    """Replaces a :class:`~gpuengine.runner.Runner`: a vector derived from the digest, and the
    digests computed appended to ``computed``. ``pace``: seconds each batch takes (a device's
    pace, so that the committer keeps up and transactions do not merge); 0: none."""

    cuda = padded = False
    precision = "fp32"

    def __init__(self, outputs, computed, pace: float = 0.0):
        import torch

        self.device, self.outputs, self.computed = torch.device("cpu"), outputs, computed
        self.pace = pace

    def stage(self, items):
        return items

    def launch(self, items):
        return items

    def finish(self, items):
        from gpuengine.runner import EmbeddedBatch

        if self.pace:
            time.sleep(self.pace)
        self.computed.extend(item.digest for item in items)
        rows = [np.frombuffer(item.digest * 4, np.uint8).astype(np.float32) for item in items]
        return EmbeddedBatch({o: rows for o in self.outputs}, np.ones(len(items), bool),
                             sum(i.n_tokens for i in items), 0.0)

    def release_cached_memory(self):
        pass
