r"""Images per second of the real jitted train step (optimizer included).

    # The performance issue's reference config, float32 and bfloat16 compute,
    # alternated over 3 rounds so their ratio holds on a busy machine:
    python benchmarks/train_throughput.py --model reference --batch 64 \
        --dtype float32,bfloat16 --rounds 3
    # What remat buys on ViT-B/16 at 224px:
    python benchmarks/train_throughput.py --model B/16 --batch 32 --remat false,true
    # Images/s and peak memory versus batch size and model size:
    python benchmarks/train_throughput.py --scaling
    python benchmarks/train_throughput.py --smoke     # seconds; checks it runs

The step is `vit_jax.train.make_train_step` on a state from
`create_train_state`, exactly what training runs: SGD momentum 0.9 with a
bfloat16 trace and gradient clipping at norm 1 (the repo's default optimizer),
state donated. Every configuration runs in a fresh process (so the peak
resident memory is its own) that also measures the matmul ceiling; see
benchmarks/common.py for how each column is measured.

--model takes a registry name ('Ti/16', 'B/16', ...; 224px by default),
'reference' (hidden 192, 12 layers, 3 heads, MLP 768, patch 4, 32x32x3, 10
classes), 'digits' (the demo model on 8x8x1 digits) or a custom spec such as
'custom:hidden=192,layers=12,heads=3,mlp=768,patch=4,image=32,classes=10'.
Comma-separated values of --model/--batch/--dtype/--accum/--remat run every
combination.
"""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
# pylint: enable=g-import-not-at-top,wrong-import-position

SCALING_MODELS = ('digits', 'Ti/16', 'S/16', 'B/16')
SCALING_BATCHES = (8, 16, 32, 64, 128, 256)

SCALING_COLUMNS = (
    common.Column('model', 'model'),
    common.Column('image_size', 'image'),
    common.Column('batch_size', 'batch'),
    common.Column('images_per_s', 'img/s', '{:.1f}'),
    common.Column('median_ms', 'median ms', '{:.1f}'),
    common.Column('gflops', 'GFLOP/s', '{:.1f}'),
    common.Column('pct_ceiling', '% ceil', '{:.0f}'),
    common.Column('timed_steps', 'steps'),
    common.Column('peak_rss_mb', 'peak MB', '{:.0f}'),
    common.Column('xla_mb', 'XLA MB', '{:.0f}'),
    common.Column('note', 'note'),
)


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser, several=True)
  parser.add_argument('--batch', default='64')
  parser.add_argument('--dtype', default='float32',
                      help='compute dtype(s); params stay float32')
  parser.add_argument('--accum', default='1', help='micro-batches per step')
  parser.add_argument('--remat', default='false')
  parser.add_argument('--xla', default='default',
                      help='XLA:CPU option set(s) for the compiled step: '
                      'default (as vit_jax), xla, noynn, ynndot or '
                      'key=value[+key=value] (see common.XLA_OPTION_SETS)')
  parser.add_argument('--optimizer', default='sgd',
                      choices=('sgd', 'adam', 'adamw'))
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--budget_s', type=float, default=None,
                      help='stop timing a config after this many seconds '
                      '(at least 3 steps)')
  parser.add_argument('--rounds', type=int, default=1,
                      help='alternate the configs this many times')
  parser.add_argument('--scaling', action='store_true',
                      help='images/s and memory vs batch and model size')
  parser.add_argument('--scaling_models', default=','.join(SCALING_MODELS))
  parser.add_argument('--scaling_batches',
                      default=','.join(map(str, SCALING_BATCHES)))
  common.add_run_arguments(parser)
  args = parser.parse_args(argv)
  if args.smoke:
    args.model, args.batch, args.steps, args.warmup = 'digits', '8', 3, 1
    args.scaling_models, args.scaling_batches = 'digits', '4,8'
    args.ceiling_size = common.SMOKE_CEILING_SIZE
  return args


def _configs(args) -> list[dict]:
  if args.scaling:
    return common.grid(model=common.parse_list(args.scaling_models),
                       batch=common.parse_list(args.scaling_batches, int),
                       dtype=['float32'], accum=[1], remat=[False],
                       xla=common.parse_list(args.xla)[:1])
  return common.grid(model=common.parse_list(args.model),
                     batch=common.parse_list(args.batch, int),
                     dtype=common.parse_list(args.dtype),
                     accum=common.parse_list(args.accum, int),
                     remat=common.parse_list(args.remat, common.parse_bool),
                     xla=common.parse_list(args.xla))


def label(config: dict) -> str:
  """A row's name: model, batch and whatever differs from the defaults."""
  parts = [config['model'], f'b{config["batch"]}', config['dtype']]
  if config.get('accum', 1) > 1:
    parts.append(f'accum{config["accum"]}')
  if config.get('remat'):
    parts.append('remat')
  if config.get('xla', 'default') != 'default':
    parts.append(f'xla:{config["xla"]}')
  return ' '.join(parts)


# ---------------------------------------------------------------------------
# One configuration (runs in the child process).


