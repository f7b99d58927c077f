"""Shared test set-up: offline peers, quiet TensorFlow, 8 simulated CPU
devices, and one XLA compilation cache for the whole run."""

import os
import shutil
import tempfile

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

# The same small train and eval steps compile in dozens of processes (the
# xdist workers and the programs the tests start): JAX's persistent cache
# shares them. Made by the first process that loads this file (the xdist
# controller, whose environment the workers and subprocesses inherit) and
# removed by it at the end; a cache directory set by the user is left alone.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='vit_jax_tests_xla_cache_')
  # A size limit makes JAX lock the cache (filelock), so that no process
  # reads an entry while another is still writing it.
  os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 << 30))

import jax  # pylint: disable=g-import-not-at-top

# Every test sees 8 devices, so the sharded code paths run on each test run.
jax.config.update('jax_num_cpu_devices', 8)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus  # Unused.
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
