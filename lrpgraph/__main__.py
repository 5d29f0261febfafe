"""``python -m lrpgraph``: the ``lrpgraph`` command (also under ``torchrun -m lrpgraph``)."""
from .cli import main

raise SystemExit(main())
