"""The VirNucPro viral-read prediction workflow (spec: shared/reference/virnucpro.md).

Modules (import the one you need; this package imports none of them, so that the CPU-only
front half never pulls in torch):

- :mod:`.frames`: chunking and six-frame translation, vectorised with numpy (no torch).
- :mod:`.classifier`: the MLP classifier, safe loading of the published files, scoring.
- :mod:`.outputs`: ``prediction_results.txt``, ``prediction_results_highestscore.csv`` and a
  per-read summary.
"""
