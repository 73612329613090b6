"""``python -m ess_train.app``: the ``ess-train`` command."""

from ess_train.app.main import main

main()
