"""Pre-flight checks of the local weight and reference files a real-scale run needs.

Nothing is ever downloaded: every checkpoint, network and reference statistic is a local file named
in the `weights` section of params.yaml. Stages call `require_weights` before building any model,
so a missing or broken file fails in a second with a message that names the parameter, the file
expected and where it is published; `argrpo doctor` prints the same checks for every file.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from argrpo.checkpoints import IGNORED_KEYS, WRAPPER_KEYS
from argrpo.config import require
from argrpo.data import class_folders
from argrpo.gpt import GPT, GPT_PRESETS, GPTConfig, gpt_config
from argrpo.msvq import MSVQVAE, MSVQConfig
from argrpo.var import VAR, VARConfig
from argrpo.vq import VQ_PRESETS, VQConfig, VQModel, vq_config

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class WeightsConfig:
    """Local paths of real-scale weights and references; "" leaves one unset."""

    gpt_checkpoint: str = ""
    gpt_preset: str = ""  # GPT-B, GPT-L, ...: the architecture gpt_checkpoint must fit
    vq_checkpoint: str = ""
    vq_preset: str = ""  # VQ-16 or VQ-8
    clip_weights: str = ""
    clip_model: str = "ViT-L-14"  # open_clip architecture of clip_weights
    hpsv2_weights: str = ""
    maniqa_weights: str = ""
    aesthetic_weights: str = ""  # sac+logos+ava1-l14-linearMSE.pth (its CLIP: clip_weights / clip_model)
    t5_dir: str = ""  # a local FLAN-T5 directory (text-to-image features, prompts.encoder t5)
    qwen_vl_dir: str = ""  # a local Qwen2.5-VL-Instruct directory (the vlm_* judge rewards)
    inception: str = ""  # inception-2015-12-05.pt
    reward_inception: str = ""  # torchvision's Inception-v3 IMAGENET1K_V1 state dict (LOO-FID paper's features)
    ref_stats: str = ""  # .npz with mu and sigma
    ref_images: str = ""  # folder with one sub-folder of images per class

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            require(isinstance(value, str), f.name, "must be a path string (\"\" for unset)", value)
        require(self.gpt_preset in ("", *GPT_PRESETS), "gpt_preset", f"must be one of {list(GPT_PRESETS)}",
                self.gpt_preset)
        require(self.vq_preset in ("", *VQ_PRESETS), "vq_preset", f"must be one of {list(VQ_PRESETS)}",
                self.vq_preset)
        # open_clip reads "hf-hub:org/name" (or any name with a scheme or a path) as something to download
        require(re.fullmatch(r"[A-Za-z0-9._-]+", self.clip_model) is not None, "clip_model",
                "must name an open_clip architecture (e.g. ViT-L-14); hub names would download", self.clip_model)


@dataclass(frozen=True)
class WeightSource:
    file: str  # the file name as published
    source: str  # where it is published, in words


WEIGHT_SOURCES: dict[str, WeightSource] = {
    "gpt_checkpoint": WeightSource(
        "c2i_B_256.pt (or the c2i_*.pt file of the chosen weights.gpt_preset, e.g. c2i_L_256.pt, c2i_XL_384.pt)",
        "LlamaGen's model release on Hugging Face (the FoundationVision/LlamaGen repository, linked from the "
        "LlamaGen GitHub README)",
    ),
    "vq_checkpoint": WeightSource(
        "vq_ds16_c2i.pt",
        "LlamaGen's model release on Hugging Face (the FoundationVision/LlamaGen repository, linked from the "
        "LlamaGen GitHub README)",
    ),
    "clip_weights": WeightSource(
        "open_clip_pytorch_model.bin of the weights.clip_model architecture",
        "open_clip's pretrained weights on Hugging Face: OpenAI CLIP ViT-L/14 as the "
        "timm/vit_large_patch14_clip_224.openai repository (use clip_model ViT-L-14-quickgelu with it), "
        "LAION ViT-L/14 as laion/CLIP-ViT-L-14-laion2B-s32B-b82K; OpenAI's original ViT-L-14.pt is a "
        "TorchScript archive and cannot be read with weights_only=True",
    ),
    "hpsv2_weights": WeightSource(
        "HPS_v2.1_compressed.pt (HPS_v2_compressed.pt for HPSv2)",
        "the HPSv2 release (the xswu/HPSv2 repository on Hugging Face, linked from the tgxs002/HPSv2 GitHub README)",
    ),
    "maniqa_weights": WeightSource(
        "ckpt_koniq10k.pt (pyiqa's `maniqa` metric)",
        "pyiqa's weight release (the chaofengc/IQA-PyTorch-Weights repository on Hugging Face, mirrored in the "
        "IQA-PyTorch GitHub release v0.1-weights)",
    ),
    "aesthetic_weights": WeightSource(
        "sac+logos+ava1-l14-linearMSE.pth (scored on CLIP ViT-L/14: weights.clip_weights with clip_model "
        "ViT-L-14-quickgelu for OpenAI's weights)",
        "LAION's improved aesthetic predictor (the christophschuhmann/improved-aesthetic-predictor GitHub repository)",
    ),
    "t5_dir": WeightSource(
        "a directory with google/flan-t5-xl (config.json, tokenizer files, weights)",
        "the google/flan-t5-xl model repository on Hugging Face (copy it whole into a local directory)",
    ),
    "qwen_vl_dir": WeightSource(
        "a directory with Qwen/Qwen2.5-VL-3B-Instruct (config.json, processor and tokenizer files, weights)",
        "the Qwen/Qwen2.5-VL-3B-Instruct model repository on Hugging Face (copy it whole into a local directory)",
    ),
    "inception": WeightSource(
        "inception-2015-12-05.pt",
        "NVIDIA's StyleGAN2-ADA metrics downloads (stylegan2-ada-pytorch/pretrained/metrics on nvlabs-fi-cdn."
        "nvidia.com, the TorchScript Inception that clean-fid also uses)",
    ),
    "reward_inception": WeightSource(
        "inception_v3_google-0cc3c7bd.pth (torchvision's Inception_V3_Weights.IMAGENET1K_V1)",
        "torchvision's model weights (download.pytorch.org/models, the file torchvision itself caches for "
        "inception_v3(weights='IMAGENET1K_V1'))",
    ),
    "ref_stats": WeightSource(
        "VIRTUAL_imagenet256_labeled.npz",
        "the reference batches of OpenAI's ADM evaluator (guided-diffusion repository, evaluations/README.md)",
    ),
    "ref_images": WeightSource(
        "an ImageNet image folder with one sub-folder of images per class",
        "image-net.org (ILSVRC2012 train or validation images, sorted into class folders)",
    ),
}

# the network and tokenizer files of the other families (gpt_checkpoint and vq_checkpoint name them too)
FAMILY_SOURCES: dict[str, dict[str, WeightSource]] = {
    "var": {
        "gpt_checkpoint": WeightSource(
            "var_d16.pth (or var_d20.pth, var_d24.pth, var_d30.pth for the chosen model.gpt_preset)",
            "VAR's model release on Hugging Face (the FoundationVision/var repository, linked from the VAR GitHub "
            "README)",
        ),
        "vq_checkpoint": WeightSource(
            "vae_ch160v4096z32.pth",
            "VAR's model release on Hugging Face (the FoundationVision/var repository, linked from the VAR GitHub "
            "README)",
        ),
    },
    "llamagen_t2i": {
        "gpt_checkpoint": WeightSource(
            "t2i_XL_stage1_256.pt (LlamaGen's text-to-image GPT-XL, stage 1 at 256 px)",
            "LlamaGen's model release on Hugging Face (the FoundationVision/LlamaGen repository, linked from the "
            "LlamaGen GitHub README)",
        ),
        "vq_checkpoint": WeightSource(
            "vq_ds16_t2i.pt",
            "LlamaGen's model release on Hugging Face (the FoundationVision/LlamaGen repository, linked from the "
            "LlamaGen GitHub README)",
        ),
    },
}

# how each parameter's file is checked
KINDS: dict[str, str] = {
    "gpt_checkpoint": "torch",
    "vq_checkpoint": "torch",
    "clip_weights": "torch",
    "hpsv2_weights": "torch",
    "maniqa_weights": "torch",
    "aesthetic_weights": "torch",
    "t5_dir": "model_dir",
    "qwen_vl_dir": "model_dir",
    "inception": "torchscript",
    "reward_inception": "torch",
    "ref_stats": "npz",
    "ref_images": "folder",
}


@dataclass(frozen=True)
class Check:
    param: str
    path: str
    ok: bool
    message: str
    sha256: str | None = None
    missing: bool = False  # the file is unset or absent (rather than present but unreadable)


def sha256_file(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks so multi-GB checkpoints never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def state_dict_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def preset_shapes(cfg: WeightsConfig, param: str) -> Shapes | None:
    """Key -> shape map a LlamaGen checkpoint must have under the configured preset (None if unset).

    The model is built on the meta device, so even GPT-3B costs no memory.
    """
    with torch.device("meta"):
        if param == "gpt_checkpoint" and cfg.gpt_preset:
            return state_dict_shapes(GPT(gpt_config(cfg.gpt_preset)))
        if param == "vq_checkpoint" and cfg.vq_preset:
            return state_dict_shapes(VQModel(vq_config(cfg.vq_preset)))
    return None


def source_of(param: str, family: str = "llamagen") -> WeightSource:
    """Where the file of weights.<param> is published, for the configured model family."""
    return FAMILY_SOURCES.get(family, {}).get(param, WEIGHT_SOURCES[param])


def _hint(param: str, family: str = "llamagen") -> str:
    src = source_of(param, family)
    return f"Set weights.{param} in params.yaml to a local copy of {src.file}; it is published at {src.source}."


def _load_torch(path: str):
    try:
        # mmap reads only the tensor headers needed for a key/shape check, even for a 12 GB file
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format


def _is_torchscript(path: str) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` and a `code/` folder."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _state_dict(obj) -> Mapping | None:
    if not isinstance(obj, Mapping):
        return None
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _compare_shapes(state: Mapping, expected: Shapes) -> str:
    """"" when `state` fits `expected` key for key and shape for shape, else the differences."""
    state = {k: v for k, v in state.items() if not IGNORED_KEYS.match(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", misshapen))
        if keys
    ]
    return "; ".join(problems)


class _Shape:
    """Stands in for a tensor where only `.shape` is compared (safetensors headers)."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape


