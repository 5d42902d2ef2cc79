"""`python -m adaptive_lr`: the same command as `adaptive-lr`."""

from adaptive_lr.cli import main

main()
