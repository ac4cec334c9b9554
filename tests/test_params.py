"""Typed params: every bad value in any section is refused before any work, naming the dotted key and the value."""

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from argrpo.config import ConfigError, read_params
from argrpo.params import parse_params

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = read_params(ROOT / "params.yaml")

# (dotted key, bad value, what the message must say after "<key> ")
BAD = [
    ("distributed.nproc_per_node", 0, "must be >= 1, got 0"),
    ("distributed.nproc_per_node", 1.5, "must be an integer, got 1.5"),
    ("distributed.nproc_per_node", "2", "must be an integer, got '2'"),
    ("distributed.torchrun_args", "--standalone $(touch x)", "must be plain torchrun options"),
    ("distributed.torchrun_args", "--standalone; rm -rf /", "must be plain torchrun options"),
    ("distributed.torchrun_args", "--nnodes `id`", "must be plain torchrun options"),
    ("distributed.torchrun_args", 3, "must be a string, got 3"),
    ("distributed.gpus", 2, "is not a known parameter"),
    ("data.kind", "imagenet", "must be 'digits' or 'folder', got 'imagenet'"),
    ("data.image_size", 4, "must be >= 8, got 4"),
    ("data.image_size", "16px", "must be an integer, got '16px'"),
    ("data.holdout_fraction", 1.5, "must be in (0, 1), got 1.5"),
    ("data.holdout_fraction", "half", "must be a finite number, got 'half'"),
    ("data.max_per_class", -1, "must be >= 0, got -1"),
    ("data.seed", True, "must be an integer, got True"),
    ("data.roots", "x", "is not a known parameter"),
    ("model.gpt_preset", "GPT-Z", "must be one of"),
    ("model.vq_preset", "VQ-32", "must be one of"),
    ("model.family", "dalle", "must be one of llamagen, llamagen_t2i, var, got 'dalle'"),
    ("model.gpt_preset", "VAR-d16", "must be one of GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B, small, tiny for family "
                                    "llamagen, got 'VAR-d16'"),
    ("model.vq_preset", "VAR-VQVAE", "must be one of VQ-16, VQ-8, small, tiny, tiny-f16 for family llamagen"),
    ("model.cls_token_num", 0, "must be >= 1, got 0"),
    ("model.caption_dim", "wide", "must be an integer, got 'wide'"),
    ("model.image_size", 15, "must be divisible by the tokenizer's downsampling"),
    ("model.num_classes", 10.0, "must be an integer, got 10.0"),
    ("model.source", "hub", "must be 'embedded' or 'weights', got 'hub'"),
    ("model.device", "tpu", "must be auto, cpu or cuda, got 'tpu'"),
    ("model.precision", "fp16", "must be fp32 or bf16, got 'fp16'"),
    ("weights.clip_model", "hf-hub:laion/CLIP-ViT-L-14", "hub names would download"),
    ("weights.clip_model", "ViT-L-14/../x", "must name an open_clip architecture"),
    ("weights.gpt_preset", "GPT-Q", "must be one of"),
    ("weights.inception", None, "must be a string, got None"),
    ("weights.inception", 5, "must be a string, got 5"),
    ("weights.inception_path", "x", "is not a known parameter"),
    ("weights.t5_dir", 3, "must be a string, got 3"),
    ("weights.qwen_vl_dir", None, "must be a string, got None"),
    ("prompts.train", "coco", "must be classes, digits or a prompt file (.txt or .jsonl), got 'coco'"),
    ("prompts.eval", "prompts.csv", "must be classes, digits or a prompt file"),
    ("prompts.template", "a photo", "must contain {name} (the class name) and no {style}"),
    ("prompts.style_template", "a {name} in ink", "must contain {name} and {style}"),
    ("prompts.styles", ["ink", "ink"], "must not repeat a style"),
    ("prompts.eval_styles", [""], "must be non-empty strings"),
    ("prompts.styles", "ink", "must be a list, got 'ink'"),
    ("prompts.encoder", "clip", "must be one of stand_in, t5, got 'clip'"),
    ("prompts.feature_dtype", "bfloat16", "must be one of float16, float32"),
    ("prompts.batch_size", 0, "must be >= 1, got 0"),
    ("prompts.max_length", 16, "is not a known parameter"),
    ("pretrain.seed", -1, "must be >= 0, got -1"),
    ("pretrain.vq.steps", 0, "must be >= 1, got 0"),
    ("pretrain.vq.lr", "fast", "must be a finite number, got 'fast'"),
    ("pretrain.gpt.batch_size", 64.5, "must be an integer, got 64.5"),
    ("pretrain.gpt.lr", -0.001, "must be > 0, got -0.001"),
    ("pretrain.gpt.weight_decay", -1, "must be >= 0, got -1"),
    ("pretrain.gpt.epochs", 3, "is not a known parameter"),
    ("pretrain.vq", 3, "must be a mapping of keys to values, got 3"),
    ("judge.eval_seed", 1, "must differ from reward_seed, got 1"),
    ("judge.epochs", 0, "must be >= 1, got 0"),
    ("judge.lr", ".nan", "must be a finite number, got '.nan'"),
    ("judge.enabled", "yes please", "must be true or false, got 'yes please'"),
    ("judge.eval_holdout_fraction", 0, "must be in (0, 1), got 0"),
    ("ref_stats.features", "clip", "must be one of classifier, inception, got 'clip'"),
    ("ref_stats.batch_size", 0, "must be >= 1, got 0"),
    ("grpo.lr", "abc", "must be a finite number, got 'abc'"),
    ("grpo.lr", 0, "must be > 0, got 0"),
    ("grpo.lr", float("inf"), "must be a finite number, got inf"),
    ("grpo.lr", True, "must be a finite number, got True"),
    ("grpo.steps", True, "must be an integer, got True"),
    ("grpo.steps", 0, "must be >= 1, got 0"),
    ("grpo.group_size", 8.5, "must be an integer, got 8.5"),
    ("grpo.group_size", 1, "must be >= 2, got 1"),
    ("grpo.batch_classes", 0, "must be >= 1, got 0"),
    ("grpo.inner_epochs", 0, "must be >= 1, got 0"),
    ("grpo.micro_batch", -2, "must be >= 0 (0: the whole batch), got -2"),
    ("grpo.clip_eps", 0, "must be > 0, got 0"),
    ("grpo.kl_beta", -0.1, "must be >= 0, got -0.1"),
    ("grpo.reference", "moving", "must be one of ema, frozen, got 'moving'"),
    ("grpo.ref_ema_decay", 1.0, "must be in [0, 1), got 1.0"),
    ("grpo.ratio_level", "batch", "must be one of sequence, token, got 'batch'"),
    ("grpo.rewards", ["classifier"], "must be a mapping of keys to values"),
    ("grpo.rewards.classifer", 1.0, "is not a known reward; valid rewards:"),
    ("grpo.rewards.classifier", -1.0, "must be >= 0, got -1.0"),
    ("grpo.rewards.classifier", "one", "must be a finite number, got 'one'"),
    ("grpo.fid_advantage_weight", -2, "must be >= 0, got -2"),
    ("grpo.betas", [0.9], "has too few items"),
    ("grpo.betas", [0.9, 1.5], "must be two numbers in [0, 1)"),
    ("grpo.weight_decay", -0.01, "must be >= 0, got -0.01"),
    ("grpo.grad_clip", 0, "must be > 0, got 0"),
    ("grpo.precision", "fp8", "must be one of fp32, bf16, bf16_params, got 'fp8'"),
    ("grpo.checkpoint_every", 0, "must be >= 1, got 0"),
    ("grpo.parallel", "tp", "must be one of ddp, fsdp, got 'tp'"),
    ("grpo.max_consecutive_skips", 0, "must be >= 1, got 0"),
    ("grpo.clip_epsilon", 0.2, "is not a known parameter; valid keys of grpo:"),
    ("grpo.loo_fid.mode", "exact", "must be one of loo_batch, ema_loo, ema_scalar"),
    ("grpo.loo_fid.ema_beta", 1.0, "must be in [0, 1), got 1.0"),
    ("grpo.loo_fid.debias", "true", "must be true or false, got 'true'"),
    ("grpo.loo_fid.bootstrap_batches", 0, "must be >= 1, got 0"),
    ("grpo.loo_fid.emma_beta", 0.5, "is not a known parameter; valid keys of grpo.loo_fid:"),
    ("grpo.loo_fid.covariance", "full", "full is exact only for mode loo_batch"),
    ("grpo.loo_fid.bootstrap_weight", "half", "must be one of full, one_update"),
    ("grpo.surrogate", "max", "must be one of pessimistic, optimistic, got 'max'"),
    ("grpo.fid_term", "both", "must be one of joint, separate, got 'both'"),
    ("grpo.group_reduction", "median", "must be one of mean, sum, got 'median'"),
    ("grpo.ratio_dropout", "on", "must be true or false, got 'on'"),
    ("grpo.update_chunks", "g", "must be one of micro_batch, group_member, got 'g'"),
    ("grpo.entropy.controller", "pid", "must be one of accumulating, stateless, got 'pid'"),
    ("ref_stats.reward_features", "clip", "must be one of same, torchvision_inception, got 'clip'"),
    ("grpo.entropy.mode", "auto", "must be one of off, fixed, adaptive"),
    ("grpo.entropy.target", 1.5, "must be in (0, 1], got 1.5"),
    ("grpo.entropy.gain_k", -1, "must be >= 0, got -1"),
    ("grpo.entropy.max_coef", 1e-6, "must be >= min_coef"),
    ("grpo.sampling.temperature", 0, "must be > 0, got 0"),
    ("grpo.sampling.top_k", -1, "must be >= 0 (0 turns it off), got -1"),
    ("grpo.sampling.top_p", 0, "must be in (0, 1], got 0"),
    ("grpo.sampling.cfg_interval", -5, "must be >= -1"),
    ("grpo.sampling.cfg", 2.0, "is not a known parameter"),
    ("grpo.sampling.compile", "fast", "must be one of off, default, reduce-overhead, got 'fast'"),
    ("sample.compile", True, "must be one of off, default, reduce-overhead, got True"),
    ("grpo_runs.seeds", [], "must list at least one seed"),
    ("grpo_runs.seeds", [0, 0], "must not repeat a seed"),
    ("grpo_runs.seeds", [0, 1.5], "must be an integer, got 1.5"),
    ("grpo_runs.seeds", 3, "must be a list"),
    ("grpo_runs.variants", {}, "must name at least one variant"),
    ("grpo_runs.variants.loofid.fid_advantage_weight", -1, "must be >= 0, got -1"),
    ("grpo_runs.variants.loofid.group_size", 2.5, "must be an integer, got 2.5"),
    ("grpo_runs.variants.loofid.lr", "x", "must be a finite number, got 'x'"),
    ("grpo_runs.variants.loofid.loo_fid.mode", "exact", "must be one of loo_batch"),
    ("grpo_runs.variants.loofid.typo", 1, "is not a known parameter"),
    ("grpo_runs.variants.bad/name", {}, "must be named with letters, digits, - and _ only"),
    ("grpo_runs.extra", 1, "is not a known parameter"),
    ("reward_options.clip.scale", 0, "must be > 0, got 0"),
    ("reward_options.hpsv2.scale", "x5", "must be a finite number, got 'x5'"),
    ("reward_options.clip.sclae", 5, "is not a known parameter; valid keys of reward_options.clip: batch_size, scale"),
    ("reward_options.vlm_judge.mode", "chat", "must be one of generate, logits, got 'chat'"),
    ("reward_options.vlm_judge.judge", "pretty", "must be one of faithfulness, fake, weird, got 'pretty'"),
    ("reward_options.vlm_fake.max_attempts", 0, "must be >= 1, got 0"),
    ("reward_options.vlm_fake.judge", "weird", "is not a known parameter"),
    ("reward_options.vlm_faithfulness.dtype", "int8", "must be one of bfloat16, float16, float32, got 'int8'"),
    ("reward_options.maniqa.crops", 0, "must be >= 1, got 0"),
    ("reward_options.aesthetic.batch_size", 2.5, "must be an integer, got 2.5"),
    ("reward_options.loo_fid", {}, "is not a known parameter"),
    ("sample.num_images", 1, "must be >= 2, got 1"),
    ("sample.cfg_scale", 1.0, "must be > 1 (the guided row of the base model), got 1.0"),
    ("sample.temperature", -1, "must be > 0, got -1"),
    ("sample.top_p", 2, "must be in (0, 1], got 2"),
    ("sample.save_png", "all", "must be an integer, got 'all'"),
    ("evaluate.k", 0, "must be >= 1, got 0"),
    ("evaluate.is_splits", 2.0, "must be an integer, got 2.0"),
    ("evaluate.batch_sizes", 2, "is not a known parameter"),
    ("evaluate.scores", ["fid"], "must name scores among clip, hpsv2, aesthetic"),
    ("evaluate.scores", ["clip", "clip"], "must not repeat a score"),
]

