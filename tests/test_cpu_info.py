"""What vit_jax reads about the CPU from /proc/cpuinfo (vit_jax/cpu_info.py)."""

import pytest

from vit_jax import cpu_info


@pytest.mark.parametrize('line, native', [
    ('flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16', True),
    ('flags\t\t: fpu sse2 avx2 fma amx_bf16 amx_tile', True),
    ('Features\t: fp asimd sve bf16 i8mm', True),
    ('flags\t\t: fpu sse2 avx2 fma avx512f avx512bw', False),
    ('', False),
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, line, native):
  monkeypatch.setattr(cpu_info, 'flags_line', lambda: line)
  assert cpu_info.has_native_bf16() is native


def test_vector_features_name_width_and_bf16_only(monkeypatch):
  monkeypatch.setattr(cpu_info, 'flags_line', lambda: (
      'flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 aes'))
  assert cpu_info.vector_features() == ['avx2', 'avx512_bf16', 'avx512f',
                                        'fma']


def test_this_cpus_flags_line_is_read():
  # Linux lists x86 flags as 'flags', aarch64 ones as 'Features'.
  line = cpu_info.flags_line()
  assert line
  if line.startswith(('flags', 'Features')):
    assert cpu_info.flags()


def test_this_cpus_model_name_is_read():
  with open('/proc/cpuinfo') as f:
    names = [line.split(':', 1)[1].strip() for line in f
             if line.startswith('model name')]
  if not names:
    pytest.skip('/proc/cpuinfo lists no model name here')
  assert cpu_info.model_name() == names[0]
