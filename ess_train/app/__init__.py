"""The Hydra app (``ess-train``) and what only it uses: the command line (:mod:`~ess_train.app.main`), one
run (:mod:`~ess_train.app.training`), config validation, run directories and resume, the run lock, atomic
checkpoints, signals, the non-finite guard, the progress bar, loggers and the sweep table.

Importing this package imports neither torch nor Lightning (the command line validates a config first).
"""
