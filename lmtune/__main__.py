# `python -m lmtune` and `accelerate launch -m lmtune ...` enter here.
from lmtune.cli import main

main()
