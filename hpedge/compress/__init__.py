"""HierarchicalPrune: contribution analysis, position-aware planning, PWP, SGDistill, distillation."""
