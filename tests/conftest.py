import sys
from pathlib import Path

# Tests run from a checkout; make the top-level packages importable even without `pip install -e`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
