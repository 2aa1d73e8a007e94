"""gpuengine: exact, packed protein and DNA language-model embeddings on every GPU of a machine.

The public Python API is small:

>>> import gpuengine
>>> vectors = gpuengine.embed(["MKTAYIAKQR", "MSKGEELFTG"],   # doctest: +SKIP
...                           model="esm2_t33_650M_UR50D")      # numpy array (2, 1280)
>>> from gpuengine import EmbeddingStore
>>> with EmbeddingStore("proteins.lmdb") as store:      # doctest: +SKIP
...     vector = store["P12345"]                          # numpy array

Heavy modules (torch, the models) are imported only where they are used, so importing the
package and reading a store stay fast.
"""

__version__ = "0.1.0"

__all__ = ["EmbeddingStore", "embed", "__version__"]


def __getattr__(name: str):
    if name == "EmbeddingStore":
        from gpuengine.store.reader import EmbeddingStore

        return EmbeddingStore
    if name == "embed":
        from gpuengine.api import embed

        return embed
    raise AttributeError(f"module 'gpuengine' has no attribute {name!r}")
