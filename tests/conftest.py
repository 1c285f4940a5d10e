"""Shared test setup: the repository root is importable, and every dataset/model cache lives in a
temporary folder so tests never touch (or depend on) the user's ~/.minari, ~/.d4rl or model cache."""

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_CACHE = tempfile.mkdtemp(prefix="ilq-tests-")
os.environ["MINARI_DATASETS_PATH"] = os.path.join(_CACHE, "minari")
os.environ["D4RL_DATASET_DIR"] = os.path.join(_CACHE, "d4rl")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
