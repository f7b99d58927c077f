"""Huge pages and the block cache through a one-time restart
(vit_jax.host_memory, vit_jax/block_cache.c)."""

import os
import subprocess
import sys

import pytest

from vit_jax import host_memory
from vit_jax import native_build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = 'glibc.malloc.hugetlb=1'

needs_glibc = pytest.mark.skipif(
    host_memory.glibc_version() is None, reason='interposes glibc malloc')
needs_huge_pages = pytest.mark.skipif(
    not host_memory.supported(),
    reason='needs glibc 2.35+ and transparent huge pages')


def test_tunable_is_appended_to_existing_ones():
  assert host_memory.with_huge_pages('') == HUGE
  assert (host_memory.with_huge_pages('glibc.malloc.arena_max=2') ==
          'glibc.malloc.arena_max=2:' + HUGE)


@needs_huge_pages
def test_huge_pages_are_wanted_only_without_the_tunable_and_the_opt_out():
  assert host_memory.wants_huge_pages({})
  assert host_memory.wants_huge_pages(
      {'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=0'})
  assert not host_memory.wants_huge_pages({'GLIBC_TUNABLES': HUGE})
  # A value the user chose, even 0, is left alone.
  assert not host_memory.wants_huge_pages(
      {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert not host_memory.wants_huge_pages({'VIT_JAX_HUGE_PAGES': '0'})


_SETTINGS = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'VIT_JAX_HUGE_PAGES',
             'VIT_JAX_BLOCK_CACHE')


def _run(code: str, *args: str, **env: str) -> list[str]:
  """stdout lines of `python -c code args` without inherited tunables."""
  base = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
  done = subprocess.run([sys.executable, '-c', code, *args], cwd=REPO,
                        env={**base, **env}, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  return done.stdout.splitlines()


_REPORT_THEN_RESTART = """
import os, sys
from vit_jax import host_memory
print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:],
      host_memory.huge_pages_on(), host_memory.block_cache_on(), flush=True)
host_memory.restart_for_step_memory()
"""


@needs_huge_pages
def test_restart_happens_once_with_the_same_process_and_arguments():
  first, second = _run(_REPORT_THEN_RESTART, 'a', '--b=1')
  pid, tunables, args = first.split(' ', 2)
  assert (tunables, args) == ('None', "['a', '--b=1'] False False")
  assert second == f"{pid} {HUGE} ['a', '--b=1'] True True"


def test_opt_outs_run_the_command_once_unchanged():
  (only,) = _run(_REPORT_THEN_RESTART, 'a', VIT_JAX_HUGE_PAGES='0',
                 VIT_JAX_BLOCK_CACHE='0')
  assert only.split(' ', 1)[1] == "None ['a'] False False"


@needs_glibc
def test_each_opt_out_leaves_the_other_remedy():
  _, second = _run(_REPORT_THEN_RESTART, VIT_JAX_HUGE_PAGES='0')
  assert second.split(' ', 1)[1] == 'None [] False True'
  if host_memory.supported():
    _, second = _run(_REPORT_THEN_RESTART, VIT_JAX_BLOCK_CACHE='0')
    assert second.split(' ', 1)[1] == f'{HUGE} [] True False'


@needs_glibc
def test_a_user_preload_is_kept_and_the_cache_added_once():
  env = host_memory.restart_env({'LD_PRELOAD': 'libuser.so'})
  library = host_memory.block_cache_library()
  assert env['LD_PRELOAD'] == f'libuser.so {library}'
  assert not host_memory.wants_block_cache(env)


@needs_glibc
def test_without_step_memory_takes_out_only_what_the_restart_added():
  user = {'LD_PRELOAD': 'libuser.so', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2',
          'PATH': '/bin'}
  restarted = host_memory.restart_env(user) or dict(user)
  plain = host_memory.without_step_memory(restarted)
  assert plain == {**user, 'VIT_JAX_HUGE_PAGES': '0',
                   'VIT_JAX_BLOCK_CACHE': '0'}
  assert host_memory.restart_env(plain) is None
  bare = host_memory.without_step_memory(
      host_memory.restart_env({'PATH': '/bin'}) or {'PATH': '/bin'})
  assert 'LD_PRELOAD' not in bare and 'GLIBC_TUNABLES' not in bare


def test_without_a_compiler_the_restart_skips_the_cache(monkeypatch, tmp_path):
  monkeypatch.setenv('CC', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv(native_build.CACHE_ENV, str(tmp_path / 'cache'))
  with pytest.warns(UserWarning, match='block cache .* unavailable'):
    env = host_memory.restart_env({'VIT_JAX_HUGE_PAGES': '0'})
  assert env is None


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


# The block cache's behaviour, through ctypes in a process that preloads it.
_ALLOCATOR = """
import ctypes, resource, threading, time
libc = ctypes.CDLL(None)
libc.free.argtypes = [ctypes.c_void_p]
libc.realloc.restype = ctypes.c_void_p
libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.malloc_usable_size.restype = ctypes.c_size_t
libc.malloc_usable_size.argtypes = [ctypes.c_void_p]
MiB = 1 << 20

def allocate(size):
  out = ctypes.c_void_p()
  assert libc.posix_memalign(ctypes.byref(out), 64, ctypes.c_size_t(size)) == 0
  return out.value

def faults_of_writing(block, size):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(block, 1, size)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
"""

_STEPS = _ALLOCATOR + """
size = 128 * MiB  # not a multiple of 2 MiB below: rounded up inside
addresses, faults = [], []
for _ in range(3):
  block = allocate(size - 100)
  addresses.append(block)
  faults.append(faults_of_writing(block, size - 100))
  libc.free(block)
print(len(set(addresses)), *faults)
"""


def _with_block_cache(code: str, *args: str) -> list[str]:
  library = host_memory.block_cache_library()
  return _run(code, *args, LD_PRELOAD=str(library),
              GLIBC_TUNABLES=HUGE if host_memory.supported() else '')


@needs_glibc
def test_a_freed_large_block_comes_back_without_page_faults():
  (glibc,) = _run(_STEPS, GLIBC_TUNABLES=HUGE)
  (cached,) = _with_block_cache(_STEPS)
  distinct, *faults = map(int, cached.split())
  assert distinct == 1
  # The first write faults the block in (2 MiB pages: 64 faults at least);
  # later ones find it mapped. glibc maps it afresh every time.
  assert faults[0] >= 64 and max(faults[1:]) < 8
  assert min(map(int, glibc.split()[2:])) >= 64


_CONCURRENT = _ALLOCATOR + """
size = 96 * MiB
first, second = allocate(size), allocate(size)
libc.free(first)
libc.free(second)
again = {allocate(size), allocate(size)}
small = allocate(MiB)  # below 64 MiB: glibc's, not a cached block
print(first != second, again == {first, second}, small not in again)
"""


@needs_glibc
def test_blocks_in_use_together_are_distinct_and_all_reused():
  assert _with_block_cache(_CONCURRENT) == ['True True True']


_TRAIN_THEN_EVAL = _ALLOCATOR + """
def mapped(block):
  start = format(block, 'x')
  with open('/proc/self/maps') as maps:
    return any(line.startswith(start + '-') for line in maps)

train = allocate(100 * MiB)
libc.free(train)
kept = mapped(train)
evaluation = allocate(70 * MiB)  # a new size: the train block goes
print(kept, mapped(train), mapped(evaluation))
"""


@needs_glibc
def test_a_request_of_a_new_size_unmaps_the_free_blocks():
  # As glibc would: training's freed block must not stay resident beside
  # evaluation's (peak memory), yet a same-size request still reuses it.
  assert _with_block_cache(_TRAIN_THEN_EVAL) == ['True False True']


_WAIT_FOR_THE_LAST_STEP = _ALLOCATOR + """
size = 80 * MiB
last_step = allocate(size)
got = []
next_step = threading.Thread(target=lambda: got.append(allocate(size)))
next_step.start()   # asks while the last step's block is still in use,
time.sleep(0.005)   # as XLA's next step often does,
libc.free(last_step)  # and gets it back once freed, not a second block
next_step.join()
print(got == [last_step])
"""


@needs_glibc
def test_a_request_waits_for_the_busy_block_of_its_size():
  assert _with_block_cache(_WAIT_FOR_THE_LAST_STEP) == ['True']


_REALLOC = _ALLOCATOR + """
size = 70 * MiB
block = allocate(size)
ctypes.memset(block, 7, size)
usable = libc.malloc_usable_size(block)
moved = libc.realloc(block, size + MiB)
kept = ctypes.string_at(moved, size) == bytes([7]) * size
libc.free(moved)
print(usable >= size, kept, allocate(size) == block)
"""


@needs_glibc
def test_realloc_of_a_cached_block_keeps_its_bytes_and_frees_it():
  assert _with_block_cache(_REALLOC) == ['True True True']


_FORK = _ALLOCATOR + """
import os
size = 72 * MiB
block = allocate(size)
pid = os.fork()
if pid == 0:  # the child frees its copy and takes it back, then leaves
  libc.free(block)
  os._exit(0 if allocate(size) == block else 1)
_, status = os.waitpid(pid, 0)
libc.free(block)
print(os.waitstatus_to_exitcode(status), allocate(size) == block)
"""


@needs_glibc
def test_a_forked_child_has_its_own_working_cache():
  assert _with_block_cache(_FORK) == ['0 True']
