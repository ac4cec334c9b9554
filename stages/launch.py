"""Launch a distributed stage (grpo, sample, evaluate) through torchrun with params.yaml's `distributed`
section: `python stages/launch.py <stage> [stage args]`.

The params file is validated before anything starts, and torchrun's options reach it as an argument
list (`shlex.split`), never through a shell: nothing in params.yaml becomes shell code, even when an
earlier stage that would have refused it is cached. The launcher replaces itself with torchrun
(`os.execv`), so signals from DVC or the queue reach torchrun directly.
"""

import os
import shlex
import sys

from common import params, run_stage

from argrpo.config import ConfigError

STAGES = ("grpo", "sample", "evaluate")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in STAGES:
        raise ConfigError(f"launch: the first argument must be one of {', '.join(STAGES)}, got {sys.argv[1:2]}")
    stage, args = sys.argv[1], sys.argv[2:]
    d = params().distributed
    argv = [sys.executable, "-m", "torch.distributed.run", *shlex.split(d.torchrun_args),
            "--nproc_per_node", str(d.nproc_per_node), os.path.join("stages", f"{stage}.py"), *args]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    run_stage(main)