# settings valid on their own that contradict another section
ACROSS = [
    ({"data.image_size": 32}, "data.image_size must equal model.image_size=16"),
    ({"model.num_classes": 12}, "model.num_classes must be 10 for data.kind digits, got 12"),
    ({"distributed.nproc_per_node": 3}, "grpo.batch_classes must be divisible by the number of processes (3"),
    ({"distributed.torchrun_args": "--nnodes 4", "distributed.nproc_per_node": 1},
     "grpo.batch_classes must be divisible by the number of processes (4"),
    ({"grpo_runs.variants.loofid.batch_classes": 5, "distributed.nproc_per_node": 2},
     "grpo_runs.variants.loofid.batch_classes must be divisible by the number of processes (2"),
    ({"judge.enabled": False}, "judge.enabled must be true when ref_stats.features or a GRPO reward is classifier"),
    ({"bogus_section": {}}, "bogus_section is not a known section"),
    # a model family takes its own presets, image size, prompts and sampling
    ({"model.family": "var", "model.gpt_preset": "GPT-B"}, "model.gpt_preset must be one of VAR-d16, VAR-d20, "
     "VAR-d24, VAR-d30, small, tiny for family var, got 'GPT-B'"),
    ({"model.family": "var", "model.vq_preset": "VQ-16"}, "model.vq_preset must be one of VAR-VQVAE, small, tiny "
     "for family var"),
    ({"model.family": "var", "model.vq_preset": "VAR-VQVAE"}, "model.image_size must be 256 for the multi-scale "
     "VQVAE preset VAR-VQVAE"),
    ({"model.family": "var", "grpo.sampling.cfg_interval": 3}, "grpo.sampling.cfg_interval must be -1 for "
     "model.family var (VAR guides every scale on its ramp), got 3"),
    ({"model.family": "llamagen_t2i"}, "prompts.train must be digits or a prompt file for model.family llamagen_t2i"),
    ({"prompts.eval": "digits"}, "prompts.eval must be classes for model.family llamagen"),
    ({"model.family": "llamagen_t2i", "prompts.train": "digits", "prompts.eval": "digits"},
     "model.caption_dim must be 64, the stand-in text encoder's width (prompts.encoder stand_in), got 2048"),
    ({"model.family": "llamagen_t2i", "model.caption_dim": 64, "prompts.train": "digits", "prompts.eval": "a.txt",
      "prompts.styles": ["ink"]},
     "prompts.styles must be empty for model.family llamagen_t2i"),
    ({"model.family": "llamagen_t2i", "model.caption_dim": 64, "prompts.train": "digits", "prompts.eval": "digits",
      "data.kind": "folder", "data.root": "images"}, "prompts.train must not be digits unless data.kind is digits"),
]


