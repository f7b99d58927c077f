"""Compiles the package's C and C++ sources on first use, once per machine.

The attention kernel (`models/attention_kernel.cc`) and the block cache
(`block_cache.c`) are built with the system's compiler for the CPU that runs
them and kept in `$VIT_JAX_KERNEL_CACHE` (default `~/.cache/vit_jax`), under
a name keyed by the source, the compiler command and whatever else changes
the binary (the jaxlib headers, the CPU's flags).
"""

import hashlib
import os
import pathlib
import subprocess
import tempfile
from typing import Callable

CACHE_ENV = 'VIT_JAX_KERNEL_CACHE'

# The compiler command for a source, given where to write the library.
Command = Callable[[pathlib.Path], list[str]]


def cache_dir() -> pathlib.Path:
  path = os.environ.get(CACHE_ENV, '~/.cache/vit_jax')
  return pathlib.Path(path).expanduser()


def shared_library(source: pathlib.Path, command: Command,
                   *key_parts: str) -> pathlib.Path:
  """The cached library built from `source`, compiled first if need be.

  Raises OSError (with the compiler's last line) when it does not compile,
  and subprocess errors when the compiler cannot run.
  """
  key = hashlib.sha256(source.read_bytes())
  for part in (' '.join(command(pathlib.Path('out'))), *key_parts):
    key.update(part.encode())
  cache = cache_dir()
  library = cache / f'{source.stem}-{key.hexdigest()[:16]}.so'
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  # Compile to a private name, then rename: concurrent processes (pytest
  # workers) never load a half-written library.
  with tempfile.TemporaryDirectory(dir=cache) as scratch:
    partial = pathlib.Path(scratch) / library.name
    result = subprocess.run(command(partial), capture_output=True, text=True,
                            timeout=300, check=False)
    if result.returncode != 0:
      last_line = (result.stderr.strip().splitlines() or ['no output'])[-1]
      raise OSError(f'compiling {source.name} failed: {last_line}')
    os.replace(partial, library)
  return library