def _check_torch(path: str, expected: Shapes | None) -> str:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        # the header alone gives every key and shape
        with safe_open(path, framework="pt") as f:
            state = {k: _Shape(tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    else:
        if _is_torchscript(path):
            # torch.load would hand such an archive to torch.jit.load, which runs its code
            raise ValueError("a TorchScript archive, not a state dict saved with torch.save")
        try:
            obj = _load_torch(path)
        except Exception as err:
            lines = str(err).strip().splitlines()
            raise ValueError(
                f"torch.load(weights_only=True) cannot read it ({type(err).__name__}: {lines[0] if lines else ''}); "
                "the file is truncated, corrupt or not a PyTorch checkpoint"
            ) from err
        state = _state_dict(obj)
        if state is None or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"it holds a {type(obj).__name__}, not a dict of tensors")
    if expected:
        problems = _compare_shapes(state, expected)
        if problems:
            raise ValueError(f"it does not fit the configured architecture: {problems}")
    return f"{len(state)} tensors"


def _check_torchscript(path: str) -> str:
    module = torch.jit.load(path, map_location="cpu")
    return f"TorchScript module {module.original_name}"


def _check_npz(path: str) -> str:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"lacks {missing} (has {data.files}); expected reference statistics with mu and sigma")
        mu, sigma = data["mu"], data["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} must be [F] and [F, F]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("mu or sigma holds non-finite values")
    return f"reference moments of {mu.shape[0]}-d features"


def _check_folder(path: str) -> str:
    return f"{len(class_folders(Path(path)))} class folders"  # the prepare stage's own rules and messages


# model_type in config.json of the model directories, as transformers writes it
DIR_MODEL_TYPES: dict[str, tuple[str, ...]] = {"t5_dir": ("t5",), "qwen_vl_dir": ("qwen2_5_vl",)}
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _check_model_dir(path: str, model_types: tuple[str, ...] = ()) -> str:
    """A transformers model directory: config.json (of an expected model_type), weights, tokenizer files."""
    import json

    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ValueError("has no config.json; expected a model directory as saved by transformers")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"config.json is not JSON ({err.msg})") from None
    model_type = config.get("model_type", "")
    if model_types and model_type not in model_types:
        raise ValueError(f"config.json says model_type {model_type!r}, expected {' or '.join(model_types)}")
    weights = sorted({f.name for pattern in WEIGHT_FILES for f in root.glob(pattern)})
    if not weights:
        raise ValueError("has no weight files (*.safetensors or pytorch_model*.bin)")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    width = config.get("d_model") or config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")
    return f"{model_type} model{f' (width {width})' if width else ''}, {len(weights)} weight file(s)"


