"""One client of ``s2hpruner.core``: config, command line, run loop, data and model registries,
checkpoints, reports. Nothing in ``core`` imports from here."""
