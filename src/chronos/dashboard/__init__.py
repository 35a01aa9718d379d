"""The read-only web dashboard (``chronos dashboard``) and the address helpers it shares
with the Prometheus endpoint. Importing this package loads nothing heavy."""
