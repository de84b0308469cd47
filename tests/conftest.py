import os
import sys

# Tests import small shared helpers (stream_fixtures.py) from this folder.
sys.path.insert(0, os.path.dirname(__file__))
