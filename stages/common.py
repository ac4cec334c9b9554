"""What every stage script shares: its params section, timing, the MLflow run, model loading."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # stages run as scripts from a checkout, installed or not

from argrpo import tracking  # noqa: E402
from argrpo.checkpoints import load_gpt, load_vq  # noqa: E402
from argrpo.config import load_section, read_params  # noqa: E402
from argrpo.generator import ModelConfig  # noqa: E402
from argrpo.weights import WeightsConfig  # noqa: E402

PARAMS_FILE = Path("params.yaml")
BASE_DIR = Path("models/base")


def params() -> dict:
    return read_params(PARAMS_FILE)


def model_config(p: dict) -> ModelConfig:
    return load_section(ModelConfig, p.get("model"), "model")


def weights_config(p: dict) -> WeightsConfig:
    return load_section(WeightsConfig, p.get("weights"), "weights")


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def stage(name: str, logged_params: dict | None = None, run_name: str | None = None
          ) -> Iterator[tracking.StageRun]:
    """Time the stage into reports/timings/<name>.json and open its MLflow run."""
    # small models on few cores: extra intra-op threads spin against each other and against other
    # processes (queued experiments, parallel stages) and cost far more than they give
    torch.set_num_threads(int(os.environ.get("ARGRPO_THREADS", "1")))
    start = time.perf_counter()
    with tracking.stage_run(name.split("@")[0], logged_params, run_name=run_name or name) as run:
        yield run
        seconds = time.perf_counter() - start
        run.log_metrics({"stage_seconds": seconds})
    write_json(Path("reports/timings") / f"{name.replace('@', '_')}.json", {"stage": name, "seconds": seconds})


def base_paths() -> tuple[Path, Path]:
    """(GPT, VQ) checkpoints the pretrain stage recorded: trained here, or the files named in `weights`."""
    manifest = json.loads((BASE_DIR / "manifest.json").read_text())
    return Path(manifest["gpt"]["path"]), Path(manifest["vq"]["path"])


def load_base(cfg: ModelConfig, gpt_path: Path | None = None, device: torch.device | None = None):
    """(gpt, vq) on `device` (default: the configured one), in eval mode; `gpt_path` swaps in a tuned policy."""
    base_gpt, base_vq = base_paths()
    device = device or cfg.torch_device()
    gpt = load_gpt(gpt_path or base_gpt, cfg.gpt()).to(device)
    vq = load_vq(base_vq, cfg.vq()).to(device)
    return gpt, vq


JUDGE_DIR = Path("models/judge")


def extractors(p: dict, kind: str) -> tuple:
    """(evaluation extractor, reward-side extractor) for `ref_stats.features`.

    classifier: the judge stage's independent evaluation network and its reward classifier;
    inception: the TorchScript Inception named in `weights.inception`, for both.
    """
    from argrpo.classifier import load_classifier
    from argrpo.features import ClassifierFeatures

    device = model_config(p).torch_device()
    if kind == "inception":
        from argrpo.inception import InceptionFeatures
        from argrpo.weights import require_weights

        w = weights_config(p)
        require_weights(w, ["inception"])
        inception = InceptionFeatures(w.inception, device=device)
        return inception, inception
    return (ClassifierFeatures(load_classifier(JUDGE_DIR / "eval_net.pt", device), device=device),
            ClassifierFeatures(load_classifier(JUDGE_DIR / "reward_classifier.pt", device), device=device))


def preflight(p: dict, extra: list[str] | None = None) -> None:
    """Fail in seconds, before any model is built, when a file the configuration needs is missing or wrong."""
    from argrpo.weights import model_shapes, needed_weights, require_weights

    model = model_config(p)
    grpo = p.get("grpo") or {}
    rewards = set(grpo.get("rewards") or {})
    for variant in ((p.get("grpo_runs") or {}).get("variants") or {}).values():
        rewards |= set((variant or {}).get("rewards") or {})
    needed = needed_weights(model.source, sorted(rewards), (p.get("ref_stats") or {}).get("features", "classifier"),
                            weights_config(p).ref_stats)
    needed = [n for n in needed if extra is None or n in extra]
    if needed:
        require_weights(weights_config(p), needed, model_shapes(model.gpt(), model.vq()))