def _read(kind: str, path: str, expected: Shapes | None, param: str = "") -> str:
    """Read `path` as `kind`; a one-line summary if it reads, an exception otherwise."""
    if kind == "torch":
        return _check_torch(path, expected)
    if kind == "torchscript":
        return _check_torchscript(path)
    if kind == "npz":
        return _check_npz(path)
    if kind == "model_dir":
        return _check_model_dir(path, DIR_MODEL_TYPES.get(param, ()))
    return _check_folder(path)


CHECK_KINDS = ("torch", "torchscript", "npz", "folder", "model_dir")
DIRECTORY_KINDS = ("folder", "model_dir")


def check_file(param: str, path: str, kind: str, expected: Shapes | None = None, family: str = "llamagen") -> Check:
    """Check that `path` (the value of weights.<param>) exists and reads as `kind`.

    kinds: "torch" (torch.load with weights_only=True; compared key for key and shape for shape
    with `expected` when given), "torchscript" (torch.jit.load), "npz" (reference `mu` / `sigma`),
    "folder" (class sub-folders of images), "model_dir" (a transformers model directory: config.json of
    the expected model_type, weight files, tokenizer files). Files that pass carry their sha256.
    `family` picks the published file named in the hint for gpt_checkpoint and vq_checkpoint.
    """
    if kind not in CHECK_KINDS:
        raise ValueError(f"unknown check kind {kind!r}; valid kinds: {', '.join(CHECK_KINDS)}")
    hint = _hint(param, family) if param in WEIGHT_SOURCES else ""
    if not path:
        return Check(param, path, False, f"weights.{param} is not set. {hint}".strip(), missing=True)
    exists = os.path.isdir(path) if kind in DIRECTORY_KINDS else os.path.isfile(path)
    if not exists:
        what = "folder" if kind in DIRECTORY_KINDS else "file"
        return Check(param, path, False, f"weights.{param}: {what} not found: {path}. {hint}".strip(), missing=True)
    try:
        summary = _read(kind, path, expected, param)
    except Exception as err:  # any reader error means the same to the user: this file is unusable
        lines = str(err).strip().splitlines()
        reason = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        return Check(param, path, False, f"weights.{param}: {path} fails the {kind} check ({reason}). {hint}")
    digest = None if kind in DIRECTORY_KINDS else sha256_file(path)
    return Check(param, path, True, f"weights.{param}: {path}: ok, {summary}", sha256=digest)


