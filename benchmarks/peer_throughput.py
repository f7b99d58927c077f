r"""Our train step side by side with the official recipe and HF's PyTorch ViT.

    python benchmarks/peer_throughput.py                  # reference config
    python benchmarks/peer_throughput.py --model Ti/16 --batch 32
    python benchmarks/peer_throughput.py --official=glibc,vit_jax \
        --official_accum=1,8                              # more baseline rows
    python benchmarks/peer_throughput.py --smoke          # seconds

All three train the same model on the same batch with the same kind of
optimizer: SGD momentum 0.9, gradient clipping at global norm 1, lr 0.01
(ours and the official-style step keep the momentum in bfloat16 as the
official code does; torch.optim.SGD keeps it in float32). The HF peer is
`transformers.ViTForImageClassification` with SDPA attention, tanh-GELU and
LayerNorm epsilon 1e-6 (our numerics), in float32 with
`torch.set_num_threads(cores)`.

The second baseline is the official google-research/vision_transformer
recipe rebuilt from stock Flax (`benchmarks/official_style.py`: Flax's
attention, pmap, XLA's default options), in a child process with glibc's
malloc as a plain `python` has (`--official=vit_jax`: with our huge pages
and block cache, to tell the allocator's share from the rest).

All of them alternate in rounds (ours N steps, the official-style step N
steps, HF N steps, the matmul ceilings, repeat), so a busy machine slows
each alike and the ratios hold. GFLOP/s of every row use the FLOPs of our
compiled step (XLA's cost analysis plus the attention kernel's products; the
same model, so the same arithmetic; the official-style step's own count,
with XLA's attention, is in the JSON as `xla_flops`).
"""

import argparse
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

# pylint: disable=g-import-not-at-top,wrong-import-position
# torch and HF's ViT (which pulls in torch._dynamo and triton) before
# anything imports TensorFlow: in one process `import tensorflow` followed by
# those imports segfaults, while the other order works.
import torch
from transformers import ViTConfig
from transformers import ViTForImageClassification
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common
from benchmarks import official_style
from benchmarks import train_throughput
# pylint: enable=g-import-not-at-top,wrong-import-position

COLUMNS = (
    common.Column('framework', 'framework'),
    common.Column('images_per_s', 'img/s', '{:.1f}'),
    common.Column('median_ms', 'median ms', '{:.1f}'),
    common.Column('p10_ms', 'p10 ms', '{:.1f}'),
    common.Column('p90_ms', 'p90 ms', '{:.1f}'),
    common.Column('gflops', 'GFLOP/s', '{:.1f}'),
    common.Column('pct_ceiling', '% ceil', '{:.0f}'),
    common.Column('timed_steps', 'steps'),
    common.Column('others_cores', 'others', '{:.2f}'),
    common.Column('quiet_images_per_s', 'quiet img/s', '{:.1f}'),
    common.Column('peak_rss_mb', 'peak MB', '{:.0f}'),
    common.Column('vs_official', 'x official', '{:.2f}'),
    common.Column('vs_peer', 'x HF', '{:.2f}'),
    common.Column('quiet_vs_peer', 'quiet x HF', '{:.2f}'),
)


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--dtype', default='float32',
                      help='our compute dtype(s), each its own row (the peer '
                      'stays float32)')
  parser.add_argument('--accum', default='1',
                      help='our micro-batches per step, each its own row '
                      '(same global batch)')
  parser.add_argument('--xla', default='default',
                      help='XLA:CPU option set(s) for our step, each its own '
                      'row: default (as vit_jax), xla, noynn, ynndot or '
                      'key=value[+...]')
  parser.add_argument('--official', default='glibc',
                      help='rows of the official-style step '
                      '(benchmarks/official_style.py) in a child process, by '
                      'its malloc: glibc (a plain python), vit_jax (huge '
                      'pages and the block cache, as ours), both '
                      'comma-separated, or none')
  parser.add_argument('--official_accum', default='1',
                      help='micro-batches of the official-style step, each '
                      'its own row (its default config uses 8)')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=5,
                      help='timed steps per framework and round')
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--smoke', action='store_true',
                      help='tiny and fast: checks that the script runs')
  parser.add_argument('--out', default=None)
  common.add_ceiling_argument(parser)
  args = parser.parse_args(argv)
  if not set(common.parse_list(args.official)) <= {'glibc', 'vit_jax',
                                                    'none'}:
    parser.error(f'--official={args.official!r}: expected glibc, vit_jax, '
                 'both comma-separated, or none')
  if args.smoke:
    args.model, args.batch, args.rounds, args.steps, args.warmup = (
        'digits', 8, 2, 2, 1)
    args.ceiling_size = common.SMOKE_CEILING_SIZE
  return args


