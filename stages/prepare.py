"""Stage prepare: the dataset (digits, or an image folder) as one .npz with a train / held-out split."""

from common import params, stage

from argrpo.config import load_section
from argrpo.data import DataConfig, prepare_dataset

OUT = "data/dataset.npz"


def main() -> None:
    p = params()
    cfg = load_section(DataConfig, p.get("data"), "data")
    with stage("prepare", p["data"]) as run:
        counts = prepare_dataset(cfg, OUT)
        run.log_metrics({f"data_{k}": v for k, v in counts.items()})
        print(f"prepare: {counts} -> {OUT}")


if __name__ == "__main__":
    main()
