"""Fast host memory for XLA's per-step buffers: a restart, once, at start.

XLA:CPU allocates a step's temporaries as one block at every execution and
frees it afterwards (838 MB for the reference model of
`benchmarks/train_throughput.py` at batch 64, 2.8 GB for ViT-Ti/16). glibc
serves a block that large with a fresh `mmap` and unmaps it on free, so
every step faults the whole block in again and the kernel zeroes it. Two
remedies, both of which must be in place when the process starts:

- huge pages: with the tunable `glibc.malloc.hugetlb=1` (glibc 2.35+)
  malloc asks for transparent huge pages, so the block faults in 2 MiB at a
  time (~630 faults per step instead of 214,000; the step 1.3x as fast);
- the block cache (`block_cache.c`, preloaded with LD_PRELOAD): a freed
  block of 64 MiB or more stays mapped and the next step gets it back, with
  no faults at all and the same peak memory (1.06x the reference step, 1.09x
  ViT-Ti/16, measured alternately in one process).

`restart_for_step_memory()` replaces the running command, once, by the same
command with GLIBC_TUNABLES and LD_PRELOAD extended (`exec`: same process
id, arguments, working directory and open files). `python -m vit_jax.main`,
`python -m vit_jax.demo` and the benchmarks do so before anything else.

Each remedy is skipped when already present (a tunable value the user set
counts), outside Linux with glibc, or when turned off: VIT_JAX_HUGE_PAGES=0
(also when the kernel's transparent huge pages are off), VIT_JAX_BLOCK_CACHE=0
(also when the block cache does not compile: the restart then goes ahead
without it, after a warning).
"""

import os
import pathlib
import platform
import subprocess
import sys
from typing import Mapping, Optional
import warnings

from vit_jax import native_build

ENV_SWITCH = 'VIT_JAX_HUGE_PAGES'
BLOCK_CACHE_SWITCH = 'VIT_JAX_BLOCK_CACHE'
TUNABLES = 'GLIBC_TUNABLES'
PRELOAD = 'LD_PRELOAD'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'
BLOCK_CACHE_SOURCE = pathlib.Path(__file__).with_name('block_cache.c')


def restart_for_step_memory() -> None:
  """Re-executes this command with huge pages and the block cache, or
  returns when it has them (or cannot have them)."""
  env = restart_env(os.environ)
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def restart_env(env: Mapping[str, str]) -> Optional[dict[str, str]]:
  """The environment to restart with, or None when no restart would help."""
  if not sys.executable:
    return None
  new = dict(env)
  if wants_huge_pages(env):
    new[TUNABLES] = with_huge_pages(env.get(TUNABLES, ''))
  if wants_block_cache(env):
    library = block_cache_library()
    if library is not None:
      new[PRELOAD] = with_preload(env.get(PRELOAD, ''), library)
  return None if new == dict(env) else new


def without_step_memory(env: Mapping[str, str]) -> dict[str, str]:
  """`env` for a child that should run as a plain `python` does: huge pages
  and the block cache taken out, and switched off so it adds neither."""
  new = dict(env)
  tunables = [item for item in env.get(TUNABLES, '').split(':')
              if item and not item.startswith(HUGE_PAGES_TUNABLE + '=')]
  preloads = [path for path in _preloads(env) if not _is_block_cache(path)]
  for key, values, separator in ((TUNABLES, tunables, ':'),
                                 (PRELOAD, preloads, ' ')):
    if values:
      new[key] = separator.join(values)
    else:
      new.pop(key, None)
  new[ENV_SWITCH] = new[BLOCK_CACHE_SWITCH] = '0'
  return new


# ---------------------------------------------------------------------------
# Huge pages.


def wants_huge_pages(env: Mapping[str, str]) -> bool:
  """True when a restart would give this process huge pages it lacks."""
  if env.get(ENV_SWITCH, '1') == '0':
    return False
  if HUGE_PAGES_TUNABLE + '=' in env.get(TUNABLES, ''):
    return False  # Already restarted, or chosen by the user.
  return supported()


def supported() -> bool:
  """glibc has the tunable and the kernel has transparent huge pages."""
  return glibc_has_the_tunable() and kernel_has_huge_pages()


def with_huge_pages(tunables: str) -> str:
  """GLIBC_TUNABLES `tunables` (colon-separated) plus hugetlb=1."""
  return ':'.join(filter(None, [tunables, HUGE_PAGES_TUNABLE + '=1']))


def huge_pages_on() -> bool:
  """True when this process started with glibc.malloc.hugetlb=1."""
  tunables = os.environ.get(TUNABLES, '').split(':')
  return HUGE_PAGES_TUNABLE + '=1' in tunables


def glibc_has_the_tunable() -> bool:
  """This process runs on Linux with glibc 2.35 or newer."""
  version = glibc_version()
  return version is not None and version >= (2, 35)


def glibc_version() -> Optional[tuple[int, int]]:
  """(major, minor) of the C library on Linux with glibc, else None."""
  libc, version = platform.libc_ver()
  if platform.system() != 'Linux' or libc != 'glibc':
    return None
  try:
    major, minor = (int(part) for part in version.split('.')[:2])
  except ValueError:  # An unreadable version: treat as not glibc.
    return None
  return major, minor


def kernel_has_huge_pages() -> bool:
  """Transparent huge pages are `always` or `madvise` (not `never`)."""
  try:
    with open(THP_SETTING) as setting:
      return '[never]' not in setting.read()
  except OSError:
    return False


# ---------------------------------------------------------------------------
# The block cache.


def wants_block_cache(env: Mapping[str, str]) -> bool:
  """True when a restart would preload the block cache this process lacks."""
  if env.get(BLOCK_CACHE_SWITCH, '1') == '0' or glibc_version() is None:
    return False
  return not any(_is_block_cache(path) for path in _preloads(env))


def with_preload(preload: str, library: pathlib.Path) -> str:
  """LD_PRELOAD `preload` (space- or colon-separated) plus `library`."""
  return ' '.join(filter(None, [preload.strip(), str(library)]))


def block_cache_library() -> Optional[pathlib.Path]:
  """The compiled block cache (built on first use), or None with a warning
  when it cannot be built."""
  try:
    return native_build.shared_library(BLOCK_CACHE_SOURCE, _compiler_command)
  except (OSError, subprocess.SubprocessError) as error:
    warnings.warn(f'vit_jax: block cache for XLA step memory unavailable, '
                  f'continuing without it ({error})')
    return None


def block_cache_on() -> bool:
  """True when the block cache is loaded into this process."""
  try:
    with open('/proc/self/maps') as maps:
      # address, permissions, offset, device, inode, then the mapped file.
      return any(len(fields) >= 6 and _is_block_cache(fields[5])
                 for fields in map(str.split, maps))
  except OSError:
    return False


def _compiler_command(output: pathlib.Path) -> list[str]:
  return [os.environ.get('CC', 'cc'), '-O2', '-shared', '-fPIC', '-pthread',
          str(BLOCK_CACHE_SOURCE), '-o', str(output), '-ldl']


def _preloads(env: Mapping[str, str]) -> list[str]:
  return env.get(PRELOAD, '').replace(':', ' ').split()


def _is_block_cache(path: str) -> bool:
  name = os.path.basename(path)
  return name.startswith(BLOCK_CACHE_SOURCE.stem + '-') and name.endswith('.so')
