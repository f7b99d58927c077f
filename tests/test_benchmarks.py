"""The benchmark scripts run in their tiny --smoke mode and report properly.

No timing assertions: the numbers depend on the machine and its load. Each
script runs in a subprocess (as a user runs it) with its JSON sent to a
temporary file, so the committed results are left alone.
"""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import cpu_info
from vit_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_HEADERS = ('config', 'img/s', 'median ms', 'p10 ms', 'p90 ms',
                'GFLOP/s', '% ceil', 'compile s', 'peak MB', 'XLA MB', 'others',
                'quiet img/s')
STEP_KEYS = ('images_per_s', 'median_ms', 'p10_ms', 'p90_ms', 'gflops',
             'pct_ceiling', 'compile_s', 'peak_rss_mb', 'xla_mb',
             'ceiling_f32_gflops', 'ceiling_bf16_f32_gflops', 'step_gflop')


def run_script(name, tmp_path, *args):
  """Runs benchmarks/NAME --smoke; returns (stdout, JSON results)."""
  out = tmp_path / f'{name}.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', name), '--smoke',
       f'--out={out}', *args],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(out) as f:
    return proc.stdout, json.load(f)


def table_header(stdout, first_column):
  """The header cells of the table whose first column is `first_column`."""
  for line in stdout.splitlines():
    if line.startswith(first_column + ' '):
      return [cell.strip() for cell in line.split('  ') if cell.strip()]
  raise AssertionError(f'no table starting with {first_column!r}:\n{stdout}')


def assert_step_rows(results, count):
  assert len(results) == count
  for row in results:
    assert 'error' not in row, row.get('error')
    for key in STEP_KEYS:
      assert row[key] > 0, key
    assert row['p10_ms'] <= row['median_ms'] <= row['p90_ms']
    assert row['timed_steps'] == len(row['step_times_s']) >= 3
    assert len(row['step_others_cores']) == row['timed_steps']
    assert row['others_cores'] >= 0


@pytest.mark.slow
def test_train_throughput_smoke_runs_each_dtype(tmp_path):
  stdout, payload = run_script('train_throughput.py', tmp_path,
                               '--dtype=float32,bfloat16')
  assert tuple(table_header(stdout, 'config')) == STEP_HEADERS
  assert [row['config'] for row in payload['results']] == [
      'digits b8 float32', 'digits b8 bfloat16']
  assert_step_rows(payload['results'], 2)
  assert payload['machine']['cpu_count'] >= 1
  assert payload['machine']['cpu_features'] == cpu_info.vector_features()
  # Restarted with huge pages for malloc wherever glibc and the kernel can,
  # and with the block cache wherever glibc can.
  assert payload['machine']['malloc_huge_pages'] == host_memory.supported()
  assert payload['machine']['block_cache'] == (
      host_memory.glibc_version() is not None)


@pytest.mark.slow
def test_train_scaling_smoke(tmp_path):
  stdout, payload = run_script('train_throughput.py', tmp_path, '--scaling')
  header = table_header(stdout, 'model')
  assert header[:3] == ['model', 'image', 'batch']
  assert 'img/s' in header and 'peak MB' in header
  assert [row['batch_size'] for row in payload['results']] == [4, 8]
  assert_step_rows(payload['results'], 2)


@pytest.mark.slow
def test_eval_throughput_smoke(tmp_path):
  stdout, payload = run_script('eval_throughput.py', tmp_path)
  assert tuple(table_header(stdout, 'config')) == STEP_HEADERS
  assert_step_rows(payload['results'], 1)


@pytest.mark.slow
def test_peer_throughput_smoke(tmp_path):
  stdout, payload = run_script('peer_throughput.py', tmp_path)
  header = table_header(stdout, 'framework')
  assert header[:2] == ['framework', 'img/s']
  assert 'x HF' in header and 'x official' in header
  frameworks = [row['framework'] for row in payload['results']]
  assert frameworks[0].startswith('vit_jax')
  assert frameworks[1].startswith('official-style') and 'glibc' in (
      frameworks[1])
  assert frameworks[2].startswith('HF transformers')
  for row in payload['results']:
    assert row['images_per_s'] > 0 and row['gflops'] > 0
  assert payload['results'][-1]['vs_peer'] == 1.0
  official = payload['results'][1]
  assert official['vs_official'] == 1.0
  # Its own count (XLA's attention) is the same model's: ours within 2%.
  assert official['xla_flops'] == pytest.approx(official['step_gflop'] * 1e9,
                                                rel=0.02)
  # The child's own peak, not the parent's (which holds torch as well).
  assert 0 < official['peak_rss_mb'] < payload['peak_rss_mb']
  assert payload['ceilings']['torch_f32_gflops'] > 0


@pytest.mark.slow
def test_input_throughput_smoke(tmp_path):
  stdout, payload = run_script('input_throughput.py', tmp_path)
  assert 'pipeline' in stdout and 'img/s' in stdout
  pipelines = [row['pipeline'] for row in payload['results']]
  assert any(name.startswith('digits train') for name in pipelines)
  assert any(name.startswith('folder train') for name in pipelines)
  assert payload['cpu_features'] == cpu_info.vector_features()
  for row in payload['results']:
    assert row['min_images_per_s'] <= row['images_per_s'] <= (
        row['max_images_per_s'])
    assert row['images_per_s'] > 0


