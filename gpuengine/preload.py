"""Reading a model ahead: its host-side weights, checksum and built model, while something
else runs.

A :class:`ModelPreload` is one thread that does, for the model of an :class:`EmbedConfig`,
what :func:`~gpuengine.engine.run_embed` does first on the host before any device work: resolve
the model (never downloading: a model that is not local is left to the run), read its weights
into a :class:`~gpuengine.replicas.ReplicaPool`, compute its sha256 into the checksum cache,
and build ``builds`` host models in the run's dtype for the pool to hand to
:func:`~gpuengine.replicas.build_replicas` (and the fp8 guard's reference). The run then finds
them ready. Used by ``gpuengine predict``, which reads the 3B ESM-2 checkpoint while the
DNABERT-S stage runs.

It changes no result and no error: whatever fails here is only logged (at debug level) and
done again by the run, which then fails as it always did. Nothing is built when the pool held
the weights already (a warm daemon has its replicas). The caller joins the thread
(:meth:`ModelPreload.wait`) before the run that uses it, and on every path; models built but
never taken are dropped with :meth:`ReplicaPool.drop_built`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from gpuengine.config import EmbedConfig
from gpuengine.replicas import ModelChoice, ReplicaPool, run_precision
from gpuengine.runner import DTYPES

log = logging.getLogger(__name__)


class ModelPreload(threading.Thread):
    """Reads ``config``'s model into ``pool`` ahead of the run (see the module docstring)."""

    def __init__(self, config: EmbedConfig, pool: ReplicaPool, *, builds: int = 1):
        super().__init__(name=f"gpuengine-preload-{config.table or 'model'}", daemon=True)
        self.config, self.pool, self.builds = config, pool, builds
        self.seconds = 0.0
        """How long the preload took (it ran alongside other work)."""
        self.error: BaseException | None = None
        self.built = 0

    def run(self) -> None:
        started = time.perf_counter()
        try:
            config = dataclasses.replace(self.config, allow_download=False)
            model = ModelChoice.resolve(config)
            fresh = not self.pool.has_weights(model.weights_key())
            weights = model.read_weights(self.pool)
            model.checksum(config.env.cache_dir)
            if fresh:
                dtype = DTYPES[run_precision(config, model.fam)[0]]
                for _ in range(self.builds):
                    self.pool.put_built(weights, dtype, model.fam.build(weights, dtype))
                    self.built += 1
        except Exception as exc:  # noqa: BLE001 - the run does it again and reports it
            self.error = exc
            log.debug("preloading %s failed (the run reads it itself): %s", self.config.model,
                      exc)
        finally:
            self.seconds = time.perf_counter() - started

    def wait(self) -> float:
        """Join the thread; the seconds the caller waited for it."""
        started = time.perf_counter()
        if self.ident is not None:
            self.join()
        return time.perf_counter() - started
