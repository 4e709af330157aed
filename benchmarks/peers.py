"""qtrain's quantized train step vs float32 and vs the peers AQT and Qwix, in one run.

Models and timing come from benchmarks/train_step_cost.py (small CNN; pre-LN
transformer block; configs interleaved round-robin, median of `--repeats`
rounds of `--steps` steps). Ratios, not absolute times, are the result.

Target config (qtrain.presets.int8): INT8 per-tensor symmetric forward on
weights and activations with round-to-nearest; INT8 per-tensor backward with
stochastic rounding of the gradient in both backward GEMMs (dX and dW).

Each peer runs the closest config it can express; every deviation is printed.
  * Qwix (NNX, qwix.quantize_model + QtProvider/QtRule, per-tensor via
    disable_channelwise_axes, per-element uniform SR noise via
    channelwise_noise_axes). Its conv path has no stochastic rounding, so the
    CNN's convs use round-to-nearest gradients (its Linear head uses SR).
  * AQT (aqt.jax.v2, config.fully_quantized(8, 8, SR) as an NNX hook on the
    same NNX models; the key comes from an nnx.Rngs 'quant' stream like
    qtrain's own hooks, set via config.set_context as aqt_flax does). AQT's
    conv is forward-only fake quantization with per-channel scales (flax
    layout is asserted), backward float; dense layers are per-tensor.

Peers are optional: `pip install -e .[bench]`; a missing or incompatible one is
skipped with its reason.

    .venv/bin/python benchmarks/peers.py [--repeats 7 --steps 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_step_cost import CNN, Block, make_step  # noqa: E402

import qtrain  # noqa: E402

SEED_SR = 1


# --------------------------------------------------------------------------- peers

def _load_qwix():
  try:
    import qwix  # noqa: F401
    return qwix, None
  except Exception as e:  # ImportError or an incompatible jax/flax
    return None, f'{type(e).__name__}: {e}'


def _load_aqt():
  try:
    from aqt.jax.v2 import aqt_conv_general, config  # noqa: F401
    return (config, aqt_conv_general), None
  except Exception as e:
    return None, f'{type(e).__name__}: {e}'


def qwix_quantize(qwix, model, sample_x):
  # '.+': the Linear/Conv submodules, not the root, so attention's score/value matmuls
  # stay float as in qtrain (and its SR rng is not drawn inside dot_product_attention).
  rule = qwix.QtRule(module_path='.+', weight_qtype='int8', act_qtype='int8', bwd_qtype='int8',
                     bwd_stochastic_rounding='uniform',
                     disable_channelwise_axes=True,  # per-tensor scales
                     channelwise_noise_axes=tuple(range(8)))  # one noise value per element
  provider = qwix.QtProvider([rule])
  model = qwix.quantize_model(model, provider, sample_x,
                              rngs=nnx.Rngs(stochastic_rounding=SEED_SR))
  # quantize_model unsets the rngs after its init call; SR needs them during training.
  model.set_attributes(qwix_rngs=nnx.Rngs(stochastic_rounding=SEED_SR))
  return model


def aqt_dense_cfg(aqt_config):
  cfg = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8, use_stochastic_rounding=True)
  # per-tensor scales everywhere (AQT's default is per-channel along contraction axes)
  for raw in (cfg.fwd, cfg.dlhs, cfg.drhs):
    raw.dg_quantizer.lhs.calib_shared_axes = 'per_tensor'
    raw.dg_quantizer.rhs.calib_shared_axes = 'per_tensor'
  return cfg


def aqt_quantize(aqt_mods, model):
  aqt_config, aqt_conv_general = aqt_mods
  dense_cfg = aqt_dense_cfg(aqt_config)
  aqt_conv = aqt_conv_general.make_conv_general_dilated(
      aqt_conv_general.conv_general_dilated_make(2, lhs_bits=8, rhs_bits=8))

  def conv_dg(*args, out_sharding=None, **kwargs):  # flax passes out_sharding; AQT predates it
    return aqt_conv(*args, **kwargs)

  class AqtDot(nnx.Module):  # cfg lives in the closure, only the rng stream is state
    def __init__(self, rngs):
      self.rngs = rngs

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                 out_sharding=None):
      cfg = aqt_config.set_context(dense_cfg, self.rngs.quant(), train_step=None)
      return cfg(lhs, rhs, dimension_numbers, precision, preferred_element_type)

  rngs = nnx.Rngs(quant=SEED_SR)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Conv):
      module.conv_general_dilated = conv_dg
    elif isinstance(module, nnx.Linear):
      module.dot_general = nnx.data(AqtDot(rngs))
  return model


# --------------------------------------------------------------------------- checks

def _gemm_operand_dtypes(jaxpr, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      out.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars[:2])))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (list, tuple)) else [p]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          _gemm_operand_dtypes(sub.jaxpr, out)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          _gemm_operand_dtypes(sub, out)
  return out


def gemm_summary(model, x, y):
  """Counts the GEMMs (dot_general / conv) of forward+backward by operand dtypes."""
  graphdef, state = nnx.split(model)

  def grads(state):  # nnx.grad so that rng-stream updates (qwix, aqt hooks) stay legal
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    return nnx.grad(loss)(nnx.merge(graphdef, state))

  jaxpr = jax.make_jaxpr(grads)(state)
  gemms = _gemm_operand_dtypes(jaxpr.jaxpr, [])
  n_int8 = sum(all(d == 'int8' for d in ds) for _, ds in gemms)
  kinds = sorted({f'{p.replace("_general_dilated", "").replace("_general", "")}({",".join(ds)})'
                  for p, ds in gemms})
  return n_int8, len(gemms), kinds


# --------------------------------------------------------------------------- bench

def variants(name, model_cls, x, qwix, qwix_err, aqt_mods, aqt_err):
  """name -> (model_fn or None, note)."""
  out = {
      'fp32': (lambda rngs: model_cls(rngs=rngs), ''),
      'qtrain int8': (lambda rngs: qtrain.quantize_model(model_cls(rngs=rngs),
                                                         qtrain.presets.int8()),
                      'exact presets.int8 (per-tensor, RTN fwd, SR grad in dX and dW)'),
  }
  is_cnn = model_cls is CNN
  if qwix is None:
    out['qwix int8'] = (None, f'not installed / incompatible: {qwix_err}')
  else:
    note = ('convs: int8 fwd+bwd per-tensor but RTN gradients (qwix conv has no SR); '
            'head: exact' if is_cnn else 'same config (per-tensor, SR uniform per element)')
    out['qwix int8'] = (lambda rngs: qwix_quantize(qwix, model_cls(rngs=rngs), x), note)
  if aqt_mods is None:
    out['aqt int8'] = (None, f'not installed / incompatible: {aqt_err}')
  else:
    note = ('convs: int8 fwd fake-quant only, per-channel scales, float bwd '
            '(AQT conv has no quantized VJP); head: per-tensor, SR grad'
            if is_cnn else 'per-tensor, RTN fwd, SR on gradients (fully_quantized)')
    out['aqt int8'] = (lambda rngs: aqt_quantize(aqt_mods, model_cls(rngs=rngs)), note)
  return out


def bench(title, model_cls, x, y, repeats, steps, peers):
  print(f'\n{title}')
  vs = variants(title, model_cls, x, *peers)
  runners, notes, invalid, n_fp32 = {}, {}, set(), None
  for v, (fn, note) in vs.items():
    notes[v] = note
    if fn is None:
      continue
    try:
      n8, n, kinds = gemm_summary(fn(nnx.Rngs(0)), x, y)
      print(f'  check {v:<12} {n8}/{n} GEMMs (fwd+bwd) have int8 x int8 operands: '
            f'{" ".join(kinds)}')
      n_fp32 = n if v == 'fp32' else n_fp32
      if n_fp32 is not None and n < n_fp32:  # a backward GEMM vanished: some layer gets no grad
        invalid.add(v)
        notes[v] += (f' [INVALID step: {n} GEMMs vs {n_fp32} in fp32, so some layers get no '
                     'gradient; excluded from the target]')
      if v == 'qtrain int8' and model_cls is CNN:
        print('        (qtrain convs: int8 codes carried as float32 operands on CPU, '
              "int_carrier='auto', exact for int8; native int8 on GPU)")
      runners[v] = make_step(fn, None, x, y)  # config None: fn already quantized the model
    except Exception as e:  # a peer that breaks on this model is reported, not fatal
      notes[v] = f'FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}'
  times = {v: [] for v in runners}
  for _ in range(repeats):
    for v, run in runners.items():
      times[v].append(run(steps))
  base = statistics.median(times['fp32'])
  ratios = {}
  print(f"  {'config':<14}{'ms/step':>9}{'x fp32':>8}  notes")
  for v in vs:
    if v in times:
      med = statistics.median(times[v])
      ratios[v] = med / base
      print(f'  {v:<14}{1e3 * med:>9.2f}{med / base:>8.2f}  {notes[v]}')
    else:
      print(f'  {v:<14}{"-":>9}{"-":>8}  skipped: {notes[v]}')
  peer = {v: r for v, r in ratios.items() if v in ('qwix int8', 'aqt int8') and v not in invalid}
  if 'qtrain int8' in ratios and peer:
    best = min(peer, key=peer.get)
    met = ratios['qtrain int8'] <= peer[best]
    print(f'  qtrain overhead {ratios["qtrain int8"]:.2f} vs best peer {peer[best]:.2f} '
          f'({best}) -> target {"met" if met else "not met"}')
  else:
    print('  qtrain overhead: no peer ran -> target not evaluated')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  qwix, qwix_err = _load_qwix()
  aqt_mods, aqt_err = _load_aqt()
  from importlib.metadata import PackageNotFoundError, version

  def ver(p):
    try:
      return version(p)
    except PackageNotFoundError:
      return 'absent'
  print(f'jax {jax.__version__}, flax {ver("flax")}, qwix {ver("qwix")}, aqtp {ver("aqtp")}; '
        f'backend {jax.default_backend()}, {jax.devices()[0].device_kind}, '
        f'{platform.processor() or platform.machine()}')
  for lib, err in (('qwix', qwix_err), ('aqt', aqt_err)):
    if err:
      print(f'{lib}: not installed / incompatible: {err}')
  peers = (qwix, qwix_err, aqt_mods, aqt_err)
  k1, k2 = jax.random.split(jax.random.key(0))
  bench('small CNN (3 conv + linear), 28x28x1, batch 64', CNN,
        jax.random.normal(k1, (64, 28, 28, 1)), jax.random.randint(k2, (64,), 0, 10),
        args.repeats, args.steps, peers)
  bench('transformer block (d=128, 4 heads, MLP 4x), seq 64, batch 16', Block,
        jax.random.normal(k1, (16, 64, 128)), jax.random.randint(k2, (16,), 0, 10),
        args.repeats, args.steps, peers)


if __name__ == '__main__':
  main()