def optimizer_config(optimizer: str):
  """The optimizer keys of configs/common.py with the repo's defaults."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      optimizer=optimizer, momentum=0.9, momentum_dtype='bfloat16', b1=0.9,
      b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0, lr=0.01))


def build_train_step(spec: common.ModelSpec, config: dict, optimizer: str):
  """(jitted step, initial state, mesh) for one configuration."""
  # pylint: disable=g-import-not-at-top
  from vit_jax import models
  from vit_jax import optim
  from vit_jax import parallel
  from vit_jax import train
  # pylint: enable=g-import-not-at-top
  model = models.build_model(spec.model_config, spec.num_classes)
  schedule = optim.make_schedule(base_lr=0.01, total_steps=10_000,
                                 decay='constant')
  tx = optim.make_optimizer(optimizer_config(optimizer), schedule)
  mesh = parallel.make_mesh()
  _, shardings = train.abstract_state(model, tx, spec.image_shape, mesh)
  state = train.create_train_state(model, tx, spec.image_shape, mesh,
                                   shardings, seed=0)
  step = train.make_train_step(
      model, tx, schedule, mesh, shardings, accum_steps=config['accum'],
      compiler_options=common.xla_options(config.get('xla', 'default')))
  return step, state, mesh


def measure(config: dict, args) -> dict:
  """Compiles and times one train configuration; a table row."""
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  spec = common.model_spec(config['model'], args.image_size,
                           dtype=config['dtype'], remat=config['remat'])
  # Measured again after the timed steps; the higher one counts.
  ceilings = common.matmul_ceiling(args.ceiling_size)
  step, state, mesh = build_train_step(spec, config, args.optimizer)
  batch = parallel.global_batch(
      common.random_batch(spec, config['batch']), mesh)
  compiled, compile_s = common.compile_step(step, state, batch)
  base = {'config': label(config), 'model': config['model'],
          'image_size': spec.image_size, 'batch_size': config['batch'],
          'compile_s': compile_s, 'xla_mb': common.xla_memory_mb(compiled)}
  needed, available = base['xla_mb'], common.available_memory_mb()
  if needed > 0.85 * available:
    return {**base, 'note': f'skipped: XLA plans {needed / 1024:.1f} GB, '
                            f'{available / 1024:.1f} GB available'}
  holder = {'state': state}

  def run_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    return metrics

  times = common.time_steps(run_step, warmup=args.warmup, steps=args.steps,
                            budget_s=args.budget_s)
  ceilings = common.best_ceilings(
      ceilings, common.matmul_ceiling(args.ceiling_size))
  row = common.step_row(label(config), config['batch'], times,
                        common.step_flops(compiled, config['accum']),
                        common.ceiling_for(config['dtype'], ceilings))
  return {**base, **row, **ceilings, 'peak_rss_mb': common.peak_rss_mb()}


# ---------------------------------------------------------------------------
# The parent: configurations in fresh processes, a table, JSON.


def _print_results(rows, args) -> None:
  if args.scaling:
    print('\ntrain step scaling (float32; each row its own process)')
    print(common.format_table(rows, SCALING_COLUMNS))
    return
  print(f'\ntrain step throughput: median of {args.steps} steps after '
        f'{args.warmup} warm-up, {args.rounds} round(s); % ceil against the '
        'matmul ceiling of the step\'s dtype measured in the same process')
  print(common.format_table(rows, common.STEP_COLUMNS))
  for row in rows:
    if 'error' in row or 'note' in row:
      print(f'{row["config"]}: {row.get("error") or row.get("note")}')
  ceilings = [r for r in rows if 'ceiling_f32_gflops' in r]
  if ceilings:
    print('matmul ceiling (GFLOP/s): ' + ', '.join(
        f'{r["config"]}: f32 {r["ceiling_f32_gflops"]:.0f} bf16->f32 '
        f'{r["ceiling_bf16_f32_gflops"]:.0f}' for r in ceilings))


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.child_json:
    row = measure(json.loads(args.config_json), args)
    with open(args.child_json, 'w') as f:
      json.dump(row, f)
    return 0
  warmup = 1 if args.scaling else args.warmup  # Big scaling steps are slow.
  child_args = [f'--steps={args.steps}', f'--warmup={warmup}',
                f'--optimizer={args.optimizer}',
                f'--ceiling_size={args.ceiling_size}']
  if args.image_size:
    child_args.append(f'--image_size={args.image_size}')
  if args.budget_s or args.scaling:
    child_args.append(f'--budget_s={args.budget_s or 20}')
  rows = common.run_rounds(os.path.abspath(__file__), _configs(args),
                           args.rounds, child_args)
  for row in rows:
    row.setdefault('config', label(row))
  _print_results(rows, args)
  name = 'train_scaling' if args.scaling else 'train_throughput'
  common.write_json(args.out or common.default_out(name, args.smoke),
                    {'args': vars(args), 'results': rows})
  return 0


if __name__ == '__main__':
  common.run_script(main)
