"""The paper recipes, one module per paper (`qtrain.recipes.papers.luq`, ...).

Each module defines its recipe function (re-exported as `qtrain.recipes.luq`,
`qtrain.recipes.ultra_low`, ...), registers it, and holds the recipe's parts
(per-layer configs, schedules, model preparation). This package imports
nothing itself: the function names would shadow the module names.
"""
