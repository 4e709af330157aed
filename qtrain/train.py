"""The training loop: one jit-compiled step for (task, model, recipe, optimizer).

`train(TrainConfig(...))` builds the task's model, applies the recipe
(`quantize_model` with `recipe.rules_at`, the recipe's gradient/optimizer
transforms and base optimizer), and trains for `epochs` epochs of seeded
batches, with:

* per-step quantization keys: every hook draws a fresh key from the model's
  'quant' stream each call, so step t's noise is a function of (seed, t) and
  the stream's counter is part of the checkpoint;
* evaluation on the test split after every epoch (`eval_every`);
* a tqdm progress bar (loss, metric, epoch);
* non-finite loss detection: training stops with `NonFiniteLossError` naming
  the first step whose loss was NaN/Inf (checked every `log_every` steps
  from the buffered losses, so the device is not synchronised every step);
* periodic atomic checkpoints (`qtrain.checkpoint`, orbax) and exact resume:
  a resumed run continues bit for bit (the data order is a function of
  (seed, epoch), the position within the epoch is the step);
* metrics as JSON lines (`metrics.jsonl`: one record per logged step and per
  evaluation) next to `config.json` in the output directory;
* data parallelism over the first `devices` local devices (batch split along
  the 'data' axis of a mesh, parameters replicated; per-tensor scales are
  global, as under any jit).

Examples:
  >>> from qtrain.train import TrainConfig, train
  >>> result = train(TrainConfig(task='digits', recipe='int8', epochs=1, limit=256),
  ...                progress=False)
  >>> 0.0 <= result.test_metric <= 1.0
  True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from qtrain import checkpoint as ckpt
from qtrain import data as qdata
from qtrain import nnx_hooks
from qtrain import recipes as recipe_registry
from qtrain import tasks as task_registry
from qtrain.model import quantize_model
from qtrain.recipe import Recipe

__all__ = ['TrainConfig', 'TrainResult', 'NonFiniteLossError', 'train', 'make_train_step',
           'evaluate', 'apply_recipe', 'resolve_lr', 'DEFAULT_LR', 'MODEL_DEFAULT_LR']


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; `step` is the first such step (0-based)."""

  def __init__(self, step: int, loss: float, recipe: str):
    self.step, self.loss = step, loss
    super().__init__(f'{recipe}: training loss is {loss} at step {step}; stopped. Lower the '
                     'learning rate or check the data and the quantizers of this recipe.')


