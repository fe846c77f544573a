"""``python -m train``: the protocol runner (cross-validation or a final model) on the sample cache.

Usage:
    python -m train --help
    python -m train --dataset bu3dfe --cache data/bu3dfe --protocol P1 --folds 10 --out runs/p1
    python -m train --dataset synthetic --cache data/syn --preprocess --final --out runs/demo

See train/experiment.py for every option and what RUN_DIR receives.
"""

import sys

from train.experiment import main

if __name__ == "__main__":
    sys.exit(main())
