"""``python -m segkd`` (what ``torchrun -m segkd ...`` runs)."""

from segkd.cli import main

main()
