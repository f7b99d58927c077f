r"""Images per second of the jitted eval (inference) step.

    python benchmarks/eval_throughput.py --model reference --batch 64 \
        --dtype float32,bfloat16 --rounds 3
    python benchmarks/eval_throughput.py --model Ti/16,B/16 --batch 64
    python benchmarks/eval_throughput.py --smoke     # seconds; checks it runs

The step is `vit_jax.train.make_eval_step`, what evaluation runs: the
forward pass in eval mode plus the correct/count/loss sums over a padded
batch. Same columns, models and conventions as train_throughput.py (see
benchmarks/common.py): each configuration in a fresh process that also
measures the matmul ceiling; FLOPs from XLA's cost analysis plus the
attention kernel's products.
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


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser, several=True)
  parser.add_argument('--batch', default='64')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--xla', default='default',
                      help='XLA:CPU option set(s): default (as vit_jax), '
                      'xla, noynn, ynndot or key=value[+key=value]')
  parser.add_argument('--steps', type=int, default=20, help='timed steps')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--rounds', type=int, default=1,
                      help='alternate the configs this many times')
  common.add_run_arguments(parser)
  args = parser.parse_args(argv)
  if args.smoke:
    args.model, args.batch, args.steps, args.warmup = 'digits', '8', 3, 1
    args.ceiling_size = common.SMOKE_CEILING_SIZE
  return args


def label(config: dict) -> str:
  name = f'{config["model"]} b{config["batch"]} {config["dtype"]}'
  if config.get('xla', 'default') != 'default':
    name += f' xla:{config["xla"]}'
  return name


def build_eval_step(spec: common.ModelSpec, xla: str = 'default'):
  """(jitted eval step, params, mesh) for one model."""
  # pylint: disable=g-import-not-at-top
  import jax
  from vit_jax import models
  from vit_jax import parallel
  from vit_jax import train
  # pylint: enable=g-import-not-at-top
  model = models.build_model(spec.model_config, spec.num_classes)
  mesh = parallel.make_mesh()
  replicated = parallel.replicated_sharding(mesh)
  init = jax.jit(lambda rng: model.init(
      rng, jax.numpy.zeros((1,) + spec.image_shape), train=False)['params'],
                 out_shardings=replicated)
  params = init(jax.random.PRNGKey(0))
  shardings = jax.tree.map(lambda _: replicated, params)
  step = train.make_eval_step(model, mesh, shardings,
                              compiler_options=common.xla_options(xla))
  return step, params, mesh


def measure(config: dict, args) -> dict:
  """Compiles and times one eval configuration; a table row."""
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  spec = common.model_spec(config['model'], args.image_size,
                           dtype=config['dtype'])
  # Measured again after the timed steps; the higher one counts.
  ceilings = common.matmul_ceiling(args.ceiling_size)
  step, params, mesh = build_eval_step(spec, config.get('xla', 'default'))
  batch = parallel.global_batch(
      common.random_batch(spec, config['batch'], with_mask=True), mesh)
  compiled, compile_s = common.compile_step(step, params, batch)
  times = common.time_steps(lambda: compiled(params, batch),
                            warmup=args.warmup, steps=args.steps)
  ceilings = common.best_ceilings(
      ceilings, common.matmul_ceiling(args.ceiling_size))
  row = common.step_row(label(config), config['batch'], times,
                        common.compiled_flops(compiled),
                        common.ceiling_for(config['dtype'], ceilings))
  return {**row, **ceilings, 'model': config['model'],
          'image_size': spec.image_size, 'compile_s': compile_s,
          'xla_mb': common.xla_memory_mb(compiled),
          'peak_rss_mb': common.peak_rss_mb()}


def main(argv=None) -> int:
  args = _parse_args(argv)
  if args.child_json:
    row = measure(json.loads(args.config_json), args)
    with open(args.child_json, 'w') as f:
      json.dump(row, f)
    return 0
  configs = common.grid(model=common.parse_list(args.model),
                        batch=common.parse_list(args.batch, int),
                        dtype=common.parse_list(args.dtype),
                        xla=common.parse_list(args.xla))
  child_args = [f'--steps={args.steps}', f'--warmup={args.warmup}',
                f'--ceiling_size={args.ceiling_size}']
  if args.image_size:
    child_args.append(f'--image_size={args.image_size}')
  rows = common.run_rounds(os.path.abspath(__file__), configs, args.rounds,
                           child_args)
  for row in rows:
    row.setdefault('config', label(row))
  print(f'\neval step throughput: median of {args.steps} steps after '
        f'{args.warmup} warm-up, {args.rounds} round(s)')
  print(common.format_table(rows, common.STEP_COLUMNS))
  for row in rows:
    if 'error' in row:
      print(f'{row["config"]}: {row["error"]}')
  common.write_json(args.out or common.default_out('eval_throughput',
                                                   args.smoke),
                    {'args': vars(args), 'results': rows})
  return 0


if __name__ == '__main__':
  common.run_script(main)
