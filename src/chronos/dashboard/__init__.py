"""The read-only web dashboard (``chronos dashboard``), served on Chronos's one HTTP
layer (:mod:`chronos.httpserve`). Importing this package loads nothing heavy."""