def test_a_family_is_chosen_by_params_alone():
    """The shipped embedded VAR and text-to-image params differ from the default only where they must."""
    var = parse_params(read_params(ROOT / "configs/embedded_var.yaml"))
    t2i = parse_params(read_params(ROOT / "configs/embedded_t2i.yaml"))
    assert (var.model.family, t2i.model.family, parse_params(DEFAULT).model.family) == ("var", "llamagen_t2i",
                                                                                         "llamagen")
    assert var.model.network().num_tokens == 30 and var.model.tokenizer().patch_nums == (1, 2, 3, 4)
    assert (t2i.model.gpt().model_type, t2i.model.gpt().cls_token_num, t2i.prompts.train) == ("t2i", 8, "digits")
    assert parse_params(with_values({"model.family": "var"})).model.var().depth == 4  # one key switches the family


def with_values(values: dict) -> dict:
    params = copy.deepcopy(DEFAULT)
    for dotted, value in values.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return params


def test_there_are_enough_cases_and_every_section_is_covered():
    assert len(BAD) >= 60
    assert {key.split(".")[0] for key, _, _ in BAD} == set(DEFAULT)


@pytest.mark.parametrize("key, value, rule", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_value_is_refused_naming_the_key_and_value(key, value, rule):
    with pytest.raises(ConfigError) as err:
        parse_params(with_values({key: value}))
    message = str(err.value)
    assert message.startswith(key) or message.startswith(f"{key.rsplit('.', 1)[0]} "), message
    assert rule in message, message
    assert "\n" not in message


@pytest.mark.parametrize("values, message", ACROSS)
def test_contradicting_sections_are_refused(values, message):
    with pytest.raises(ConfigError) as err:
        parse_params(with_values(values))
    assert str(err.value).startswith(message), str(err.value)


def test_floats_in_exponent_form_mean_the_float():
    text = (ROOT / "params.yaml").read_text()
    assert "  lr: 5.0e-05\n" in text
    raw = yaml.safe_load(text.replace("  lr: 5.0e-05\n", "  lr: 2e-05\n"))  # as `dvc exp run -S` writes it
    assert raw["grpo"]["lr"] == "2e-05"  # YAML 1.1 reads an exponent without a dot as a string
    p = parse_params(raw)
    assert p.grpo.lr == 2e-5 and all(p.grpo_variant(v, 0).lr == 2e-5 for v in p.grpo_runs.variants)
    p = parse_params(with_values({"grpo.rewards.classifier": "2e0", "grpo.steps": 80, "grpo.kl_beta": 1}))
    assert p.grpo.rewards["classifier"] == 2.0 and type(p.grpo.rewards["classifier"]) is float
    assert p.grpo.kl_beta == 1.0 and type(p.grpo.kl_beta) is float


def test_the_shipped_params_files_are_valid():
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        parse_params(read_params(path))


def test_a_stage_refuses_bad_params_in_one_line_before_any_work(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_values({"grpo.group_size": 8.5})))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, str(ROOT / "stages/prepare.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "params.yaml: grpo.group_size must be an integer, got 8.5"
    assert not (tmp_path / "data").exists() and not (tmp_path / "mlflow.db").exists()


def test_dvc_repro_stops_at_prepare_within_seconds_on_a_bad_grpo_value(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "data", "models", "samples", "reports",
                                                               "mlflow.db", "mlruns", "__pycache__", ".dvc"))
    (repo / "params.yaml").write_text(yaml.safe_dump(with_values({"grpo.lr": "fast"})))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Running stage 'prepare'" in output and "Running stage 'pretrain'" not in output
    assert "params.yaml: grpo.lr must be a finite number, got 'fast'" in output
    assert "Traceback" not in output and not (repo / "data" / "dataset.npz").exists()
    assert elapsed < 10, elapsed


def test_a_bare_off_turns_compilation_off():
    # `dvc exp run -S sample.compile=off` writes a bare `off`, which YAML 1.1 reads as false
    p = parse_params(with_values({"sample.compile": False, "grpo.sampling.compile": False}))
    assert p.sample.sampling(2.0).compile == "off" and p.grpo.sampling.compile == "off"
    p = parse_params(with_values({"sample.compile": "reduce-overhead", "grpo.sampling.compile": "default"}))
    assert p.sample.sampling(2.0).compile == "reduce-overhead" and p.grpo.sampling.compile == "default"
