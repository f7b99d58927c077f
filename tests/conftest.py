"""Shared test set-up: offline peers, quiet TensorFlow, 8 simulated CPU devices."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# In one process `import tensorflow` followed by `import torchvision` (which
# timm imports) segfaults; the other order works, so the peers come first.
try:
  import timm  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass

import jax  # pylint: disable=g-import-not-at-top

# Every test sees 8 devices, so the sharded code paths run on each test run.
jax.config.update('jax_num_cpu_devices', 8)
