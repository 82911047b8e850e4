"""Train the parameter-matched family side by side: the paper's central comparison at small scale.

Figures 3-4 and Table 10 of the paper compare T6 with MHA, MQA, GQA and MLA (and TPA-KVonly) at
equal attention-parameter budgets, trained identically.  This package does that for one size:
``members`` builds every member's TrainConfig (identical but for the model) and checks the data
they see, ``runner`` trains, resumes or skips them into one output directory, ``report`` writes
the table (``compare.md`` / ``compare.json``) and the loss curves (``loss_curves.png``), and
``cli`` is ``python -m tpa_jax.compare --size tiny --steps 600 ...``.
"""
from .members import MECHANISM_ORDER, SIZES, TASKS, CompareError, build_members, data_digests, describe_model
from .report import write_report
from .runner import run_comparison

__all__ = ["CompareError", "run_comparison", "build_members", "describe_model", "data_digests", "write_report",
           "MECHANISM_ORDER", "SIZES", "TASKS"]
