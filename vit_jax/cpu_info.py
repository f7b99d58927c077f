"""What the host CPU can do, read once from /proc/cpuinfo.

Used to key the attention kernel's build cache to the CPU and to warn when
bfloat16 compute would be emulated (slower than float32) on a CPU.
"""

import functools
import pathlib
import platform

# x86 flags (Linux's names) of instructions that multiply bf16 pairs into
# float32 sums; aarch64 lists 'bf16' among its features.
NATIVE_BF16_FLAGS = frozenset({'avx512_bf16', 'amx_bf16', 'bf16'})
# The flags that decide how fast matmuls run here: vector width and bf16.
VECTOR_FLAGS = frozenset({'avx2', 'fma', 'avx512f', 'asimd', 'sve'}
                         ) | NATIVE_BF16_FLAGS


def _cpuinfo_line(*prefixes: str) -> str | None:
  """The first line of /proc/cpuinfo that starts with one of `prefixes`."""
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith(prefixes):
        return line
  except OSError:
    pass
  return None


@functools.cache
def flags_line() -> str:
  """The first 'flags' (x86) or 'Features' (aarch64) line of /proc/cpuinfo,
  else the processor's name: what the CPU offers, as one string."""
  return _cpuinfo_line('flags', 'Features') or platform.processor()


@functools.cache
def model_name() -> str:
  """The CPU's name ('AMD EPYC ...'), else what `platform` knows of it."""
  line = _cpuinfo_line('model name')
  return line.partition(':')[2].strip() if line else platform.processor()


def flags() -> frozenset[str]:
  _, _, listed = flags_line().partition(':')
  return frozenset(listed.split())


def has_native_bf16() -> bool:
  return not NATIVE_BF16_FLAGS.isdisjoint(flags())


def vector_features() -> list[str]:
  """Which of VECTOR_FLAGS this CPU has, sorted (for benchmark records)."""
  return sorted(VECTOR_FLAGS & flags())
