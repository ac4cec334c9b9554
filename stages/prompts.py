"""Stage prompts: what the condition ids of each split mean, written once for every later stage.

data/prompts_train.npz (pretraining and GRPO) and data/prompts_eval.npz (sampling and evaluation):
- class-conditional families: the classes (or (class, style) pairs) and their prompts from
  `prompts.template`, for the CLIP-style rewards; the class names come from the dataset (ImageNet's
  for 1,000 classes);
- text-to-image: the prompt sets with their caption features, computed here once by the text encoder
  (the stand-in, or FLAN-T5 from `weights.t5_dir`), so that GRPO never runs it.
"""

from common import PROMPTS_FILES, params, preflight, run_stage, stage

from argrpo.conditions import class_condition_sets, save_condition_set, text_condition_sets
from argrpo.data import load_dataset


def class_names(num_classes: int) -> list[str]:
    """ImageNet's 1,000 categories for 1,000-class models, else the dataset's folder names."""
    if num_classes == 1000:
        from argrpo.imagenet import imagenet_class_names

        return imagenet_class_names()
    return load_dataset("data/dataset.npz").class_names


def main() -> None:
    p = params()
    cfg, model = p.prompts, p.model
    preflight(p, ["t5_dir"])
    with stage("prompts", {"prompts": p.raw.get("prompts"), "model": p.raw.get("model")}) as run:
        if model.text_conditional:
            sets = text_condition_sets(cfg, model.cls_token_num, p.weights.t5_dir, model.torch_device())
        else:
            sets = class_condition_sets(cfg, class_names(model.num_classes))
        for split, conditions in sets.items():
            save_condition_set(PROMPTS_FILES[split], conditions, cfg.feature_dtype)
            run.log_metrics({f"{split}_conditions": len(conditions)})
            print(f"prompts: {split}: {len(conditions)} conditions, e.g. {conditions.prompts[0]!r} -> "
                  f"{PROMPTS_FILES[split]}")


if __name__ == "__main__":
    run_stage(main)
