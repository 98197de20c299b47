"""Recipes: runnable pipelines over the components (data, train, evaluation, study), each driven
by a YAML config a user copies and edits."""