@pytest.mark.slow
def test_profile_step_smoke(tmp_path):
  stdout, payload = run_script('profile_step.py', tmp_path)
  assert 'by op kind' in stdout and 'single ops' in stdout
  assert payload['step_ms'] > 0 and payload['kinds']
  for row in payload['kinds']:
    assert row['ms'] >= 0 and row['count'] >= 1
    assert not row['op'][-1].isdigit() or '.' not in row['op']
  with open(payload['hlo']) as f:
    assert 'HloModule' in f.read()


def test_model_specs_resolve_presets_custom_and_registry_names():
  sys.path.insert(0, REPO)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  reference = common.model_spec('reference')
  assert reference.image_shape == (32, 32, 3)
  assert reference.model_config.hidden_size == 192
  assert reference.model_config.patch_size == (4, 4)
  digits = common.model_spec('digits', dtype='bfloat16')
  assert digits.image_shape == (8, 8, 1)
  assert digits.model_config.dtype == 'bfloat16'
  custom = common.model_spec('custom:hidden=32,layers=2,heads=4,mlp=64,'
                             'patch=8,image=16')
  assert (custom.model_config.num_layers, custom.image_size) == (2, 16)
  assert common.model_spec('B/16').image_shape == (224, 224, 3)
  with pytest.raises(ValueError, match='unknown key'):
    common.model_spec('custom:width=3')


def test_grid_and_round_merging():
  sys.path.insert(0, REPO)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  configs = common.grid(batch=[8, 16], dtype=['float32', 'bfloat16'])
  assert configs[1] == {'batch': 8, 'dtype': 'bfloat16'}
  assert len(configs) == 4
  ceilings = {'ceiling_f32_gflops': 100.0, 'ceiling_bf16_f32_gflops': 200.0}
  rounds = [(common.Timings([1.0, 1.0, 1.0], [0.0, 0.0, 1.0]), 10.0),
            (common.Timings([0.5, 0.5, 0.5], [0.0, 0.0, 0.0]), 20.0)]
  rows = [{**common.step_row('a', 8, timings, 1e9, 100.0), **ceilings,
           'compile_s': 1.0, 'peak_rss_mb': mb} for timings, mb in rounds]
  merged = common.merge_rounds(rows)
  assert merged['timed_steps'] == 6 and merged['rounds'] == 2
  assert merged['peak_rss_mb'] == 20.0
  # Quiet steps: the five with other processes below 0.1 cores.
  assert merged['quiet_steps'] == 5
  assert merged['quiet_images_per_s'] == 8 / 0.5
  assert common.merge_rounds([{'error': 'boom'}]) == {'error': 'boom'}


def _compiled_train_step(common, attention_kernel_on, monkeypatch):
  """A one-block train step (65 tokens, one head of 64), compiled; 16
  images in 2 micro-batches, one example per device on 8 devices."""
  # pylint: disable-next=g-import-not-at-top
  from benchmarks import train_throughput
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax.models import attention_kernel  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(attention_kernel.ENV_SWITCH,
                     '1' if attention_kernel_on else '0')
  spec = common.model_spec('custom:hidden=64,layers=1,heads=1,mlp=64,'
                           'patch=4,image=32')
  config = dict(model=spec.name, batch=16, dtype='float32', accum=2,
                remat=False)
  step, state, mesh = train_throughput.build_train_step(spec, config, 'sgd')
  batch = parallel.global_batch(common.random_batch(spec, 16), mesh)
  compiled, _ = common.compile_step(step, state, batch)
  return compiled


def test_step_flops_count_the_attention_kernel_like_xla_attention(
    monkeypatch):
  sys.path.insert(0, REPO)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from vit_jax.models import attention_kernel  # pylint: disable=g-import-not-at-top
  if os.environ.get(attention_kernel.ENV_SWITCH) == '0':
    pytest.skip(f'{attention_kernel.ENV_SWITCH}=0: kernel not wanted')
  assert attention_kernel.load() is not None, 'the kernel did not build'
  with_kernel = _compiled_train_step(common, True, monkeypatch)
  with_xla = _compiled_train_step(common, False, monkeypatch)
  assert 'VitJaxAttentionBackward' in with_kernel.as_text()
  # XLA's analysis alone misses the attention's products (a fifth of this
  # model's FLOPs); with them counted the two steps agree, up to the
  # softmax's elementwise operations, which only XLA's attention counts.
  counted = common.step_flops(with_kernel, 2)
  reference = common.step_flops(with_xla, 2)
  assert with_kernel.cost_analysis()['flops'] * 2 < 0.9 * reference
  assert counted == pytest.approx(reference, rel=0.02)


def test_kernel_flops_reads_calls_from_hlo_and_refuses_unknown_ones():
  sys.path.insert(0, REPO)
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  line = ('%ffi_call.1 = f32[2,5,3,1,16]{4,3,2,1,0} custom-call(%a, %b, %c),'
          ' custom_call_target="VitJaxAttentionKIND", operand_layout_'
          'constraints={f32[2,5,3,1,16]{4,3,2,1,0}, f32[2,1,5,16]{3,2,1,0}}')
  # Per (example, head), 2 * tokens^2 * head_dim = 800 FLOPs per product:
  # 2 products forward, 4 backward.
  hlo = '\n'.join([line.replace('KIND', 'Forward'),
                   line.replace('KIND', 'Backward')])
  assert common.kernel_flops(hlo) == 2 * 1 * 800 * (2 + 4)
  with pytest.raises(ValueError, match='VitJaxAttentionSideways'):
    common.kernel_flops(line.replace('KIND', 'Sideways'))
  with pytest.raises(ValueError, match='no operand shape'):
    common.kernel_flops('custom_call_target="VitJaxAttentionForward"')
