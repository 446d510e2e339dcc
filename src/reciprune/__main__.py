"""`python -m reciprune` (and `torchrun -m reciprune`) entry point."""

from reciprune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