def check_weights(
    cfg: WeightsConfig, needed: Sequence[str], expected: Mapping[str, Shapes] | None = None, family: str = "llamagen"
) -> list[Check]:
    """Check the files named by the parameters in `needed`, in order.

    GPT / VQ checkpoints are compared against the configured presets' shapes (`preset_shapes`);
    `expected` maps a parameter to its own key -> shape map instead (`model_shapes` of any family).
    """
    unknown = [param for param in needed if param not in KINDS]
    if unknown:
        raise ValueError(f"unknown weights parameter(s) {unknown}; valid: {', '.join(KINDS)}")
    checks = []
    for param in needed:
        path = getattr(cfg, param)
        shapes = (expected or {}).get(param)
        if shapes is None and path and os.path.isfile(path):
            shapes = preset_shapes(cfg, param)
        checks.append(check_file(param, path, KINDS[param], shapes, family))
    return checks


def require_weights(
    cfg: WeightsConfig, needed: Sequence[str], expected: Mapping[str, Shapes] | None = None, family: str = "llamagen"
) -> list[Check]:
    """`check_weights`, raising if any file fails: FileNotFoundError when a file is unset or absent,
    ValueError when every file exists but one does not read; the message lists every failure."""
    checks = check_weights(cfg, needed, expected, family)
    failed = [check for check in checks if not check.ok]
    if failed:
        message = "\n".join(check.message for check in failed)
        raise (FileNotFoundError if any(check.missing for check in failed) else ValueError)(message)
    return checks


