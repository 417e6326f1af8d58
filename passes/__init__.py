"""Rewrite rules, one file per operator family. RULES is the registry the plan and pass manager read."""
from graftc.passes.mlp import mlp_rules
from graftc.passes.self_graft import self_rules

RULES = self_rules + mlp_rules
