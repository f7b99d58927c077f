r"""Exports a checkpoint as official .npz, timm safetensors or an HF directory.

  python -m vit_jax.export --checkpoint=runs/b16_c10 --format=npz \
      --out=exports/b16_c10.npz
  python -m vit_jax.export --checkpoint=ViT-B_16.npz --model=B/16 \
      --format=timm --out=exports/vit_b16.safetensors
  python -m vit_jax.export --checkpoint=exports/b16_c10.npz --format=hf \
      --out=exports/b16_c10_hf

`--checkpoint` is a training workdir (latest step, or `--step=N`), an .npz
file, a timm-named .safetensors file written by this tool, or an HF ViT
directory. `--model` names the architecture (`B/16`, `R50+ViT-B_16`, ...)
when the source carries no model config (a downloaded .npz). Each export gets
a JSON model card (model config, classes, resolution, step, metrics): beside a
file as `<out>.json`, inside an HF directory as `model_card.json`. A user error
prints one line and exits with status 1.
"""

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

from absl import flags

from vit_jax import checkpoint as ckpt
from vit_jax.models import registry

FORMATS = ('npz', 'timm', 'hf')

# A private flag registry: importing this module next to other entry points
# (main, predict) in one process must not clash on flag names.
FLAGS = flags.FlagValues()
flags.DEFINE_string('checkpoint', None, 'Training workdir, .npz file, '
                    'timm .safetensors file or HF ViT directory.',
                    flag_values=FLAGS)
flags.DEFINE_string('step', None, 'Step to export from a workdir: a number, '
                    '"best" (its best_checkpoint_metric), or the latest by '
                    'default.', flag_values=FLAGS)
flags.DEFINE_enum('format', None, list(FORMATS), 'Output format.',
                  flag_values=FLAGS)
flags.DEFINE_string('out', None, 'Output file (npz, timm) or directory (hf).',
                    flag_values=FLAGS)
flags.DEFINE_string('model', None, 'Model name (e.g. B/16, ViT-B_16, '
                    'R50+ViT-B_16), used only when the source carries no '
                    'model config.', flag_values=FLAGS)
flags.DEFINE_string('class_names', None, 'Text file with one class name per '
                    'line (default: from the source, if it has them).',
                    flag_values=FLAGS)
flags.DEFINE_list('image_size', None, 'Image size "H,W" or "S" (default: '
                  'from a square position-embedding grid).',
                  flag_values=FLAGS)


@dataclasses.dataclass
class Source:
  """A loaded checkpoint and what is known about it."""
  params: dict[str, Any]
  model_config: Optional[Any]
  step: Optional[int] = None
  metrics: Optional[dict[str, Any]] = None
  classes: Optional[list[str]] = None


def load_source(path: str, *, step: ckpt.StepChoice = None) -> Source:
  """Reads a workdir, npz, timm safetensors or HF directory for export."""
  path = os.fspath(path)
  if os.path.isdir(path) and ckpt.is_workdir(path):
    params, model_config, restored = ckpt.load_workdir(path, step)
    return Source(params, model_config, restored,
                  _workdir_metrics(path, restored))
  if step is not None:
    raise ckpt.CheckpointError('--step applies to training workdirs only; '
                               f'{path} is a single checkpoint')
  if os.path.isdir(path):
    params, model_config = ckpt.load_hf_dir(path)
    return Source(params, model_config, classes=ckpt.hf_dir_class_names(path))
  params, model_config = ckpt.load_checkpoint(path)
  card = ckpt.read_card(path)
  return Source(params, model_config, card.get('step'), card.get('metrics'),
                card.get('classes'))


def export(checkpoint: str, fmt: str, out: str, *,
           step: ckpt.StepChoice = None, model: Optional[str] = None,
           class_names: Optional[Sequence[str]] = None,
           image_size: Optional[Sequence[int]] = None) -> list[str]:
  """Exports `checkpoint` as `fmt` to `out`; returns the paths written.

  Raises CheckpointError / ValueError with a one-line message for user errors
  (unreadable source, missing model config, params that do not fit).
  """
  if fmt not in FORMATS:
    raise ValueError(f'unknown format {fmt!r}; known: {", ".join(FORMATS)}')
  source = load_source(checkpoint, step=step)
  model_config = _model_config(source, checkpoint, model)
  head_kernel = source.params.get('head', {}).get('kernel')
  num_classes = None if head_kernel is None else int(head_kernel.shape[-1])
  image_size = (tuple(image_size) if image_size is not None else
                ckpt.image_size_from_params(source.params, model_config))
  ckpt.check_params(source.params, model_config, num_classes=num_classes,
                    image_size=image_size)
  classes = list(class_names) if class_names is not None else source.classes
  if classes is not None and len(classes) != num_classes:
    raise ValueError(f'{len(classes)} class names for a head of '
                     f'{num_classes} classes')
  card = _card(checkpoint, fmt, source, model_config, num_classes, classes,
               image_size)
  if fmt == 'npz':
    ckpt.save_npz(source.params, out, metadata=card)
  elif fmt == 'timm':
    ckpt.save_timm_safetensors(source.params, model_config, out,
                               image_size=image_size, metadata=card)
  else:
    ckpt.save_hf_dir(source.params, model_config, out, classes,
                     image_size=image_size, metadata=card)
  return [out, ckpt.card_path(out)]


