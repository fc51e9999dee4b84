import os
import sys

# Tests import helpers (e.g. loss_reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
