"""`python -m worker` is the `clientsync` command."""

from worker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
