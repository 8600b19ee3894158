"""``python -m hybridflow``: the ``hybridflow`` command, also under ``torchrun``
(``torchrun --standalone --nproc_per_node=2 -m hybridflow train --dataset=digits ...``)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
