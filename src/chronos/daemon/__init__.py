"""chronosd: the per-machine authority that owns the ledger and acts on time."""