def _model_config(source: Source, checkpoint: str, model: Optional[str]):
  if source.model_config is not None:
    if model is not None:
      print(f'export: note: {checkpoint} carries its own model config; '
            f'--model={model} is not used', file=sys.stderr)
    return source.model_config
  if model is None:
    raise ValueError(f'{checkpoint} carries no model config; name the '
                     'architecture with --model (e.g. --model=B/16)')
  config = registry.get_model_config(model)
  pre_logits = source.params.get('pre_logits', {}).get('kernel')
  if pre_logits is not None and config.representation_size is None:
    # The released ImageNet-21k files keep the tanh representation layer.
    config.representation_size = int(pre_logits.shape[-1])
  return config


def _card(checkpoint, fmt, source, model_config, num_classes, classes,
          image_size) -> dict[str, Any]:
  config = (model_config.to_dict() if hasattr(model_config, 'to_dict')
            else dict(model_config))
  return {
      'source': os.path.abspath(checkpoint),
      'format': fmt,
      'model_config': config,
      'num_classes': num_classes,
      'classes': classes,
      'image_size': list(image_size),
      'patch_grid': list(ckpt.patch_grid(model_config, image_size)),
      'step': source.step,
      'metrics': source.metrics,
  }


def _workdir_metrics(workdir: str, step: Optional[int]
                     ) -> Optional[dict[str, Any]]:
  """The last metrics.jsonl record with an accuracy at or before `step`."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return None
  found = None
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A partly written last line of a running job.
      if not isinstance(record, dict):
        continue
      if step is not None and record.get('step', 0) > step:
        continue
      if any('accuracy' in k for k in record):
        found = record
  return found


def _read_class_names(path: str) -> list[str]:
  try:
    with open(path) as f:
      return [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise ValueError(f'--class_names: cannot read {path}: {e.strerror}'
                     ) from None


def _parse_image_size(values: Optional[Sequence[str]]
                      ) -> Optional[tuple[int, int]]:
  if values is None:
    return None
  try:
    sizes = [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--image_size must be "H,W" or "S", got '
                     f'{",".join(values)}') from None
  if len(sizes) not in (1, 2) or min(sizes) < 1:
    raise ValueError(f'--image_size must be "H,W" or "S", got '
                     f'{",".join(values)}')
  return (sizes[0], sizes[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command line; returns the process exit status."""
  argv = list(sys.argv if argv is None else argv)
  if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
    print(__doc__ + '\n' + FLAGS.get_help())
    return 0
  FLAGS.unparse_flags()  # main() may run more than once in one process.
  try:
    extra = FLAGS(argv)[1:]
  except flags.Error as e:
    print(f'export: error: {e}', file=sys.stderr)
    return 2
  missing = [f'--{n}' for n in ('checkpoint', 'format', 'out')
             if FLAGS[n].value is None]
  if missing or extra:
    problem = (f'missing {", ".join(missing)}' if missing else
               f'unexpected arguments {" ".join(extra)}')
    print(f'export: error: {problem} (see --help)', file=sys.stderr)
    return 2
  try:
    class_names = (_read_class_names(FLAGS.class_names)
                   if FLAGS.class_names else None)
    written = export(FLAGS.checkpoint, FLAGS.format, FLAGS.out,
                     step=ckpt.parse_step(FLAGS.step), model=FLAGS.model,
                     class_names=class_names,
                     image_size=_parse_image_size(FLAGS.image_size))
  except (ValueError, OSError) as e:  # CheckpointError is a ValueError.
    print(f'export: error: {_one_line(e)}', file=sys.stderr)
    return 1
  for path in written:
    print(f'wrote {path}')
  return 0


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


if __name__ == '__main__':
  sys.exit(main())
