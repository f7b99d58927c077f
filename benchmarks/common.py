"""Shared pieces of the throughput benchmarks: models, timing, ceilings, output.

Conventions every benchmark follows:
  * time: warm-up steps are run and dropped; then every step is timed to
    completion (`block_until_ready`), and the table shows the median step
    time with its 10th and 90th percentiles;
  * FLOPs: XLA's cost analysis of the compiled step (`compiled.cost_analysis()
    ['flops']`; a multiply-add counts 2), so forward, backward and optimizer
    are all included; plus the products of the attention kernel's calls
    (found in the compiled HLO), which the analysis counts as zero;
  * ceiling: a large jitted matmul measured in the same process, float32 and
    bfloat16 x bfloat16 -> float32, so "% of ceiling" compares numbers taken
    under the same machine load;
  * noise: while each step runs, the CPU time every other process on the
    machine used is read from /proc/stat (10 ms ticks, so only meaningful
    for steps of 100 ms or more); `others` is its median in cores, and
    `quiet img/s` the median over the steps during which other processes
    used under 0.1 cores (shown when there are at least 3 such steps);
  * memory: `peak_rss_mb` is the process's peak resident set
    (VmHWM of /proc/self/status); it only means something in a fresh
    process per configuration (`run_isolated`), because it never goes down.
    JAX's CPU backend reports no `memory_stats()`, so XLA's own plan of the
    step (`compiled.memory_analysis()`: temporaries + arguments + outputs)
    is reported next to it as `xla_mb`;
  * malloc: every script starts through `run_script`, which restarts it
    once with huge pages for malloc and the block cache preloaded, as
    `python -m vit_jax.main` does (`vit_jax.host_memory`);
    VIT_JAX_HUGE_PAGES=0 and VIT_JAX_BLOCK_CACHE=0 measure without them.
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from vit_jax import cpu_info
from vit_jax import host_memory

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, 'benchmarks', 'results')

# Model shapes the benchmarks name (besides every registry name like 'Ti/16').
# 'reference': the ViT-Ti-like CIFAR model of the performance issue, for which
# the official google-research code and HF PyTorch were measured.
# 'digits': the built-in demo's model (configs/digits_pretrain.py).
PRESETS = {
    'reference': dict(hidden_size=192, num_layers=12, num_heads=3,
                      mlp_dim=768, patch_size=4, image_size=32, channels=3,
                      num_classes=10),
    'digits': dict(hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
                   patch_size=2, image_size=8, channels=1, num_classes=10),
}
# Short keys of a custom spec 'custom:hidden=192,layers=12,...'.
_SPEC_KEYS = {'hidden': 'hidden_size', 'layers': 'num_layers',
              'heads': 'num_heads', 'mlp': 'mlp_dim', 'patch': 'patch_size',
              'image': 'image_size', 'channels': 'channels',
              'classes': 'num_classes'}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What a benchmark builds: a model config plus its input shape."""
  name: str
  model_config: Any  # An ml_collections.ConfigDict for registry.build_model.
  image_size: int
  channels: int
  num_classes: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)