# the files each instance reward reads (its weights, and the CLIP a predictor scores on)
REWARD_FILES: dict[str, tuple[str, ...]] = {
    "clip": ("clip_weights",),
    "clip_quantized": ("clip_weights",),
    "hpsv2": ("hpsv2_weights",),
    "hpsv2_quantized": ("hpsv2_weights",),
    "maniqa": ("maniqa_weights",),
    "aesthetic": ("aesthetic_weights", "clip_weights"),
    "vlm_judge": ("qwen_vl_dir",),
    "vlm_faithfulness": ("qwen_vl_dir",),
    "vlm_fake": ("qwen_vl_dir",),
    "vlm_weird": ("qwen_vl_dir",),
}


def needed_weights(model_source: str, instance_rewards: Sequence[str], features: str, ref_stats: str,
                   text_encoder: str = "stand_in", scores: Sequence[str] = (),
                   reward_features: str = "same") -> list[str]:
    """The `weights` parameters a configuration reads, each once: checkpoints for `model.source: weights`,
    the files of the configured rewards and of the evaluation's prompt scores (`scores`), FLAN-T5 for
    `prompts.encoder: t5`, Inception for `ref_stats.features: inception`, an ADM batch, and torchvision's
    Inception for `ref_stats.reward_features: torchvision_inception`."""
    needed = ["gpt_checkpoint", "vq_checkpoint"] if model_source == "weights" else []
    if text_encoder == "t5":
        needed.append("t5_dir")
    for name in [*instance_rewards, *scores]:
        needed += REWARD_FILES.get(name, ())
    if features == "inception":
        needed.append("inception")
    if ref_stats:
        needed.append("ref_stats")
    if reward_features == "torchvision_inception":
        needed.append("reward_inception")
    return list(dict.fromkeys(needed))


def build_on_meta(config) -> torch.nn.Module:
    """The network or tokenizer of any family for its config (GPT, VQ, VAR, multi-scale VQVAE)."""
    builders = {GPTConfig: GPT, VQConfig: VQModel, VARConfig: VAR, MSVQConfig: MSVQVAE}
    if type(config) not in builders:
        raise TypeError(f"no model for a {type(config).__name__}")
    with torch.device("meta"):
        return builders[type(config)](config)


def model_shapes(network_config, tokenizer_config) -> dict[str, Shapes]:
    """Expected key -> shape maps of the configured network (`gpt_checkpoint`: a LlamaGen GPT or VAR) and
    tokenizer (`vq_checkpoint`: a VQ or VAR's multi-scale VQVAE), built on the meta device (no memory)."""
    return {"gpt_checkpoint": state_dict_shapes(build_on_meta(network_config)),
            "vq_checkpoint": state_dict_shapes(build_on_meta(tokenizer_config))}
