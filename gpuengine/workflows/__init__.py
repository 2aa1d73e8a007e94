"""End-to-end workflows built on gpuengine's embedding engine.

Each workflow lives in its own subpackage (``gpuengine.workflows.virnucpro``, ...). Importing
this package imports nothing else.
"""
