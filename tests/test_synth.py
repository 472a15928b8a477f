import numpy as np
from PIL import Image

from covidseg.data.layout import CLASS_DIRS, IMAGES, INFECTION, KIND_DIRS, LUNG, ROOT_NAME, SPLIT_DIRS
from covidseg.data.synth import make_case, synthesize
from covidseg.params import SynthParams


def test_layout_names_and_counts(tmp_path):
    params = SynthParams(train=3, val=2, test=1, negatives=2, image_size=64)
    counts = synthesize(tmp_path / "syn", params, seed=1)
    root = tmp_path / "syn" / ROOT_NAME / ROOT_NAME  # the Kaggle download nests the folder twice
    assert counts == {"train": 3 + 4, "val": 2 + 4, "test": 1 + 4}
    for split, split_dir in SPLIT_DIRS.items():
        for class_dir in CLASS_DIRS:
            names = [sorted(p.name for p in (root / split_dir / class_dir / kind).iterdir()) for kind in KIND_DIRS]
            assert names[0] == names[1] == names[2]  # images and both masks pair 1:1 by name
            n = getattr(params, split) if class_dir == "COVID-19" else params.negatives
            assert len(names[0]) == n
    assert (root / "Train" / "COVID-19" / IMAGES / "covid_1.png").exists()
    assert (root / "Train" / "Non-COVID" / IMAGES / "Non_COVID (1).png").exists()
    assert (root / "Val" / "Normal" / IMAGES / "Normal (100001).png").exists()


def test_files_are_grey_and_masks_binary_with_infection_inside_lungs(tmp_path):
    synthesize(tmp_path, SynthParams(train=4, val=1, test=1, negatives=1, image_size=64), seed=3)
    root = tmp_path / ROOT_NAME / ROOT_NAME / "Train"
    for class_dir in CLASS_DIRS:
        for image_path in (root / class_dir / IMAGES).iterdir():
            image = Image.open(image_path)
            infection = Image.open(root / class_dir / INFECTION / image_path.name)
            lung = Image.open(root / class_dir / LUNG / image_path.name)
            assert image.mode == infection.mode == lung.mode == "L" and image.size == (64, 64)
            inf, lu = np.asarray(infection), np.asarray(lung)
            assert set(np.unique(inf)) <= {0, 255} and set(np.unique(lu)) <= {0, 255}
            assert not (inf & ~lu).any()  # every infected pixel lies inside the lungs
            assert inf.any() == (class_dir == "COVID-19")  # COVID-19 never empty, negatives always empty


def test_deterministic_in_seed():
    a = make_case(np.random.default_rng([5, 0]), 64, True)
    b = make_case(np.random.default_rng([5, 0]), 64, True)
    c = make_case(np.random.default_rng([6, 0]), 64, True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_infected_regions_are_brighter_so_there_is_something_to_learn():
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(10):
        image, infection, lung = make_case(rng, 128, True)
        inside = lung > 0
        gaps.append(image[(infection > 0)].mean() - image[inside & (infection == 0)].mean())
    assert np.mean(gaps) > 10  # grey levels