# ---------------------------------------------------------------------------
# The peer: HF ViT in PyTorch.


def hf_model(spec: common.ModelSpec) -> torch.nn.Module:
  """`ViTForImageClassification` with our model's shape and numerics."""
  config = spec.model_config
  hf_config = ViTConfig(
      hidden_size=config.hidden_size,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      intermediate_size=config.mlp_dim,
      hidden_act='gelu_pytorch_tanh' if config.gelu_approximate else 'gelu',
      layer_norm_eps=config.layer_norm_epsilon,
      image_size=spec.image_size,
      patch_size=config.patch_size[0],
      num_channels=spec.channels,
      num_labels=spec.num_classes,
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
      attn_implementation='sdpa')
  return ViTForImageClassification(hf_config).train()


def torch_train_step(model: torch.nn.Module, batch: dict):
  """A step function: forward, cross-entropy, backward, clip, SGD momentum."""
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  images = torch.from_numpy(batch['image'].transpose(0, 3, 1, 2).copy())
  labels = torch.from_numpy(batch['label'].argmax(-1))

  def step():
    optimizer.zero_grad(set_to_none=True)
    logits = model(pixel_values=images).logits
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()  # Waits for the step, like block_until_ready.

  return step


def torch_ceiling(size: int = common.CEILING_SIZE,
                  repeats: int = 10) -> float:
  """GFLOP/s of a float32 torch matmul (torch's own BLAS ceiling)."""
  a, b = torch.randn(size, size), torch.randn(size, size)
  torch.mm(a, b)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    times.append(time.perf_counter() - start)
  return 2 * size**3 / np.median(times) / 1e9


# ---------------------------------------------------------------------------
# Ours.


