"""The `online` option of objectives that can train on their own rollouts (`Objective.online`).

Online preference optimisation samples from the policy being trained instead of (only) a fixed offline set:
"Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data" (Tajwar et al. 2024, arXiv
2404.14367) finds on-policy sampling the main driver of the gains, and online / iterative DPO (Xiong et al.
2024, arXiv 2312.11456; Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", arXiv
2402.04792) refresh the pairs from the current policy during training. For code the judge is execution:
a task's problems are sampled and run in the sandbox, and the objective turns the judged samples into its
training rows (DPO: a passing sample as chosen, a failing one as rejected).

The loop (`train/rollouts.py`) draws one round of rollouts every `every` optimizer steps, with the weights of
that moment, and trains on that round's rows until the next round. Sampling follows the task's own settings
(`n_samples`, `temperature`, `max_new_tokens`), seeded per round.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator


class OnlineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: SerializeAsAny[BaseModel] = Field(
        description="a code task whose problems are sampled and judged by execution, e.g. {name: mbpp, split: train, "
        "n_samples: 4, temperature: 0.8} or {name: codetasks, path: FILE}; its sampling settings are used")
    every: int = Field(8, ge=1, description="optimizer steps trained on each round of rollouts before the next is drawn")
    problems_per_round: int = Field(16, ge=1, description="problems sampled per round (a seeded permutation of the task's problems, pass after pass)")
    per_problem: int = Field(1, ge=1, description="training rows per problem and round at most (distinct failing samples)")
    reference_chosen: bool = Field(
        True, description="where no sample passes, the problem's reference solution is the chosen answer "
        "(keeps the hard problems); false drops those problems")
    batch_size: int = Field(16, ge=1, description="generation batch size (rows decoded together)")

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, v: Any) -> Any:
        from tunelab.evaluate.tasks import TASKS

        return TASKS.parse(v, "objective.online.task")

    @field_validator("task")
    @classmethod
    def _judged_by_execution(cls, v: BaseModel) -> BaseModel:
        from tunelab.evaluate.tasks import TASKS

        task_cls = TASKS.get(v.name)  # type: ignore[attr-defined]
        if not task_cls.executes_code:
            raise ValueError(f"task '{v.name}' is not judged by execution; use a code task (mbpp, humaneval, codetasks)")  # type: ignore[attr-defined]
        return v
