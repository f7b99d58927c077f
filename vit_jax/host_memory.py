"""Huge pages for XLA's per-step host buffers: a restart with a glibc tunable.

XLA:CPU allocates a step's temporaries as one block at every execution and
frees it afterwards (876 MB for the reference model of
`benchmarks/train_throughput.py` at batch 64). glibc serves a block that
large with a fresh `mmap` and unmaps it on free, so every step faults the
whole block in again 4 KiB at a time: 214,000 page faults and ~0.45
CPU-seconds of kernel time per step there, a third of the step's CPU time.

With the tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and newer) malloc asks
the kernel for transparent huge pages on its blocks (`madvise`), so a block
faults in 2 MiB at a time: ~630 page faults per step instead, and the step
runs 1.3x as fast. glibc reads tunables only when a process starts, so
`restart_with_huge_pages()` replaces the running command, once, by the same
command with the tunable added to GLIBC_TUNABLES (`exec`: same process id,
arguments, working directory and open files). `python -m vit_jax.main` and
`python -m vit_jax.demo` do so before anything else, and the benchmarks
before they measure.

Nothing happens when the tunable is already set (to any value), outside
glibc 2.35+, when the kernel's transparent huge pages are off, or when
VIT_JAX_HUGE_PAGES=0.
"""

import os
import platform
import sys
from typing import Mapping

ENV_SWITCH = 'VIT_JAX_HUGE_PAGES'
TUNABLES = 'GLIBC_TUNABLES'
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb'
THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def restart_with_huge_pages() -> None:
  """Re-executes this command with huge pages for malloc, or returns."""
  if not wants_restart(os.environ):
    return
  env = dict(os.environ)
  env[TUNABLES] = with_huge_pages(env.get(TUNABLES, ''))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def wants_restart(env: Mapping[str, str]) -> bool:
  """True when a restart would give this process huge pages it lacks."""
  if env.get(ENV_SWITCH, '1') == '0' or not sys.executable:
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
  libc, version = platform.libc_ver()
  if platform.system() != 'Linux' or libc != 'glibc':
    return False
  try:
    major, minor = (int(part) for part in version.split('.')[:2])
  except ValueError:  # An unreadable version: assume too old.
    return False
  return (major, minor) >= (2, 35)


def kernel_has_huge_pages() -> bool:
  """Transparent huge pages are `always` or `madvise` (not `never`)."""
  try:
    with open(THP_SETTING) as setting:
      return '[never]' not in setting.read()
  except OSError:
    return False
