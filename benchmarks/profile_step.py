r"""Where a train step's time goes: XLA ops grouped by kind, from a profile.

    python benchmarks/profile_step.py                      # reference model
    python benchmarks/profile_step.py --model=Ti/16 --dtype=bfloat16
    python benchmarks/profile_step.py --smoke               # a few seconds

Runs the real train step (`vit_jax.train.make_train_step`) under
`jax.profiler.trace` and reads the Perfetto trace it writes: every XLA:CPU
thunk (a fusion, a dot, a copy) is one event. Events are grouped by name
with the numeric suffix dropped (`ynn_fusion.12` -> `ynn_fusion`), summed and
divided by the traced steps. Thunks may overlap (XLA runs independent ones
concurrently), so the shares can add up to more than the step; thunks that
hand work to another thread pool (Eigen `dot`s without YNNPACK) record only
their dispatch. The full optimized HLO is written next to the JSON, to look
up what a fusion computes.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from benchmarks import train_throughput
# pylint: enable=g-import-not-at-top,wrong-import-position

# Runtime bookkeeping events, not XLA ops.
_NOT_OPS = ('ThunkExecutor', 'Threadpool', 'SlinkyThreadPool', 'end:', '$',
            'PjitFunction', 'CommonPjRt', 'ParseArguments')


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--accum', type=int, default=1)
  parser.add_argument('--xla', default='default',
                      help='XLA:CPU option set: default (as vit_jax), xla, '
                      'noynn, ynndot or key=value[+...]')
  parser.add_argument('--steps', type=int, default=3, help='traced steps')
  parser.add_argument('--top', type=int, default=15,
                      help='op kinds (and single ops) to list')
  parser.add_argument('--smoke', action='store_true',
                      help='the digits model, 1 step: checks the script runs')
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.smoke:
    args.model, args.batch, args.steps = 'digits', 8, 1
  return args


def op_events(trace_dir: str) -> list[dict]:
  """The complete ('X') events of XLA ops in the trace under `trace_dir`."""
  paths = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                    recursive=True)
  if not paths:
    raise FileNotFoundError(f'no *.trace.json.gz under {trace_dir}')
  with gzip.open(paths[0]) as f:
    events = json.load(f)['traceEvents']
  return [e for e in events
          if e.get('ph') == 'X' and not e['name'].startswith(_NOT_OPS)]


def op_kind(name: str) -> str:
  """'ynn_fusion.12' -> 'ynn_fusion'."""
  return re.sub(r'\.\d+$', '', name)


def summarize_ops(events: list[dict], steps: int,
                  step_ms: float) -> tuple[list[dict], list[dict]]:
  """(rows per op kind, rows per single op), largest first, per step."""
  def rows(key):
    total, count = collections.Counter(), collections.Counter()
    for event in events:
      total[key(event['name'])] += event['dur']
      count[key(event['name'])] += 1
    return [{'op': name, 'ms': us / steps / 1e3,
             'share': us / steps / 1e3 / step_ms,
             'count': count[name] // steps}
            for name, us in total.most_common()]
  return rows(op_kind), rows(lambda name: name)


def _print_rows(title: str, rows: list[dict], top: int) -> None:
  print(f'\n{title}')
  print(common.format_table(rows[:top], (
      common.Column('op', 'op'),
      common.Column('ms', 'ms/step', '{:.1f}'),
      common.Column('share', '% of step', '{:.0%}'),
      common.Column('count', 'per step'))))


def main(argv=None) -> int:
  args = _parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  spec = common.model_spec(args.model, args.image_size, dtype=args.dtype)
  config = {'accum': args.accum, 'xla': args.xla}
  step, state, mesh = train_throughput.build_train_step(spec, config, 'sgd')
  batch = parallel.global_batch(common.random_batch(spec, args.batch), mesh)
  compiled, _ = common.compile_step(step, state, batch)
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    return jax.block_until_ready(metrics)

  run()  # Warm-up.
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(args.steps):
        run()
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    events = op_events(trace_dir)
  kinds, ops = summarize_ops(events, args.steps, step_ms)
  label = train_throughput.label({'model': args.model, 'batch': args.batch,
                                  'dtype': args.dtype, 'accum': args.accum,
                                  'xla': args.xla})
  print(f'{label}: {step_ms:.0f} ms per traced step (profiler on), '
        f'{common.step_flops(compiled, args.accum) / 1e9:.1f} GFLOP')
  _print_rows('by op kind', kinds, args.top)
  _print_rows('single ops', ops, args.top)
  out = args.out or common.default_out('profile_step', args.smoke)
  hlo_path = os.path.splitext(out)[0] + '.hlo.txt'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(hlo_path, 'w') as f:
    f.write(compiled.as_text())
  common.write_json(out, {'args': vars(args), 'config': label,
                          'step_ms': step_ms, 'kinds': kinds,
                          'ops': ops[:200], 'hlo': hlo_path})
  return 0


if __name__ == '__main__':
  common.run_script(main)
