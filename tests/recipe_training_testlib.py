"""Short training runs for the paper-recipe tests: a small CNN with BatchNorm on digits.

`train_digits_cnn(recipe)` trains `qtrain.models.LeNet(batch_norm=True)` on
scikit-learn digits (8×8×1, the seeded 80/20 split of `qtrain.data`) for ~100
steps and returns the held-out accuracy, the loss curve and the gradient of
the first batch at initialisation, so a test can assert both "close to
float32 on the same seed" and "the quantizers really ran" (gradients differ
from float).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qtrain
from qtrain import data as qdata
from qtrain import models
from qtrain import nnx_hooks
from qtrain.train import apply_recipe


@dataclasses.dataclass(frozen=True)
class Outcome:
  """accuracy: test accuracy in [0, 1]; losses: per-step training losses;
  init_grads: {param path: gradient} of the first batch at initialisation;
  model: the trained model (e.g. to read its `nnx_hooks.GradState`)."""
  accuracy: float
  losses: np.ndarray
  init_grads: dict
  model: object = dataclasses.field(default=None, compare=False, repr=False)


@functools.lru_cache(maxsize=None)
def digits_images():
  ds = qdata.load_digits(seed=0)
  shape = (-1, 8, 8, 1)
  return (ds.x_train.reshape(shape), ds.y_train, ds.x_test.reshape(shape), ds.y_test)


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def train_digits_cnn(recipe: qtrain.Recipe, *, steps: int = 100, seed: int = 0,
                     batch_size: int = 64, optimizer: optax.GradientTransformation | None = None,
                     width: int = 1) -> Outcome:
  """Trains LeNet+BatchNorm on digits with `recipe` for `steps` steps.

  Same init, batches and quantization keys for every recipe at one seed. The
  recipe's final phase (`float_last_steps`, `final_rules`) is honoured by
  re-applying `rules_at` when it starts; the recipe's `prepare_model` (e.g.
  WAGEUBN's BatchNorm swap and E1/E2 hooks) runs after every rule change
  (`qtrain.train.apply_recipe`).

  Args:
    recipe: the recipe under test (its rules, gradient and optimizer transforms).
    steps: training steps.
    seed: init, batch order and quantization-noise seed.
    batch_size: examples per step.
    optimizer: the base optimizer (default Adam 3e-3), wrapped by the recipe.
    width: LeNet width multiplier.

  Returns:
    Outcome.
  """
  xtr, ytr, xte, yte = digits_images()
  model = models.LeNet(10, 1, width=width, batch_norm=True, rngs=nnx.Rngs(seed))
  apply_recipe(model, recipe, 0, steps, rngs=nnx.Rngs(quant=seed + 1))
  tx = recipe.wrap_optimizer(optimizer if optimizer is not None else optax.adam(3e-3))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def train_step(model, opt, x, y):
    # Stateful backward quantizers: differentiate w.r.t. their GradState too
    # and write the new state back; the optimizer filters out the Params.
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx_hooks.GRAD_STATE_WRT))(
        model, x, y)
    nnx_hooks.apply_grad_state(model, grads)
    opt.update(model, grads, **(recipe.update_args(model) if recipe.update_args else {}))
    return loss

  step_fn = nnx.jit(train_step)
  rng = np.random.default_rng(seed)
  order = [rng.integers(0, len(xtr), batch_size) for _ in range(steps)]

  x0, y0 = jnp.asarray(xtr[order[0]]), jnp.asarray(ytr[order[0]])
  nnx_hooks.init_grad_state(_loss, model, x0, y0)
  grads = nnx.grad(_loss)(model, x0, y0)
  init_grads = {'/'.join(map(str, path)): np.asarray(v)
                for path, v in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
  # nnx.grad advanced the quant stream; that is the same for every recipe.

  losses = []
  final_start = steps - recipe.float_last_steps if recipe.float_last_steps else steps
  for step, idx in enumerate(order):
    if step == final_start:
      apply_recipe(model, recipe, step, steps)
      nnx_hooks.init_grad_state(_loss, model, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
      step_fn = nnx.jit(train_step)
    losses.append(float(step_fn(model, opt, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))))
  model.eval()
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(xte))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(yte)))
  return Outcome(accuracy=accuracy, losses=np.asarray(losses), init_grads=init_grads,
                 model=model)


def max_relative_grad_difference(a: Outcome, b: Outcome) -> float:
  """max over parameters of ‖g_a − g_b‖ / ‖g_b‖ of the initial gradients."""
  out = 0.0
  for k, gb in b.init_grads.items():
    ga = a.init_grads[k]
    denom = float(np.linalg.norm(gb)) or 1.0
    out = max(out, float(np.linalg.norm(ga - gb)) / denom)
  return out
