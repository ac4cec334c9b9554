"""Stage png: the first `sample.save_png` images of every sample set as PNG files, for people to look at:
samples_png/<configuration>/<index>_<class or condition>.png.

A stage of its own, so that asking for more or fewer PNGs never re-samples (the sample stage does not read
`sample.save_png`) and evaluation never reads a file that is not a sample.
"""

import shutil
from pathlib import Path

from common import params, run_stage
from PIL import Image
from tqdm import tqdm

from argrpo import samples

OUT = Path("samples_png")


def png_name(index: int, condition: int, label: int) -> str:
    """Plain class ids keep the short name; pairs and prompts name their condition and class (if any)."""
    what = f"class{label}" if condition == label else f"condition{condition}" + (f"_class{label}" if label >= 0 else "")
    return f"{index:05d}_{what}.png"


def main() -> None:
    p = params()
    if OUT.exists():
        shutil.rmtree(OUT)
    for folder in tqdm(samples.completed("samples"), desc="png", unit="set"):
        out = OUT / folder.name
        out.mkdir(parents=True)
        if p.sample.save_png == 0:
            continue
        head = samples.head(folder, p.sample.save_png)
        for i, (image, c, label) in enumerate(zip(head["images"], head["conditions"].tolist(),
                                                  head["labels"].tolist(), strict=True)):
            Image.fromarray(image).save(out / png_name(i, c, label))


if __name__ == "__main__":
    run_stage(main)
