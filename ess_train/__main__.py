"""``python -m ess_train``: the Hydra app (same as the ``ess-train`` console script)."""

import sys

if __name__ == "__main__":
    try:
        from ess_train.app.main import main
    except KeyboardInterrupt:  # Ctrl-C while the app's libraries are imported: a clean line, not a traceback
        print("ess-train: SIGINT during start-up: stopped before training began.", file=sys.stderr)
        sys.exit(130)
    main()
