"""Rules by module path: first match wins, op-kind filters, validation, report text."""

import pytest

import qtrain
from qtrain.rules import QuantizationReport, QuantRule, match_rule


def test_first_match_wins_and_none_keeps_float():
  cfg = qtrain.presets.int8()
  rules = (QuantRule(module_path='conv0|head', config=None), QuantRule(config=cfg))
  assert match_rule(rules, 'conv0', 'conv') == (0, rules[0])
  assert match_rule(rules, 'head', 'linear')[1].config is None
  assert match_rule(rules, 'blocks/1/mlp', 'linear') == (1, rules[1])


def test_fullmatch_not_search():
  rule = QuantRule(module_path='mlp', config=qtrain.presets.int8())
  assert rule.matches('mlp', 'linear')
  assert not rule.matches('blocks/0/mlp', 'linear')
  assert QuantRule(module_path='.*mlp').matches('blocks/0/mlp', 'linear')


def test_op_kinds_filter_and_attention_opt_in():
  any_kind = QuantRule(config=qtrain.presets.int8())
  assert any_kind.matches('x', 'linear') and any_kind.matches('x', 'conv')
  assert not any_kind.matches('x', 'attention')  # attention matmuls only when named
  conv_only = QuantRule(op_kinds=('conv',))
  assert conv_only.matches('x', 'conv') and not conv_only.matches('x', 'linear')
  assert QuantRule(op_kinds='attention').matches('attn', 'attention')


def test_no_rule_matches():
  assert match_rule((QuantRule(module_path='a'),), 'b', 'linear') is None


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(module_path='conv[0'), ValueError, 'module_path'),
    (dict(module_path=3), TypeError, 'module_path'),
    (dict(config='int8'), TypeError, 'config'),
    (dict(op_kinds=('matmul',)), ValueError, 'op_kinds'),
])
def test_validation_names_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    QuantRule(**kwargs)


def test_rules_are_hashable_and_frozen():
  rule = QuantRule(module_path='a', config=qtrain.presets.int4())
  assert hash(rule) == hash(QuantRule(module_path='a', config=qtrain.presets.int4()))
  with pytest.raises(AttributeError):
    rule.module_path = 'b'


def test_report_text_lists_everything():
  report = QuantizationReport(quantized=[('dense', 'linear', 1)],
                              kept_float=[('head', 'linear', 'rule 0 (config=None)')],
                              unused_rules=[2], unsupported=[('up', 'ConvTranspose', 'no hook')])
  text = str(report)
  for needle in ('dense [linear] <- rule 1', 'head [linear]', 'matched nothing: [2]',
                 'ConvTranspose', 'no hook'):
    assert needle in text
