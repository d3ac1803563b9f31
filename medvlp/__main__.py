"""`python -m medvlp ...` (and `torchrun -m medvlp train ...`)."""

from medvlp.cli import main

main()
