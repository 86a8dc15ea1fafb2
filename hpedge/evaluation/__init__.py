"""GenEval-style evaluation of the digits pipelines."""
