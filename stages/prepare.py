"""Stage prepare: the dataset (digits, or an image folder) as one .npz with a train / held-out split."""

from common import params, run_stage, stage

from argrpo.data import prepare_dataset

OUT = "data/dataset.npz"


def main() -> None:
    p = params()
    with stage("prepare", p.raw.get("data")) as run:
        counts = prepare_dataset(p.data, OUT)
        run.log_metrics({f"data_{k}": v for k, v in counts.items()})
        print(f"prepare: {counts} -> {OUT}")


if __name__ == "__main__":
    run_stage(main)
