"""dvc.yaml lists every file of the repository a stage's script imports, directly or through other files,
so that no code change can leave a committed result stale."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str, importer: Path) -> Path | None:
    """The repository file of module `name` (argrpo.x.y or a sibling script like `common`), if any."""
    parts = name.split(".")
    for base in (ROOT, importer.parent):
        candidate = base.joinpath(*parts)
        for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if path.is_file():
                return path
    return None


def imported_files(path: Path) -> set[Path]:
    """Files of this repository that `path` imports anywhere (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from argrpo.rewards import loo_fid` may import a module as well as a name
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            for i in range(1, len(name.split(".")) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                file = module_file(".".join(name.split(".")[:i]), path)
                if file is not None:
                    found.add(file)
    return found


def closure(script: Path) -> set[Path]:
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo.extend(imported_files(path))
    return seen


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


def test_every_stage_lists_the_whole_import_closure_of_its_script():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        words = stage["cmd"].split()
        scripts = [word for word in words if word.startswith("stages/")]
        if scripts[0] == "stages/launch.py":  # `python stages/launch.py <stage>` runs stages/<stage>.py too
            scripts.append(f"stages/{words[words.index(scripts[0]) + 1]}.py")
        files = set().union(*(closure(ROOT / script) for script in scripts))
        assert ROOT / "argrpo" / "grpo.py" in files or name not in ("grpo",)  # the walk does reach the library
        missing[name] = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, stage["deps"]))
    assert missing == {name: [] for name in stages}


def test_the_closure_walk_finds_lazy_and_nested_imports():
    files = closure(ROOT / "stages" / "grpo.py")
    for expected in ("stages/common.py", "argrpo/rewards/loo_fid.py", "argrpo/imagenet.py", "argrpo/inception.py",
                     "argrpo/rewards/__init__.py", "argrpo/__init__.py"):
        assert ROOT / expected in files, expected
    assert not covered(ROOT / "argrpo" / "gpt.py", ["stages/grpo.py", "argrpo/rewards"])


def test_every_shipped_params_file_holds_every_param_dvc_yaml_names():
    """DVC refuses to run a stage whose listed params are missing from params.yaml, so every params file a user
    may copy over it (the default and configs/*.yaml) must hold them all, even where the defaults would do."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    names = sorted({p for stage in stages.values() for p in stage.get("params", []) if isinstance(p, str)})
    missing = {}
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        raw = yaml.safe_load(path.read_text())
        variants = list((raw.get("grpo_runs") or {}).get("variants") or {})
        expanded = [name.replace("${item.variant}", v) for name in names for v in variants] \
            if variants else names
        for dotted in sorted({e for e in expanded} | {n for n in names if "${" not in n}):
            node = raw
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                missing.setdefault(path.name, []).append(dotted)
    assert missing == {}


def test_per_key_params_cover_what_each_stage_reads():
    """Stages list single keys so that an unread key never reruns them; these lists must still name every key
    the stage can read, or a change to it would leave a stale result."""
    from dataclasses import fields

    from argrpo.generator import SampleConfig
    from argrpo.metrics import EVALUATION_SCORES
    from argrpo.weights import REWARD_FILES

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    listed = {name: set(stage.get("params", [])) for name, stage in stages.items()}
    reward_files = {f"weights.{key}" for files in REWARD_FILES.values() for key in files}
    policy = {"weights.gpt_checkpoint", "weights.vq_checkpoint"}
    features = {"weights.inception", "weights.reward_inception"}
    assert policy | reward_files | features <= listed["grpo"]
    assert not {"weights", "weights.t5_dir", "weights.ref_stats", "weights.ref_images"} & listed["grpo"]
    scores = {f"weights.{key}" for name in EVALUATION_SCORES for key in REWARD_FILES[name]}
    assert scores | {"weights.inception"} <= listed["evaluate"] and "weights" not in listed["evaluate"]
    sample_keys = {f"sample.{f.name}" for f in fields(SampleConfig)}
    assert listed["sample"] & sample_keys == sample_keys - {"sample.save_png"} and "sample" not in listed["sample"]
    assert listed["png"] == {"sample.save_png"}
    assert "sample.save_png" not in listed["report"] and "sample" not in listed["report"]