def _positive_int(name: str, value, allow_zero: bool = False) -> None:
  lo = 0 if allow_zero else 1
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ValueError(f'{name}={value!r} must be an int >= {lo}.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """What to train and how (all of it is written to `config.json`).

  Attributes:
    task: a `qtrain.tasks` name.
    model: a zoo model fitting the task; None = the task's default.
    recipe: a registered recipe name (`qtrain.recipes.names()`).
    epochs: passes over the training split.
    batch_size: examples per step (divisible by `devices`).
    lr: learning rate of the base optimizer; None = the recipe's
      `default_lr` when it brings its own optimizer, else 3e-3 (Adam).
    seed: init, data order and quantization-noise seed.
    width: model size, None = the zoo default: CNNs' `width` (MobileNetV2's
      `width_mult`), transformers' d_model = 32·width.
    limit: use only the first `limit` training examples.
    eval_every: evaluate every this many epochs (the last epoch always).
    eval_batch_size: examples per evaluation step (the whole test split is
      evaluated, the last partial batch too).
    log_every: steps between metric records / non-finite checks.
    checkpoint_every: steps between checkpoints; 0 = at the end of every epoch.
    keep_checkpoints: how many checkpoints to keep.
    devices: local devices to split each batch over (data parallel).
    data_dir: extra directory to look for dataset files.
  """
  task: str = 'digits'
  model: str | None = None
  recipe: str = 'fp32'
  epochs: int = 5
  batch_size: int = 64
  lr: float | None = None
  seed: int = 0
  width: int | None = None
  limit: int | None = None
  eval_every: int = 1
  eval_batch_size: int = 256
  log_every: int = 10
  checkpoint_every: int = 0
  keep_checkpoints: int = 2
  devices: int = 1
  data_dir: str | None = None

  def __post_init__(self):
    task = task_registry.get(self.task)
    if self.model is None:
      object.__setattr__(self, 'model', task.default_model)
    task.check_model(self.model)
    # Unknown names list the registered ones; post-training recipes are refused.
    recipe_registry.info(self.recipe).check_trainable()
    for name in ('epochs', 'batch_size', 'eval_every', 'eval_batch_size', 'log_every',
                 'keep_checkpoints', 'devices'):
      _positive_int(name, getattr(self, name))
    _positive_int('checkpoint_every', self.checkpoint_every, allow_zero=True)
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f'seed={self.seed!r} must be an int >= 0.')
    if self.lr is not None and not (isinstance(self.lr, (int, float)) and
                                    math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f'lr={self.lr!r} must be None or a positive finite number.')
    if self.width is not None:
      _positive_int('width', self.width)
    if self.limit is not None:
      _positive_int('limit', self.limit)
    if self.devices > jax.local_device_count():
      raise ValueError(f'devices={self.devices} but only {jax.local_device_count()} local '
                       'devices exist.')
    if self.batch_size % self.devices:
      raise ValueError(f'batch_size={self.batch_size} must be divisible by '
                       f'devices={self.devices}.')


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """The outcome of one run.

  Attributes:
    config: the TrainConfig.
    test_metric: the task metric on the test split after the last epoch.
    test_loss: mean test loss then.
    final_loss: mean training loss over the last logged window.
    losses: (step, mean training loss) per logged window.
    evals: one dict per evaluation (epoch, step, test_metric, test_loss).
    steps: optimizer steps taken in total.
    seconds: wall time of this call (compilation included).
    resumed_from: the checkpoint step this call started from, or None.
    model: the trained model (eval mode), e.g. for `qtrain.checkpoint.export_packed`.
  """
  config: TrainConfig
  test_metric: float
  test_loss: float
  final_loss: float
  losses: tuple[tuple[int, float], ...]
  evals: tuple[dict, ...]
  steps: int
  seconds: float
  resumed_from: int | None = None
  model: Any = dataclasses.field(default=None, repr=False, compare=False)


def make_train_step(loss_fn, *, update_args=None):
  """An `nnx.jit` step (model, optimizer, batch) -> (loss, correct, counted).

  `loss_fn(model, batch) -> (loss, (correct, counted))`; the gradient is taken
  with respect to the optimizer's `wrt` variables (nnx.Param). A model with
  stateful backward quantizers (`qtrain.nnx_hooks.GradState`) is also
  differentiated w.r.t. its GradState variables, whose "gradients" (the new
  per-layer states) are written back into the model; the optimizer sees only
  the Params. Missing GradStates are created before the first step from the
  batch's shapes (`nnx_hooks.init_grad_state`), outside jit. `update_args`
  (a recipe's `Recipe.update_args`) maps the model, after that write, to
  extra keyword arguments of `optimizer.update` (UI8's per-layer deviations).
  """

  @nnx.jit
  def train_step(model, optimizer, batch):
    if nnx_hooks.has_grad_state(model):  # static: the model's structure
      wrt = nnx.DiffState(0, nnx_hooks.GRAD_STATE_WRT)
      (loss, (correct, count)), grads = nnx.value_and_grad(
          loss_fn, argnums=wrt, has_aux=True)(model, batch)
      nnx_hooks.apply_grad_state(model, grads)
    else:
      (loss, (correct, count)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    extra = update_args(model) if update_args is not None else {}
    optimizer.update(model, grads, **extra)  # filters its own `wrt` (Params) out of grads
    return loss, correct, count

  def step(model, optimizer, batch):
    if nnx_hooks.missing_grad_state(model):
      nnx_hooks.init_grad_state(loss_fn, model, batch)
    return train_step(model, optimizer, batch)

  return step


def evaluate(model, loss_fn, parts, batch_size: int, sharding=None) -> tuple[float, float]:
  """(metric, mean loss) of `model` (eval mode) on `parts`, in batches.

  The last partial batch is evaluated too (one extra compilation).
  """
  eval_step = _jitted(loss_fn)
  model.eval()
  correct = count = 0
  loss_sum = 0.0
  n = len(parts[0])
  for start in range(0, n, batch_size):
    batch = tuple(p[start:start + batch_size] for p in parts)
    shard = sharding if len(batch[0]) % _num_shards(sharding) == 0 else None
    loss, (c, k) = eval_step(model, task_registry.device_batch(batch, shard))
    correct += int(c)
    count += int(k)
    loss_sum += float(loss) * int(k)
  model.train()
  return correct / max(count, 1), loss_sum / max(count, 1)


@functools.lru_cache(maxsize=None)
def _jitted(loss_fn):
  # One jitted eval function per loss: nnx.jit retraces by itself when the
  # model's structure changes (e.g. rules switched for the final phase).
  return nnx.jit(loss_fn)


def _num_shards(sharding) -> int:
  return 1 if sharding is None else len(sharding.device_set)


def _prepare_out_dir(out_dir: str | None, overwrite: bool, resume: bool) -> None:
  if out_dir is None:
    return
  if os.path.exists(out_dir) and os.listdir(out_dir):
    if resume:
      return
    if not overwrite:
      raise FileExistsError(f'output directory {out_dir} exists and is not empty; pass '
                            'overwrite=True (--overwrite) to replace it or resume=True '
                            '(--resume) to continue its run.')
    shutil.rmtree(out_dir)
  os.makedirs(out_dir, exist_ok=True)


def _truncate_metrics(path: str, step: int) -> None:
  """Drops records written after checkpoint `step` by the interrupted run."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    kept = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(kept)


# Adam's learning rate when neither the user nor the recipe gives one.
DEFAULT_LR = 3e-3


# Models whose pretrained weights a fresh-training LR would wreck: Adam at
# 3e-3 sends a MiniLM fine-tune to the majority class (24.8 % on
# fortunes_topics, 512 examples, 1 epoch) where 1e-4 reaches 59 %.
MODEL_DEFAULT_LR = {'minilm': 1e-4}


def resolve_lr(recipe: Recipe, lr: float | None, model: str | None = None) -> float:
  """`lr`, else the recipe's `default_lr` for its own optimizer, else the model's
  fine-tuning LR (`MODEL_DEFAULT_LR`), else `DEFAULT_LR`."""
  if lr is not None:
    return lr
  if recipe.optimizer is not None and recipe.default_lr is not None:
    return recipe.default_lr
  return MODEL_DEFAULT_LR.get(model, DEFAULT_LR)


def _base_optimizer(recipe: Recipe, lr: float) -> optax.GradientTransformation:
  return recipe.optimizer(lr) if recipe.optimizer is not None else optax.adam(lr)


def apply_recipe(model, recipe: Recipe, step: int, total: int, rngs: nnx.Rngs | None = None):
  """Installs `recipe.rules_at(step, total)` on `model`, then `recipe.prepare_model`."""
  quantize_model(model, recipe.rules_at(step, total), rngs=rngs)
  if recipe.prepare_model is not None:
    recipe.prepare_model(model)


def _model_overrides(config: TrainConfig) -> dict[str, Any]:
  if config.width is None:
    return {}
  key = {'mobilenetv2': 'width_mult', 'transformer_lm': 'd_model',
         'seq2seq': 'd_model'}.get(config.model, 'width')
  if key == 'd_model':
    return {key: 32 * config.width}
  return {key: config.width}


def train(config: TrainConfig, *, out_dir: str | None = None,
          task_data: task_registry.TaskData | None = None, recipe: Recipe | None = None,
          overwrite: bool = False, resume: bool = False, save_checkpoints: bool = True,
          progress: bool = True) -> TrainResult:
  """Trains one (task, model, recipe, seed) and evaluates it.

  Args:
    config: the run's TrainConfig.
    out_dir: where `config.json`, `metrics.jsonl` and `checkpoints/` go; None
      = nothing written (and no checkpoints).
    task_data: already loaded data of `config.task` (reused across runs by
      `compare`); None = load it.
    recipe: use this Recipe instead of the registry's `config.recipe` (e.g.
      with changed options); its name is recorded.
    overwrite: replace a non-empty `out_dir`.
    resume: continue from the latest checkpoint in `out_dir` (the config
      must be the same); without one, start fresh.
    save_checkpoints: write checkpoints to `out_dir/checkpoints` (False:
      metrics only, e.g. for the many short runs of `compare`).
    progress: show a progress bar.

  Returns:
    TrainResult.

  Raises:
    NonFiniteLossError: the training loss became NaN/Inf (names the step).
    FileExistsError: `out_dir` is not empty and neither overwrite nor resume.
    ValueError: a config that does not match the checkpoint being resumed.
  """
  start_time = time.perf_counter()
  task = task_registry.get(config.task)
  recipe = recipe if recipe is not None else recipe_registry.get(config.recipe)
  data = task_data if task_data is not None else task.load(
      data_dir=config.data_dir, seed=config.seed, limit=config.limit)
  steps_per_epoch = data.num_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {data.num_train} '
                     'training examples.')
  total = steps_per_epoch * config.epochs
  recipe.float_at(0, total)  # validates float_last_steps against the run length

  _prepare_out_dir(out_dir, overwrite, resume)
  ckpt_dir = os.path.join(out_dir, 'checkpoints') if out_dir and save_checkpoints else None
  metrics_path = os.path.join(out_dir, 'metrics.jsonl') if out_dir else None
  lr = resolve_lr(recipe, config.lr, config.model or task.default_model)
  config_record = {**dataclasses.asdict(config), 'recipe': recipe.name, 'lr': lr}
  start = ckpt.latest_step(ckpt_dir) if (resume and ckpt_dir and os.path.isdir(ckpt_dir)) else None
  if out_dir:
    config_path = os.path.join(out_dir, 'config.json')
    if start is not None and os.path.exists(config_path):
      with open(config_path, encoding='utf-8') as f:
        saved = json.load(f)
      if saved != json.loads(json.dumps(config_record)):
        raise ValueError(f'cannot resume {out_dir}: its config.json differs from this config '
                         f'({saved} vs {config_record}).')
    with open(config_path, 'w', encoding='utf-8') as f:
      json.dump(config_record, f, indent=2)

  model = task.create_model(config.model, data, rngs=nnx.Rngs(config.seed),
                            **_model_overrides(config))
  step = start or 0
  apply_recipe(model, recipe, min(step, total - 1), total, rngs=nnx.Rngs(quant=config.seed + 1))
  # Stateful backward quantizers: create their state now, so that it is
  # replicated below and a checkpoint can be restored into it.
  nnx_hooks.init_grad_state(task.loss, model,
                            tuple(p[:config.batch_size] for p in data.train))
  optimizer = nnx.Optimizer(model, recipe.wrap_optimizer(_base_optimizer(recipe, lr)),
                            wrt=nnx.Param)

  batch_sharding = None
  if config.devices > 1:
    mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:config.devices]), ('data',))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for obj in (model, optimizer):
      nnx.update(obj, jax.device_put(nnx.state(obj), replicated))

  evals: list[dict] = []
  losses: list[tuple[int, float]] = []
  if start is not None:
    ckpt.restore_checkpoint(ckpt_dir, model, optimizer, step=start)
    extra = ckpt.read_extra(ckpt_dir, start) or {}
    evals = list(extra.get('evals', []))
    losses = [tuple(x) for x in extra.get('losses', [])]
  if resume and metrics_path:
    # Records of the interrupted run after its last checkpoint (all of them
    # when it never wrote one) are written again by this run.
    _truncate_metrics(metrics_path, start or 0)

  train_step = make_train_step(task.loss, update_args=recipe.update_args)
  final_start = total - recipe.float_last_steps if recipe.float_last_steps else None
  pending: list[tuple[int, jax.Array]] = []
  metric_window = [0, 0]

  def log(record: dict) -> None:
    if metrics_path:
      with open(metrics_path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')

  def flush(bar) -> None:
    if not pending:
      return
    values = np.asarray(jax.device_get([l for _, l in pending]), np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise NonFiniteLossError(pending[bad[0]][0], float(values[bad[0]]), recipe.name)
    last_step = pending[-1][0]
    mean = float(values.mean())
    losses.append((last_step + 1, mean))
    record = {'step': last_step + 1, 'epoch': last_step // steps_per_epoch, 'loss': mean,
              'train_metric': float(metric_window[0]) / max(int(metric_window[1]), 1),
              'seconds': round(time.perf_counter() - start_time, 3)}
    log(record)
    test = {'test': f'{evals[-1]["test_metric"]:.4f}'} if evals else {}
    bar.set_postfix(loss=f'{mean:.4f}', **test, refresh=False)
    pending.clear()
    metric_window[:] = [0, 0]

  bar = tqdm(total=total, initial=step, disable=not progress, leave=False,
             desc=f'{recipe.name}/{config.model}/s{config.seed}')
  try:
    for epoch in range(step // steps_per_epoch, config.epochs):
      skip = step - epoch * steps_per_epoch
      for i, idx in enumerate(qdata.batch_indices(data.num_train, config.batch_size,
                                                  seed=config.seed, epoch=epoch)):
        if i < skip:
          continue
        if step == final_start:
          apply_recipe(model, recipe, step, total)
          train_step = make_train_step(task.loss, update_args=recipe.update_args)
        parts = tuple(p[idx] for p in data.train)
        loss, correct, count = train_step(model, optimizer,
                                          task_registry.device_batch(parts, batch_sharding))
        pending.append((step, loss))
        metric_window[0] += correct
        metric_window[1] += count
        step += 1
        bar.update(1)
        if len(pending) >= config.log_every:
          flush(bar)
        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
          flush(bar)
          if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            metric, test_loss = evaluate(model, task.loss, data.test, config.eval_batch_size,
                                         batch_sharding)
            record = {'step': step, 'epoch': epoch, 'test_metric': metric,
                      'test_loss': test_loss}
            evals.append(record)
            log({**record, 'eval': True})
            bar.set_postfix(loss=f'{losses[-1][1]:.4f}', test=f'{metric:.4f}', refresh=False)
        if ckpt_dir and ((config.checkpoint_every and step % config.checkpoint_every == 0)
                         or (not config.checkpoint_every and epoch_end)):
          flush(bar)
          ckpt.save_checkpoint(ckpt_dir, step, model, optimizer, keep=config.keep_checkpoints,
                               overwrite=True,
                               extra={'evals': evals, 'losses': [list(x) for x in losses]})
    flush(bar)
  finally:
    bar.close()

  model.eval()
  last = evals[-1] if evals else {'test_metric': float('nan'), 'test_loss': float('nan')}
  return TrainResult(config=config, test_metric=last['test_metric'], test_loss=last['test_loss'],
                     final_loss=losses[-1][1] if losses else float('nan'),
                     losses=tuple(losses), evals=tuple(evals), steps=step,
                     seconds=time.perf_counter() - start_time, resumed_from=start,
                     model=model)
