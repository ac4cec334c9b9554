"""What every stage script shares: the validated params, timing, the MLflow run, condition sets, model loading.

Every stage starts with `params()`, which validates the *whole* params file (every section, every GRPO
variant, the cross-section checks), and runs its `main` through `run_stage`, which turns a params error
into one line on stderr and exit status 2, before any work.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stages run as scripts from a checkout, installed or not

from argrpo import tracking  # noqa: E402
from argrpo.conditions import ConditionSet, load_condition_set  # noqa: E402
from argrpo.config import ConfigError, read_params  # noqa: E402
from argrpo.families import build_policy  # noqa: E402
from argrpo.files import write_json_atomic  # noqa: E402
from argrpo.grpo import NonFiniteError  # noqa: E402
from argrpo.params import Params, parse_params  # noqa: E402
from argrpo.policy import Policy  # noqa: E402

PARAMS_FILE = Path("params.yaml")
BASE_DIR = Path("models/base")
JUDGE_DIR = Path("models/judge")
PROMPTS_FILES = {"train": Path("data/prompts_train.npz"), "eval": Path("data/prompts_eval.npz")}


def params() -> Params:
    """The whole params file, validated; a bad value raises ConfigError naming its dotted key."""
    return parse_params(read_params(PARAMS_FILE))


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main; a params error is one line on stderr and exit status 2, a run stopped for
    non-finite values one line and status 1, not a traceback."""
    try:
        main()
    except ConfigError as err:
        print(f"{PARAMS_FILE}: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def write_json(path: str | Path, data: dict) -> None:
    """Write a stage's JSON output atomically: a killed stage leaves the old file or none, never half of one."""
    write_json_atomic(path, data)


@contextmanager
def stage(name: str, logged_params: dict | None = None, run_name: str | None = None,
          resume_run_id: str | None = None) -> Iterator[tracking.StageRun]:
    """Time the stage into reports/timings/<name>.json and open its MLflow run (reopen `resume_run_id`)."""
    # small models on few cores: extra intra-op threads spin against each other and against other
    # processes (queued experiments, parallel stages) and cost far more than they give
    torch.set_num_threads(int(os.environ.get("ARGRPO_THREADS", "1")))
    start = time.perf_counter()
    with tracking.stage_run(name.split("@")[0], logged_params, run_name=run_name or name,
                            resume_run_id=resume_run_id) as run:
        yield run
        seconds = time.perf_counter() - start
        run.log_metrics({"stage_seconds": seconds})
    write_json(Path("reports/timings") / f"{name.replace('@', '_')}.json", {"stage": name, "seconds": seconds})


def base_paths() -> tuple[Path, Path]:
    """(network, tokenizer) files the pretrain stage recorded: trained here, or the files named in `weights`."""
    manifest = json.loads((BASE_DIR / "manifest.json").read_text())
    return Path(manifest["gpt"]["path"]), Path(manifest["vq"]["path"])


def condition_set(split: str) -> ConditionSet:
    """What the condition ids of `split` mean ("train": GRPO and pretraining; "eval": sampling and
    evaluation), as the prompts stage wrote it."""
    return load_condition_set(PROMPTS_FILES[split])


def load_policy(p: Params, weights: Path | None = None, device: torch.device | None = None,
                conditions: ConditionSet | None = None) -> Policy:
    """The base generator of the configured family as a policy over `conditions` (default: the training
    condition set) on `device` (default: the configured one), in eval mode; `weights` swaps in a fine-tuned
    network (a GRPO run's policy.pt)."""
    base_net, base_tokenizer = base_paths()
    conditions = conditions if conditions is not None else condition_set("train")
    return build_policy(p.model, weights or base_net, base_tokenizer, conditions, device)


def extractor(p: Params, side: str):
    """The feature extractor of one side for `ref_stats.features`: "eval" (FID, IS, precision / recall) or
    "reward" (LOO-FID).

    classifier: the judge stage's independent evaluation network, or its reward classifier;
    inception: the TorchScript Inception named in `weights.inception`, for both sides.
    """
    from argrpo.classifier import load_classifier
    from argrpo.features import ClassifierFeatures

    device = p.model.torch_device()
    if side == "reward" and p.ref_stats.reward_features == "torchvision_inception":
        from argrpo.features import TorchvisionInceptionFeatures
        from argrpo.weights import require_weights

        require_weights(p.weights, ["reward_inception"])
        return TorchvisionInceptionFeatures(p.weights.reward_inception, device=device)
    if p.ref_stats.features == "inception":
        from argrpo.inception import InceptionFeatures
        from argrpo.weights import require_weights

        require_weights(p.weights, ["inception"])
        return InceptionFeatures(p.weights.inception, device=device)
    network = {"eval": "eval_net.pt", "reward": "reward_classifier.pt"}[side]
    return ClassifierFeatures(load_classifier(JUDGE_DIR / network, device), device=device)


def preflight(p: Params, only: list[str] | None = None) -> None:
    """Fail in seconds, before any model is built, when a file the configuration needs is missing or wrong."""
    from argrpo.weights import model_shapes, needed_weights, require_weights

    needed = needed_weights(p.model.source, p.instance_rewards(), p.ref_stats.features, p.weights.ref_stats,
                            text_encoder=p.prompts.encoder if p.model.text_conditional else "",
                            scores=p.evaluate.scores, reward_features=p.ref_stats.reward_features)
    needed = [n for n in needed if only is None or n in only]
    if needed:
        require_weights(p.weights, needed, model_shapes(p.model.network(), p.model.tokenizer()), p.model.family)
