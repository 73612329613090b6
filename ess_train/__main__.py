"""``python -m ess_train``: the Hydra app (same as the ``ess-train`` console script)."""

from ess_train.app import main

if __name__ == "__main__":
    main()
