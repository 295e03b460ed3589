"""Evaluation: base vs fine-tuned with the same prompts, template and decoding, through vLLM.

compare.py  side-by-side answers on a few prompts (`lorapipe compare`)
stage.py    the `eval` stage: executed pass@1/pass@k, format adherence, stop rate, held-out loss, report
tasks.py    task sets (held-out, HumanEval, user files), answer -> program, pass@k
sandbox.py  running untrusted generated code
report.py   plots and report.html
"""

from lorapipe.evaluate.compare import CompareResult, compare
from lorapipe.evaluate.stage import EvalResult, run

__all__ = ["CompareResult", "EvalResult", "compare", "run"]
