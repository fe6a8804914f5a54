"""Runnable recipes: one module per recipe, each defines `recipe` (a pipeline.recipe.Recipe)."""
