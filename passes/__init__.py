"""Rewrite rules, one file per operator family. RULES is the registry the plan and pass manager read."""
from graftc.passes.hyena import hyena_rules
from graftc.passes.linear_attention import linear_attention_rules
from graftc.passes.local_attention import local_attention_rules
from graftc.passes.mamba2 import mamba2_rules
from graftc.passes.mlp import mlp_rules
from graftc.passes.parallel import parallel_rules
from graftc.passes.self_graft import self_rules

RULES = (self_rules + mlp_rules + hyena_rules + local_attention_rules + linear_attention_rules + mamba2_rules
         + parallel_rules)
