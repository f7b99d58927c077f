"""Huge pages for malloc through a one-time restart (vit_jax.host_memory)."""

import os
import subprocess
import sys

import pytest

from vit_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = 'glibc.malloc.hugetlb=1'

needs_huge_pages = pytest.mark.skipif(
    not host_memory.supported(),
    reason='needs glibc 2.35+ and transparent huge pages')


def test_tunable_is_appended_to_existing_ones():
  assert host_memory.with_huge_pages('') == HUGE
  assert (host_memory.with_huge_pages('glibc.malloc.arena_max=2') ==
          'glibc.malloc.arena_max=2:' + HUGE)


@needs_huge_pages
def test_restart_is_wanted_only_without_the_tunable_and_the_opt_out():
  assert host_memory.wants_restart({})
  assert host_memory.wants_restart(
      {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'})
  assert not host_memory.wants_restart({'GLIBC_TUNABLES': HUGE})
  # A value the user chose, even 0, is left alone.
  assert not host_memory.wants_restart(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert not host_memory.wants_restart({'VIT_JAX_HUGE_PAGES': '0'})


def _run(code: str, *args: str, **env: str) -> list[str]:
  """stdout lines of `python -c code args` without inherited tunables."""
  base = {k: v for k, v in os.environ.items()
          if k not in ('GLIBC_TUNABLES', 'VIT_JAX_HUGE_PAGES')}
  done = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO,
                        env={**base, **env}, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.splitlines()


_REPORT_THEN_RESTART = """
import os, sys
from vit_jax import host_memory
print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:],
      host_memory.huge_pages_on(), flush=True)
host_memory.restart_with_huge_pages()
"""


@needs_huge_pages
def test_restart_happens_once_with_the_same_process_and_arguments():
  first, second = _run(_REPORT_THEN_RESTART, 'a', '--b=1')
  pid, tunables, args = first.split(' ', 2)
  assert (tunables, args) == ('None', "['a', '--b=1'] False")
  assert second == f"{pid} {HUGE} ['a', '--b=1'] True"


def test_opt_out_runs_the_command_once_unchanged():
  (only,) = _run(_REPORT_THEN_RESTART, 'a', VIT_JAX_HUGE_PAGES='0')
  assert only.split(' ', 1)[1] == "None ['a'] False"


# Page faults of writing a freshly allocated 256 MiB block, as XLA's
# temporaries are at every step; the last of 3 rounds (each mmaps anew).
_FAULTS_OF_A_LARGE_BLOCK = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
print(faults)
"""


@needs_huge_pages
def test_the_tunable_cuts_the_page_faults_of_a_large_block():
  (plain,) = _run(_FAULTS_OF_A_LARGE_BLOCK)
  (huge,) = _run(_FAULTS_OF_A_LARGE_BLOCK, GLIBC_TUNABLES=HUGE)
  # 4 KiB pages: one fault per page; 2 MiB pages: 512 times fewer.
  assert int(plain) >= (256 << 20) // 4096
  assert int(huge) < int(plain) // 20