def model_spec(name: str, image_size: Optional[int] = None,
               **model_overrides) -> ModelSpec:
  """Resolves 'reference', 'digits', 'custom:k=v,...' or a registry name.

  Registry models (e.g. 'Ti/16', 'B/16') default to 224px, 3 channels and
  1000 classes; `image_size` overrides any default. `model_overrides` are
  model attributes (dtype, remat, ...).
  """
  # Imported here: the peer benchmark imports torch before anything of JAX.
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if name in PRESETS or name.startswith('custom:'):
    shape = dict(PRESETS['reference'])
    if name in PRESETS:
      shape.update(PRESETS[name])
    else:
      shape.update(_parse_custom(name))
    config = models.get_model_config('Ti/16')
    config.name = name
    for key in ('hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
      config[key] = shape[key]
    config.patch_size = (shape['patch_size'],) * 2
    size, channels, classes = (shape['image_size'], shape['channels'],
                               shape['num_classes'])
  else:
    config = models.get_model_config(name)
    size, channels, classes = 224, 3, 1000
  for key, value in model_overrides.items():
    config[key] = value
  return ModelSpec(name=name, model_config=config,
                   image_size=image_size or size, channels=channels,
                   num_classes=classes)


def _parse_custom(name: str) -> dict[str, int]:
  values = {}
  for item in filter(None, name[len('custom:'):].split(',')):
    key, _, text = item.partition('=')
    if key not in _SPEC_KEYS:
      raise ValueError(f'unknown key {key!r} in {name!r}; known: '
                       f'{", ".join(_SPEC_KEYS)}')
    values[_SPEC_KEYS[key]] = int(text)
  return values


def add_model_arguments(parser, *, several: bool = False) -> None:
  """--model and --image_size, as every benchmark takes them."""
  names = 'comma-separated ' if several else ''
  parser.add_argument('--model', default='reference',
                      help=f'{names}registry name(s) (Ti/16, B/16, ...), '
                      'reference, digits or custom:hidden=..,layers=..')
  parser.add_argument('--image_size', type=int, default=None,
                      help="default: the model's (224, 32 or 8)")


def add_run_arguments(parser) -> None:
  """--smoke, --out and --ceiling_size, and the parent-to-child flags of
  `run_rounds`."""
  parser.add_argument('--smoke', action='store_true',
                      help='tiny and fast: checks that the script runs')
  parser.add_argument('--out', default=None)
  add_ceiling_argument(parser)
  parser.add_argument('--config_json', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--child_json', default=None, help=argparse.SUPPRESS)


def random_batch(spec: ModelSpec, batch_size: int, seed: int = 0,
                 with_mask: bool = False) -> dict[str, np.ndarray]:
  """Images in [-1, 1] and one-hot labels, as the input pipeline delivers."""
  rng = np.random.default_rng(seed)
  batch = {
      'image': rng.uniform(-1, 1, (batch_size,) + spec.image_shape).astype(
          np.float32),
      'label': np.eye(spec.num_classes, dtype=np.float32)[
          rng.integers(0, spec.num_classes, batch_size)],
  }
  if with_mask:
    batch['mask'] = np.ones((batch_size,), np.float32)
  return batch


# ---------------------------------------------------------------------------
# Timing.


# A step counts as quiet when other processes used less than this many cores
# while it ran.
QUIET_CORES = 0.1


@dataclasses.dataclass
class Timings:
  """Per-step wall times and how busy the rest of the machine was.

  `others_cores[i]`: CPU-seconds other processes used during step i divided
  by its wall time (0 = quiet machine; 1 = another process kept a core busy).
  """
  seconds: list[float] = dataclasses.field(default_factory=list)
  others_cores: list[float] = dataclasses.field(default_factory=list)

  def extend(self, other: 'Timings') -> None:
    self.seconds += other.seconds
    self.others_cores += other.others_cores


def summarize(timings: Timings) -> dict[str, Any]:
  """Median, p10, p90 step time; the same median over quiet steps only."""
  times = np.asarray(timings.seconds, np.float64)
  others = np.asarray(timings.others_cores, np.float64)
  quiet = times[others < QUIET_CORES]
  return {'median_s': float(np.median(times)),
          'p10_s': float(np.percentile(times, 10)),
          'p90_s': float(np.percentile(times, 90)),
          'steps': int(times.size),
          'others_cores': float(np.median(others)),
          'quiet_steps': int(quiet.size),
          'quiet_median_s': float(np.median(quiet)) if quiet.size >= 3
                            else None}


def _busy_seconds() -> tuple[float, float]:
  """(CPU-seconds the whole machine has been busy, this process's)."""
  with open('/proc/stat') as f:
    ticks = [int(v) for v in f.readline().split()[1:]]
  idle = ticks[3] + ticks[4]  # idle + iowait
  own = os.times()
  return ((sum(ticks) - idle) / os.sysconf('SC_CLK_TCK'),
          own.user + own.system)


def time_steps(step: Callable[[], Any], *, warmup: int, steps: int,
               budget_s: Optional[float] = None) -> Timings:
  """Runs `step` (which returns arrays) `warmup` times, then times `steps`.

  Each timed call is waited for (`jax.block_until_ready`) before the next
  starts, and the CPU time other processes took meanwhile is recorded. With
  `budget_s`, stops early once the timed steps have used the budget, but
  never before 3 steps.
  """
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    jax.block_until_ready(step())
  timings = Timings()
  for _ in range(steps):
    machine, own = _busy_seconds()
    start = time.perf_counter()
    jax.block_until_ready(step())
    elapsed = time.perf_counter() - start
    machine_after, own_after = _busy_seconds()
    others = max(0.0, (machine_after - machine) - (own_after - own))
    timings.seconds.append(elapsed)
    timings.others_cores.append(others / elapsed)
    if budget_s is not None and len(timings.seconds) >= 3 and sum(
        timings.seconds) > budget_s:
      break
  return timings


def run_script(main: Callable[[], int]) -> None:
  """A script's entry point: fast step memory (host_memory), then `main`."""
  # The configurations' fresh processes inherit the restarted environment.
  host_memory.restart_for_step_memory()
  sys.exit(main())


def compile_step(jitted, *args) -> tuple[Any, float]:
  """`jitted` lowered and compiled for `args`; returns (compiled, seconds)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


# XLA:CPU option sets the benchmarks compare (--xla). 'default' is what
# vit_jax's train and eval steps use (`vit_jax.xla_options`).
XLA_OPTION_SETS = {
    'default': None,
    # XLA's own defaults: YNNPACK fusions for dots and their neighbours.
    'xla': {},
    # No YNNPACK fusions: Eigen dots and XLA's own fusions. XLA:CPU has no
    # other bf16 x bf16 -> f32 dot, so this is for float32 compute.
    'noynn': {'xla_cpu_experimental_ynn_fusion_type': ''},
    # YNNPACK for dots only; reductions and elementwise ops stay in XLA's
    # fusions.
    'ynndot': {'xla_cpu_experimental_ynn_fusion_type':
                   'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'},
}


def xla_options(name: str) -> Optional[dict[str, str]]:
  """An option set by name, or 'key=value+key=value' spelled out.

  None means vit_jax's own choice for the step's compute dtype.
  """
  if name in XLA_OPTION_SETS:
    options = XLA_OPTION_SETS[name]
    return None if options is None else dict(options)
  options = {}
  for item in filter(None, name.split('+')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'XLA option set {name!r}: expected one of '
                       f'{", ".join(XLA_OPTION_SETS)} or key=value[+...]')
    options[key] = value
  return options


def compiled_flops(compiled) -> float:
  """FLOPs of one call of `compiled`: XLA's HLO cost analysis, plus the
  attention kernel's products, which that analysis cannot see."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per device.
    analysis = analysis[0]
  return (float(analysis.get('flops', float('nan'))) +
          kernel_flops(compiled.as_text()))


# A call of the attention kernel in optimized HLO text, with its first
# operand's shape: custom_call_target="...", then
# operand_layout_constraints={f32[batch,tokens,3,heads,head_dim]...
_KERNEL_CALL = re.compile(
    r'custom_call_target="(VitJaxAttention\w*)"'
    r'(?:.*?operand_layout_constraints=\{\w+\[([\d,]+)\])?')


def kernel_flops(hlo_text: str) -> float:
  """The model's FLOPs in the attention-kernel calls of `hlo_text`.

  Each call counts once, as XLA's cost analysis counts a loop body once.
  """
  # pylint: disable-next=g-import-not-at-top
  from vit_jax.models import attention_kernel
  kernels = {target: kernel
             for kernel, target in attention_kernel.TARGETS.items()}
  total = 0
  for target, dims in _KERNEL_CALL.findall(hlo_text):
    if target not in kernels or not dims:
      raise ValueError(f'cannot count the FLOPs of the custom call {target!r}'
                       ': unknown target or no operand shape in the HLO')
    shape = tuple(int(d) for d in dims.split(','))
    total += attention_kernel.model_flops(kernels[target], shape)
  return float(total)


def step_flops(compiled, accum: int = 1) -> float:
  """FLOPs of one train step of `accum` micro-batches.

  XLA's cost analysis counts a loop body once, so the accumulation loop's
  (one micro-batch's forward and backward) is multiplied by `accum`; the
  optimizer update, outside the loop, is then over-counted by a negligible
  (accum - 1) times ~10 FLOPs per parameter.
  """
  return compiled_flops(compiled) * accum


def xla_memory_mb(compiled) -> float:
  """XLA's planned memory of one call: arguments + outputs + temporaries.

  Donated (aliased) outputs reuse their argument's buffer and count once.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return float('nan')
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes +
           stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return total / 2**20


# ---------------------------------------------------------------------------
# The matmul ceiling.

CEILING_SIZE = 2048
# A smoke run checks that the script works; its numbers mean nothing, and
# 2048^3 matmuls cost it seconds per measurement.
SMOKE_CEILING_SIZE = 256


def add_ceiling_argument(parser) -> None:
  parser.add_argument('--ceiling_size', type=int, default=CEILING_SIZE,
                      help='side of the square matmuls that measure the '
                      f'ceiling (--smoke: {SMOKE_CEILING_SIZE})')


def matmul_ceiling(size: int = CEILING_SIZE,
                   repeats: int = 10) -> dict[str, float]:
  """GFLOP/s of a large jitted matmul: float32, and bf16 x bf16 -> float32.

  Median over `repeats` calls after one warm-up; the best a dense layer can
  hope for on this machine at this moment.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), np.float32)
  b = rng.standard_normal((size, size), np.float32)
  result = {}
  for name, dtype in (('f32', jnp.float32), ('bf16_f32', jnp.bfloat16)):
    matmul = jax.jit(lambda x, y: jnp.matmul(
        x, y, preferred_element_type=jnp.float32))
    x, y = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    times = time_steps(lambda: matmul(x, y), warmup=1, steps=repeats)
    result[f'ceiling_{name}_gflops'] = 2 * size**3 / np.median(
        times.seconds) / 1e9
  return result


