"""YAML fine-tuning recipes: the schema, loading with line numbers, and checking against the model."""

from .check import check, plan_phases
from .load import Problem, RecipeError, load, loads
from .schema import Recipe

__all__ = ["Problem", "Recipe", "RecipeError", "check", "load", "loads", "plan_phases"]
