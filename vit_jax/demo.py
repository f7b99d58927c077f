"""The offline demo in one command: pretrain, fine-tune, and a baseline.

    python -m vit_jax.demo --workdir=runs/demo

On the built-in digits (no download): pretrains a small ViT at 8x8, fine-tunes
it at 16x16 from that checkpoint (position embeddings resampled, new head),
and runs the same fine-tuning budget from random init for comparison; prints
each stage's test accuracy and wall time. Each stage is an ordinary training
run in `<workdir>/<stage>`, so rerunning resumes unfinished stages.

The stages come from configs/demo.py; to change them pass it explicitly with
overrides: `--config=configs/demo.py --config.pretrain.total_steps=1000`.
"""

import os
import time

from vit_jax import host_memory

if __name__ == '__main__':
  # Before anything heavy loads: this may restart the command once.
  host_memory.restart_for_step_memory()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
import ml_collections

from vit_jax import main as main_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

# Fine-tuning needs the pretrained checkpoint; the baseline can run anywhere.
STAGES = ('pretrain', 'finetune', 'scratch')


def default_config() -> ml_collections.ConfigDict:
  """configs/demo.py, locked like a --config (the checkout is importable)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config()
  config.lock()
  return config


def run_stages(config: ml_collections.ConfigDict,
               workdir: str) -> dict[str, tuple[float, float]]:
  """Runs the STAGES of `config` in order; returns {stage: (accuracy, s)}."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  summary = {}
  for stage in STAGES:
    stage_config = config[stage]
    if stage == 'finetune' and not stage_config.init_from:
      stage_config.init_from = os.path.join(workdir, 'pretrain')
    print(f'\n=== {stage} ===', flush=True)
    start = time.time()
    results = train.train_and_evaluate(stage_config,
                                       os.path.join(workdir, stage))
    accuracy = next(value for key, value in results['final_eval'].items()
                    if key.endswith('/accuracy'))
    summary[stage] = (accuracy, time.time() - start)
  return summary


def format_summary(summary: dict[str, tuple[float, float]],
                   total_seconds: float) -> str:
  """The demo's closing table: accuracy and wall time per stage."""
  lines = ['', 'demo results (digits test accuracy, wall time):']
  for stage, (accuracy, seconds) in summary.items():
    lines.append(f'  {stage:<9} {100 * accuracy:6.2f}%  {seconds:6.1f}s')
  lines.append(f'  total              {total_seconds:6.1f}s')
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  """Runs the demo stages in --workdir and prints the results table."""
  if len(argv) > 1:
    main_lib.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config, workdir = main_lib.config_and_workdir()
  config = config or default_config()
  start = time.time()
  summary = main_lib.run_reporting_errors(lambda: run_stages(config, workdir))
  print(format_summary(summary, time.time() - start), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=main_lib.parse_flags)