def best_ceilings(*measurements: dict[str, float]) -> dict[str, float]:
  """The highest of several ceiling measurements, key by key.

  A step's benchmark measures the ceiling before and after its timed steps:
  on a shared machine one measurement can land in a slow moment, and a
  ceiling that is too low would flatter the step's "% of ceiling".
  """
  return {key: max(m[key] for m in measurements) for key in measurements[0]}


# ---------------------------------------------------------------------------
# Memory and isolation.


def peak_rss_mb() -> float:
  """Peak resident set of this process so far, in MB.

  Linux's VmHWM: unlike `ru_maxrss`, which a forked child starts from its
  parent's resident set and keeps across `exec`, it belongs to this
  program alone.
  """
  try:
    with open('/proc/self/status') as status:
      for line in status:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024  # kB
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def with_repo_on_path(env) -> dict[str, str]:
  """A copy of `env` whose PYTHONPATH starts with this repository, so a
  child Python imports `benchmarks` and `vit_jax` from here."""
  env = dict(env)
  env['PYTHONPATH'] = os.pathsep.join(
      filter(None, [REPO_ROOT, env.get('PYTHONPATH')]))
  return env


def run_isolated(script: str, args: Sequence[str],
                 timeout_s: float = 3600) -> dict:
  """Runs `script --child_json=PATH args...` in a fresh Python; its JSON.

  A fresh process per configuration makes `peak_rss_mb` that
  configuration's own peak. A child that fails (e.g. out of memory) gives
  {'error': ...} instead of stopping the whole run.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'child.json')
    command = [sys.executable, script, f'--child_json={out}', *args]
    env = with_repo_on_path(os.environ)
    try:
      proc = subprocess.run(command, capture_output=True, text=True,
                            timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
      return {'error': f'timed out after {timeout_s:.0f}s'}
    if proc.returncode != 0 or not os.path.exists(out):
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      return {'error': f'exit {proc.returncode}: ' + ' | '.join(tail)}
    with open(out) as f:
      return json.load(f)


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on, and how busy the machine was."""
  import jax  # pylint: disable=g-import-not-at-top
  return {
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'processor': cpu_info.model_name(),
      # 'AMD EPYC' alone named both an AVX-512 and an AVX2 machine here.
      'cpu_features': cpu_info.vector_features(),
      'load_average': os.getloadavg(),
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'devices': jax.device_count(),
      'python': platform.python_version(),
      'malloc_huge_pages': host_memory.huge_pages_on(),
      'block_cache': host_memory.block_cache_on(),
  }


