"""``python -m hiermem`` runs the console script (also under ``torchrun -m hiermem``)."""

from hiermem.cli import main

raise SystemExit(main())
