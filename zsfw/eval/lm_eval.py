"""Run an lm-eval task file on a (compressed) model through lm-eval's ``HFLM``.

Tasks whose data lives on the Hugging Face hub cannot run on a machine without internet; a task
YAML that reads local files (``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``)
works anywhere. Needs the ``lm-eval`` package (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from zsfw.errors import EvaluationError


def run_task(model: nn.Module, tokenizer: Any, task_yaml: str | Path, limit: int | None = None,
             batch_size: int = 1) -> dict[str, dict[str, Any]]:
    """Metrics per task of the task(s) defined in ``task_yaml`` (lm-eval's results dict)."""
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvaluationError("--lm-eval needs the lm-eval package: pip install -e '.[eval]'") from e
    path = Path(task_yaml)
    if not path.is_file():
        raise EvaluationError(f"lm-eval task file {str(path)!r} does not exist")
    task = (yaml.safe_load(path.read_text()) or {}).get("task")
    if not task:
        raise EvaluationError(f"{str(path)!r} has no 'task:' name; it must be an lm-eval task YAML")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = evaluator.simple_evaluate(model=lm, tasks=[task], limit=limit,
                                        task_manager=TaskManager(include_path=str(path.parent)))
    return results["results"]