# ---------------------------------------------------------------------------
# Output.


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: the row key, its header and a format for the value."""
  key: str
  header: str
  fmt: str = '{}'

  def render(self, row: dict) -> str:
    value = row.get(self.key)
    if value is None or (isinstance(value, float) and np.isnan(value)):
      return '-'
    return self.fmt.format(value)


# The columns of every step benchmark (train and eval).
STEP_COLUMNS = (
    Column('config', 'config', '{}'),
    Column('images_per_s', 'img/s', '{:.1f}'),
    Column('median_ms', 'median ms', '{:.1f}'),
    Column('p10_ms', 'p10 ms', '{:.1f}'),
    Column('p90_ms', 'p90 ms', '{:.1f}'),
    Column('gflops', 'GFLOP/s', '{:.1f}'),
    Column('pct_ceiling', '% ceil', '{:.0f}'),
    Column('compile_s', 'compile s', '{:.1f}'),
    Column('peak_rss_mb', 'peak MB', '{:.0f}'),
    Column('xla_mb', 'XLA MB', '{:.0f}'),
    Column('others_cores', 'others', '{:.2f}'),
    Column('quiet_images_per_s', 'quiet img/s', '{:.1f}'),
)


def format_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
  """Rows as an aligned plain-text table (the first column left-aligned)."""
  cells = [[c.header for c in columns]]
  cells += [[c.render(row) for c in columns] for row in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

  def line(values):
    return '  '.join(v.ljust(w) if i == 0 else v.rjust(w)
                     for i, (v, w) in enumerate(zip(values, widths)))

  out = [line(cells[0]), '  '.join('-' * w for w in widths)]
  out += [line(values) for values in cells[1:]]
  return '\n'.join(out)


def step_row(config: str, batch_size: int, timings: Timings, flops: float,
             ceiling_gflops: float, **extra) -> dict:
  """One table row from per-step timings and the step's FLOPs."""
  stats = summarize(timings)
  gflops = flops / stats['median_s'] / 1e9
  quiet = stats['quiet_median_s']
  return {
      'config': config,
      'batch_size': batch_size,
      'images_per_s': batch_size / stats['median_s'],
      'median_ms': stats['median_s'] * 1e3,
      'p10_ms': stats['p10_s'] * 1e3,
      'p90_ms': stats['p90_s'] * 1e3,
      'timed_steps': stats['steps'],
      'step_gflop': flops / 1e9,
      'gflops': gflops,
      'ceiling_gflops': ceiling_gflops,
      'pct_ceiling': 100 * gflops / ceiling_gflops,
      'others_cores': stats['others_cores'],
      'quiet_steps': stats['quiet_steps'],
      'quiet_images_per_s': batch_size / quiet if quiet else None,
      'step_times_s': list(timings.seconds),
      'step_others_cores': list(timings.others_cores),
      **extra,
  }


