"""Problems to train on: synthetic math generators, user data sets, prompt rendering."""
from grpo_scale.tasks.prompts import DEFAULT_SYSTEM_PROMPT, render_prompt
from grpo_scale.tasks.synthetic import LEVELS, TASKS, ProblemStream, format_poly, make_eval_set

__all__ = ["DEFAULT_SYSTEM_PROMPT", "LEVELS", "TASKS", "ProblemStream", "format_poly", "make_eval_set",
           "render_prompt"]
