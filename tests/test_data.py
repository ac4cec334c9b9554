"""Image-folder datasets: classes, suffixes in any case, empty and corrupt inputs; the dataset file."""

import numpy as np
import pytest
import torch
from PIL import Image

from argrpo.data import DataConfig, Dataset, load_dataset, load_folder_images, prepare_dataset


def write_image(path, colour, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format={".png": "PNG", ".bmp": "BMP"}.get(path.suffix.lower(), "JPEG"))


def test_classes_are_sorted_folders_and_suffixes_match_in_any_case(tmp_path):
    write_image(tmp_path / "b_dog" / "x.JPEG", (0, 0, 255))
    write_image(tmp_path / "a_cat" / "one.PNG", (255, 0, 0))
    write_image(tmp_path / "a_cat" / "two.Jpg", (255, 0, 0))
    write_image(tmp_path / "a_cat" / "three.png", (255, 0, 0))
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    write_image(tmp_path / ".ipynb_checkpoints" / "stale.png", (0, 255, 0))  # hidden: not a class
    images, labels, names = load_folder_images(tmp_path, image_size=8)
    assert names == ["a_cat", "b_dog"]
    assert labels.tolist() == [0, 0, 0, 1] and images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    assert images[0, 4, 4].tolist() == [255, 0, 0] and abs(int(images[3, 4, 4, 2]) - 255) <= 2  # JPEG rounding


def test_an_empty_class_folder_is_an_error_naming_it(tmp_path):
    write_image(tmp_path / "cat" / "a.png", (1, 2, 3))
    (tmp_path / "dog").mkdir()
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "readme.md").write_text("images to come")
    with pytest.raises(ValueError) as err:
        load_folder_images(tmp_path, image_size=8)
    message = str(err.value)
    listed = message.split("class folder(s) ", 1)[1].split(" hold no image", 1)[0]
    assert listed == "dog, owl" and ".png" in message


def test_a_truncated_image_raises_naming_its_path(tmp_path):
    write_image(tmp_path / "cat" / "good.png", (1, 2, 3), size=(64, 64))
    bad = tmp_path / "cat" / "bad.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        load_folder_images(tmp_path, image_size=8)
    assert str(bad) in str(err.value)


def test_a_file_that_is_no_image_raises_naming_its_path(tmp_path):
    write_image(tmp_path / "cat" / "good.png", (1, 2, 3))
    bad = tmp_path / "cat" / "bad.JPG"
    bad.write_text("<html>a download error page saved as an image</html>")
    with pytest.raises(ValueError, match="bad.JPG"):
        load_folder_images(tmp_path, image_size=8)


def test_folder_without_class_folders_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_folder_images(tmp_path, image_size=8)
    with pytest.raises(FileNotFoundError, match="data.root"):
        load_folder_images(tmp_path / "absent", image_size=8)


def test_prepared_dataset_round_trips_and_a_truncated_one_names_its_path(tmp_path):
    for c in ("a", "b"):
        for i in range(4):
            write_image(tmp_path / "imgs" / c / f"{i}.png", (40 * i, 0, 0))
    out = tmp_path / "data" / "dataset.npz"
    counts = prepare_dataset(DataConfig(kind="folder", root=str(tmp_path / "imgs"), image_size=8), out)
    assert counts == {"images": 8, "train": 6, "holdout": 2, "classes": 2}
    data = load_dataset(out)
    assert data.class_names == ["a", "b"] and data.images.shape == (8, 8, 8, 3)
    out.write_bytes(out.read_bytes()[:-40])
    with pytest.raises(ValueError) as err:
        load_dataset(out)
    assert str(out) in str(err.value) and "corrupt or truncated" in str(err.value)
    with pytest.raises(FileNotFoundError, match="prepare stage"):
        load_dataset(tmp_path / "none.npz")


@pytest.mark.parametrize("which", ["train", "holdout", "all"])
def test_batches_of_a_part_are_its_images_in_order(which):
    rng = np.random.default_rng(0)
    data = Dataset(rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8), np.arange(11),
                   np.array([0, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1], np.int8), ["x"])
    batches = list(data.batches(which, 3))
    images, _ = data.part(which)
    assert all(len(b) <= 3 for b in batches) and len(batches) == -(-len(images) // 3)
    assert torch.equal(torch.cat(batches), images)


def test_an_unknown_part_is_an_error_naming_the_valid_ones():
    data = Dataset(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2), np.zeros(2, np.int8), ["x"])
    with pytest.raises(ValueError, match="'test'.*train, holdout, all"):
        next(data.batches("test", 1))