# ---------------------------------------------------------------------------
# Several configurations, each in its own process, in alternating rounds.


def parse_list(text: str, kind: Callable[[str], Any] = str) -> list:
  """'a,b,c' -> [kind('a'), kind('b'), kind('c')]."""
  return [kind(item.strip()) for item in text.split(',') if item.strip()]


def parse_bool(text: str) -> bool:
  if text.lower() in ('1', 'true', 'yes', 'on'):
    return True
  if text.lower() in ('0', 'false', 'no', 'off'):
    return False
  raise ValueError(f'expected a bool, got {text!r}')


def grid(**choices: Sequence[Any]) -> list[dict]:
  """Every combination of the choices, the last key varying fastest."""
  configs = [{}]
  for key, values in choices.items():
    configs = [{**c, key: v} for c in configs for v in values]
  return configs


def run_rounds(script: str, configs: Sequence[dict], rounds: int,
               child_args: Sequence[str] = ()) -> list[dict]:
  """Measures every config in a fresh process, `rounds` times in turn.

  Alternating A, B, A, B, ... lets a ratio between configs hold on a noisy
  machine; a config's rows from all rounds are merged by `merge_rounds`.
  """
  results = [[] for _ in configs]
  for round_index in range(rounds):
    for i, config in enumerate(configs):
      print(f'[round {round_index + 1}/{rounds}] {json.dumps(config)}',
            flush=True)
      row = run_isolated(script, [f'--config_json={json.dumps(config)}',
                                  *child_args])
      results[i].append({**config, **row})
  return [merge_rounds(rows) for rows in results]


def merge_rounds(rows: Sequence[dict]) -> dict:
  """One row from the same config measured in several processes.

  Step times of all rounds are pooled (median, p10, p90 over all of them);
  the ceilings and compile time are the rounds' medians; peak memory the max.
  """
  good = [r for r in rows if 'error' not in r and 'step_times_s' in r]
  if not good:
    return dict(rows[-1])
  timings = Timings()
  for row in good:
    timings.extend(Timings(row['step_times_s'], row['step_others_cores']))
  merged = dict(good[-1])
  merged.update(step_row(
      good[0]['config'], good[0]['batch_size'], timings,
      good[0]['step_gflop'] * 1e9,
      float(np.median([r['ceiling_gflops'] for r in good]))))
  merged['compile_s'] = float(np.median([r['compile_s'] for r in good]))
  merged['peak_rss_mb'] = max(r['peak_rss_mb'] for r in good)
  merged['rounds'] = len(good)
  for key in ('ceiling_f32_gflops', 'ceiling_bf16_f32_gflops'):
    merged[key] = float(np.median([r[key] for r in good]))
  return merged


def ceiling_for(dtype: str, ceilings: dict[str, float]) -> float:
  """The ceiling a step of compute `dtype` is compared with."""
  if dtype in ('bfloat16', 'bf16'):
    return ceilings['ceiling_bf16_f32_gflops']
  return ceilings['ceiling_f32_gflops']


def available_memory_mb() -> float:
  """MemAvailable from /proc/meminfo (inf where unknown)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float('inf')


def default_out(name: str, smoke: bool) -> str:
  """benchmarks/results/NAME.json, or NAME_smoke.json for smoke runs."""
  return os.path.join(RESULTS_DIR, f'{name}_smoke.json' if smoke else
                      f'{name}.json')


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` (plus the machine description) as indented JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'machine': machine_info(), **payload}, f, indent=1,
              default=_jsonable)
  print(f'\nwrote {path}')


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  return str(value)
