"""The native FTRL reward under verl's ``compute_score`` contract (``reward.custom_reward_function``).

verl's reward manager calls ``compute_score(data_source=, solution_str=, ground_truth=,
extra_info=, **reward_kwargs)`` once per sampled turn. Here it becomes exactly the native call
``ftrl.reward.score_response(response, sample, variant, compat, timeout, parser)``:

* the sample is the snapshot's ``codes`` / ``unsolved_set`` (JSON strings) / ``solve_rate`` /
  ``answer`` (and, for stateful tau-bench rows, ``state`` and ``messages``) that ``ftrl.train.verl_backend`` put into ``extra_info`` (``ground_truth`` is the
  answer too, used when ``extra_info`` lacks it);
* the response is the text the agent loop decoded *with* special tokens
  (``extra_info["ftrl_response_text"]``), as the native trainer decodes it. verl's naive manager
  decodes with ``skip_special_tokens=True``; its ``solution_str`` is used only when the row did not
  come through our agent loop;
* ``variant``/``compat``/``parser``/``timeout`` arrive as ``reward.custom_reward_function.reward_kwargs``.

It returns the score with the parts that explain it (verl logs them as reward extra info).

    python -c "from ftrl.train.verl_reward import compute_score; help(compute_score)"
    python -m pytest tests/test_verl_backend.py -q -k reward
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ftrl.reward import score_response
from ftrl.train.verl_backend import RESPONSE_TEXT_KEY, STATE_KEY


def sample_from_extra_info(extra_info: Mapping[str, Any] | None, ground_truth: Any = None) -> dict[str, Any]:
    """The reward sample (reference fields) a verl row carries in ``extra_info``."""
    info = dict(extra_info or {})
    missing = [key for key in ("codes", "unsolved_set") if key not in info]
    if missing:
        raise KeyError(f"verl extra_info lacks {missing} (rows must be written by "
                       f"ftrl.train.verl_backend.verl_row); has {sorted(info)}")
    answer = info.get("answer")
    if answer is None and ground_truth is not None:
        answer = str(ground_truth)
    if answer is None:
        raise KeyError("verl row has no answer (extra_info.answer / reward_model.ground_truth); rows must be written "
                       "by ftrl.train.verl_backend.verl_row, which refuses snapshots without one")
    sample = {"codes": info["codes"], "unsolved_set": info["unsolved_set"], "solve_rate": info.get("solve_rate", 0.0),
              "answer": answer}
    if info.get(STATE_KEY):
        # Stateful (tau-bench): the reward replays the snapshot's history on its initial state.
        if not info.get("messages"):
            raise KeyError("stateful verl row has a state but no extra_info.messages to replay")
        sample[STATE_KEY] = info[STATE_KEY]
        sample["messages"] = info["messages"]
    return sample


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    variant: str = "solve_f1",
    compat: str = "ftrl",
    parser: str = "qwen",
    timeout: float = 10.0,
    max_output_chars: int | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Score one sampled turn with the native reward; ``score`` is what verl trains on.

    ``max_output_chars``: the run's tool-output cut (``ftrl.envs.sandbox.tool_output_limit``), applied
    to this worker's sandbox as the native run applies it to its own.
    """
    del data_source, kwargs  # the scenario does not change the reward; verl adds keys of its own
    if max_output_chars is not None:
        from ftrl.envs.sandbox import configure_sandbox

        configure_sandbox(max_output_chars=int(max_output_chars))  # rebuilds the sandbox only when it changes
    sample = sample_from_extra_info(extra_info, ground_truth)
    decoded = (extra_info or {}).get(RESPONSE_TEXT_KEY)
    response = decoded if isinstance(decoded, str) else solution_str
    result = score_response(response, sample, variant=variant, compat=compat, timeout=float(timeout), parser=parser)
    return {
        "score": float(result.score),
        "tool_calls": float(result.calls),
        "solved": float(result.solved),
        "malformed": float(result.malformed),
        "empty": float(result.empty),
        "answered": float(result.answered),
    }