def jax_train_step(spec: common.ModelSpec, batch_np: dict, config: dict):
  """(step function, FLOPs of one step) for our train step.

  `config` holds 'accum' and 'xla' as in train_throughput.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  step, state, mesh = train_throughput.build_train_step(spec, config, 'sgd')
  batch = parallel.global_batch(batch_np, mesh)
  compiled, _ = common.compile_step(step, state, batch)
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], batch)
    return jax.block_until_ready(metrics)

  return run, common.step_flops(compiled, config['accum'])


def _alternate(steps: dict, args) -> tuple[dict, list[dict]]:
  """Times each framework `args.steps` steps per round, in turn."""
  times = {name: common.Timings() for name in steps}
  ceilings = []
  for step in steps.values():
    _time(step, args.warmup)
  for round_index in range(args.rounds):
    for name, step in steps.items():
      times[name].extend(_time(step, args.steps))
    ceilings.append({
        **common.matmul_ceiling(args.ceiling_size, repeats=5),
        'torch_f32_gflops': torch_ceiling(args.ceiling_size, repeats=5)})
    rates = ', '.join(
        f'{name} {args.batch / np.median(t.seconds[-args.steps:]):.1f}'
        for name, t in times.items())
    print(f'round {round_index + 1}/{args.rounds}: img/s {rates}',
          flush=True)
  return times, ceilings


def _time(step, steps: int) -> common.Timings:
  """`steps` timed calls of a step in this process or in a child."""
  if isinstance(step, official_style.RemoteStep):
    return step.time_steps(steps)
  return common.time_steps(step, warmup=0, steps=steps)


def _official_steps(args) -> dict:
  """The official-style rows, each in its own child process."""
  steps = {}
  for memory in common.parse_list(args.official):
    if memory == 'none':
      continue
    for accum in common.parse_list(args.official_accum, int):
      parts = ['float32'] + ([f'accum{accum}'] if accum > 1 else [])
      name = f'official-style (JAX pmap, {", ".join(parts)}, {memory} malloc)'
      steps[name] = official_style.RemoteStep(
          args.model, args.image_size, args.batch, accum=accum,
          vit_jax_memory=memory == 'vit_jax')
  return steps


def _our_label(config: dict) -> str:
  parts = [config['dtype']]
  if config['accum'] > 1:
    parts.append(f'accum{config["accum"]}')
  if config['xla'] != 'default':
    parts.append(f'xla:{config["xla"]}')
  return f'vit_jax (JAX, {", ".join(parts)})'


def main(argv=None) -> int:
  args = _parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  steps, flops, dtypes = {}, {}, {}
  for config in common.grid(dtype=common.parse_list(args.dtype),
                            accum=common.parse_list(args.accum, int),
                            xla=common.parse_list(args.xla)):
    spec = common.model_spec(args.model, args.image_size,
                             dtype=config['dtype'])
    batch = common.random_batch(spec, args.batch)
    name = _our_label(config)
    steps[name], flops[name] = jax_train_step(spec, batch, config)
    dtypes[name] = config['dtype']
  ours_flops = next(iter(flops.values()))
  remotes = _official_steps(args)
  for name, remote in remotes.items():
    steps[name], dtypes[name] = remote, 'float32'
    # The same model: our count (its own, with XLA's attention, is in the
    # JSON as a check).
    flops[name] = ours_flops
  name = 'HF transformers (PyTorch, float32, SDPA)'
  steps[name] = torch_train_step(hf_model(spec), batch)
  flops[name], dtypes[name] = ours_flops, 'float32'
  times, ceilings = _alternate(steps, args)
  peaks = {name: remote.close() for name, remote in remotes.items()}
  ceiling = {key: float(np.median([c[key] for c in ceilings]))
             for key in ceilings[0]}
  rows = []
  for name, step_times in times.items():
    rows.append({'framework': name,
                 **common.step_row(name, args.batch, step_times, flops[name],
                                   common.ceiling_for(dtypes[name], ceiling))})
    if name in remotes:
      rows[-1].update(peak_rss_mb=peaks[name],
                      xla_flops=remotes[name].flops,
                      compile_s=remotes[name].compile_s)
  peer = rows[-1]
  official = next((row for row in rows if row['framework'] in remotes), None)
  for row in rows:
    row['vs_peer'] = row['images_per_s'] / peer['images_per_s']
    if official:
      row['vs_official'] = row['images_per_s'] / official['images_per_s']
    if row['quiet_images_per_s'] and peer['quiet_images_per_s']:
      row['quiet_vs_peer'] = (row['quiet_images_per_s'] /
                              peer['quiet_images_per_s'])
  print(f'\n{spec.name} batch {args.batch}: {args.rounds} rounds x '
        f'{args.steps} steps each, alternating; torch threads '
        f'{args.threads}')
  print(common.format_table(rows, COLUMNS))
  print('matmul ceiling (GFLOP/s, median of rounds): ' + ', '.join(
      f'{key} {value:.0f}' for key, value in ceiling.items()))
  common.write_json(args.out or common.default_out('peer_throughput',
                                                   args.smoke),
                    {'args': vars(args), 'ceilings': ceiling,
                     'results': rows, 'peak_rss_mb': common.peak_rss_mb()})
  return 0


if __name__ == '__main__':
  common.run_script(main)
