"""protocol.data: loaders (UTKFace, CSV, Adult, synthetic), partitioning and bias injection."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import fairsplit.protocol.data as pdata
from fairsplit.protocol.config import (
    AdultData,
    BiasInjection,
    CSVData,
    ExperimentConfig,
    ModelSpec,
    PartitionConfig,
    SyntheticData,
    UTKFaceData,
)
from fairsplit.protocol.data import (
    DataError,
    inject_bias,
    load_adult,
    load_csv,
    load_split,
    load_utkface,
    make_synthetic,
    parse_utkface_name,
    partition_indices,
    serialise_row,
)

# ------------------------------------------------------------------------------------------
# UTKFace names
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("26_0_1_20170116011756522.jpg.chip.jpg", (26, 0, 1)),
        ("1_1_4_20161221193016140.jpg.chip.jpg", (1, 1, 4)),
        ("0_0_0_x.jpg", (0, 0, 0)),
        ("116_1_3_20170120134744096.jpg.chip.jpg", (116, 1, 3)),
    ],
)
def test_parse_utkface_name_good(name, expected):
    assert parse_utkface_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "61_1_20170109142408075.jpg.chip.jpg",  # race missing (real malformed UTKFace file)
        "61_3_20170109150557335.jpg.chip.jpg",  # the other real one: "3" would be a gender
        "a_0_0_20170109150557335.jpg.chip.jpg",  # non-integer age
        "30_x_0_20170109150557335.jpg.chip.jpg",  # non-integer gender
        "30_0_1.5_20170109150557335.jpg.chip.jpg",  # non-integer race
        "30_2_0_20170109150557335.jpg.chip.jpg",  # gender out of range
        "30_0_5_20170109150557335.jpg.chip.jpg",  # race out of range
        "-1_0_0_20170109150557335.jpg.chip.jpg",  # negative age
        "200_0_0_20170109150557335.jpg.chip.jpg",  # implausible age
        "noseparators.jpg",
        "",
    ],
)
def test_parse_utkface_name_malformed(name):
    assert parse_utkface_name(name) is None


# ------------------------------------------------------------------------------------------
# UTKFace loading (tiny generated folder)
# ------------------------------------------------------------------------------------------

# (age, gender, race) of the valid files; the colour of file i encodes i.
UTK_LABELS = [(25, 0, 0), (31, 1, 0), (40, 0, 1), (8, 1, 2), (60, 0, 3), (19, 1, 4),
              (45, 1, 0), (70, 0, 2), (33, 1, 1), (2, 0, 0)]
UTK_BAD = ["61_1_20170109142408075.jpg.chip.jpg", "abc_0_0_20170109142408075.jpg.chip.jpg"]


def _colour(i: int) -> tuple[int, int, int]:
    return (20 * i + 10, 200 - 15 * i, (37 * i) % 256)


@pytest.fixture
def utk_dir(tmp_path) -> tuple[Path, dict[str, tuple[int, tuple[int, int, int]]]]:
    from PIL import Image

    root = tmp_path / "utk"
    root.mkdir()
    files = {}
    for i, (age, gender, race) in enumerate(UTK_LABELS):
        name = f"{age}_{gender}_{race}_2017010914240{i:04d}.jpg.chip.jpg"
        Image.new("RGB", (20, 20), _colour(i)).save(root / name, quality=95)
        files[name] = (i, (age, gender, race))
    for name in UTK_BAD:
        Image.new("RGB", (20, 20), (0, 0, 0)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root, files


def test_load_utkface_tiny_folder(utk_dir, tmp_path, caplog):
    root, files = utk_dir
    cfg = UTKFaceData(kind="utkface", root=root, task="gender", sensitive="race_binary")
    with caplog.at_level(logging.WARNING, logger="fairsplit.protocol.data"):
        ds = load_utkface(cfg, image_size=16, cache_dir=tmp_path / "cache")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2" in warnings[0].getMessage()

    assert ds.n_skipped == 2
    assert len(ds) == len(UTK_LABELS)
    assert ds.modality == "image"
    assert ds.inputs.dtype == np.uint8 and ds.inputs.shape == (len(UTK_LABELS), 16, 16, 3)
    assert ds.y.dtype == np.int64
    assert ds.attr is None
    names = sorted(files)  # the loader orders files by name
    for j, name in enumerate(names):
        i, (age, gender, race) = files[name]
        assert ds.y[j] == gender, name
        assert ds.s[j] == ("White" if race == 0 else "non-White"), name
        # Row j holds that file's pixels (solid colour survives JPEG + bicubic resize).
        assert np.abs(ds.inputs[j].astype(int) - np.array(_colour(i))).max() <= 4, name


def test_load_utkface_cache_reused(utk_dir, tmp_path, monkeypatch):
    root, _ = utk_dir
    cfg = UTKFaceData(kind="utkface", root=root, task="race_binary", sensitive="gender")
    cache = tmp_path / "cache"
    first = load_utkface(cfg, image_size=12, cache_dir=cache)
    cached = list(cache.glob("*.npz"))
    assert len(cached) == 1

    def no_decode(*a, **k):
        raise AssertionError("images decoded again despite the cache")

    import fairsplit.protocol.sources.utkface as utk_source

    monkeypatch.setattr(utk_source, "decode_images", no_decode)
    second = load_utkface(cfg, image_size=12, cache_dir=cache)
    assert np.array_equal(first.inputs, second.inputs)
    assert np.array_equal(first.y, second.y) and np.array_equal(first.s, second.s)
    assert list(cache.glob("*.npz")) == cached
    # Another size is a different cache entry (and must decode).
    with pytest.raises(AssertionError, match="decoded again"):
        load_utkface(cfg, image_size=8, cache_dir=cache)


def test_load_utkface_targets_and_attribute(utk_dir):
    root, files = utk_dir
    names = sorted(files)
    races = np.array([files[n][1][2] for n in names])
    ages = np.array([files[n][1][0] for n in names])
    ds = load_utkface(UTKFaceData(kind="utkface", root=root, task="race_binary", sensitive="race"),
                      image_size=8, attribute="gender")
    assert np.array_equal(ds.y, (races != 0).astype(int))
    assert list(ds.s) == [pdata.UTK_RACES[r] for r in races]
    assert np.array_equal(ds.attr, [files[n][1][1] for n in names])
    ds = load_utkface(UTKFaceData(kind="utkface", root=root, task="age_bucket", sensitive="gender",
                                  age_bins=[0, 30, 200]), image_size=8)
    assert np.array_equal(ds.y, (ages >= 30).astype(int))
    assert set(ds.s) == {"male", "female"}


def test_load_utkface_errors(utk_dir, tmp_path):
    root, _ = utk_dir
    with pytest.raises(DataError, match="not binary"):
        load_utkface(UTKFaceData(kind="utkface", root=root, task="race"), image_size=8)
    with pytest.raises(DataError, match="not found"):
        load_utkface(UTKFaceData(kind="utkface", root=tmp_path / "absent"), image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / UTK_BAD[0]).write_bytes(b"x")
    with pytest.raises(DataError, match="no UTKFace images"):
        load_utkface(UTKFaceData(kind="utkface", root=empty), image_size=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "20_0_0_2017.jpg.chip.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="cannot decode"):
        load_utkface(UTKFaceData(kind="utkface", root=broken), image_size=8)


# ------------------------------------------------------------------------------------------
# CSV
# ------------------------------------------------------------------------------------------

CSV_TEXT = """\
age,job,income,sex,race
39,clerk,yes,M,a
50,?,no,F,b
,manager,yes,F,a
41,clerk,,M,b
33,tech,no,?,a
28,tech,no,M,
45, nurse ,yes,F,b
"""


def _csv(tmp_path, text=CSV_TEXT, **kw) -> CSVData:
    p = tmp_path / "d.csv"
    p.write_text(text)
    args = dict(kind="csv", path=p, label_column="income", positive_label="yes",
                feature_columns=["age", "job"], sensitive_columns=["sex", "race"])
    args.update(kw)
    return CSVData(**args)


def test_load_csv(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fairsplit.protocol.data"):
        ds = load_csv(_csv(tmp_path))
    # Dropped: missing label (41), missing sex "?" (33), empty race (28).
    assert ds.n_skipped == 3
    assert any("dropped 3" in r.getMessage() for r in caplog.records)
    assert ds.modality == "text"
    assert ds.inputs == [
        "age: 39. job: clerk.",
        "age: 50. job: unknown.",
        "age: unknown. job: manager.",
        "age: 45. job: nurse.",
    ]
    assert ds.y.tolist() == [1, 0, 1, 1] and ds.y.dtype == np.int64
    assert ds.s.tolist() == ["M|a", "F|b", "F|a", "F|b"]
    assert ds.attr is None


def test_load_csv_developer_view_and_attribute(tmp_path):
    ds = load_csv(_csv(tmp_path, sensitive_columns=[]), attribute="sex", attribute_positive="F")
    assert ds.s is None
    # Without sensitive columns only the missing label row is dropped.
    assert len(ds) == 6 and ds.n_skipped == 1
    assert all("sex" not in t and "race" not in t for t in ds.inputs)
    assert ds.attr.tolist() == [0, 1, 1, 0, 0, 1]  # "?" for sex is not "F"


def test_load_csv_missing_column(tmp_path):
    with pytest.raises(DataError, match="zipcode"):
        load_csv(_csv(tmp_path, feature_columns=["age", "zipcode"]))
    with pytest.raises(DataError, match="religion"):
        load_csv(_csv(tmp_path, sensitive_columns=["religion"]))


def test_load_csv_malformed_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="d.csv"):
        load_csv(_csv(tmp_path, text="age,job,income,sex,race\n1,2,yes,M,a\n1,2,3,4,5,6,7,8\n"))
    with pytest.raises(DataError, match="d.csv"):
        load_csv(_csv(tmp_path, text=""))
    p = tmp_path / "bin.csv"
    p.write_bytes(b"age,job\n\xff\xfe\xfa\x00\x81,1\n")
    with pytest.raises(DataError):
        load_csv(CSVData(kind="csv", path=p, label_column="job", positive_label="1",
                         feature_columns=["age"]))
    with pytest.raises(DataError, match="not found"):
        load_csv(CSVData(kind="csv", path=tmp_path / "absent.csv", label_column="y",
                         positive_label="1", feature_columns=["a"]))


def test_load_csv_without_positive_label(tmp_path):
    with pytest.raises(DataError, match="no row"):
        load_csv(_csv(tmp_path, positive_label="maybe"))


YES_NO_MAYBE = "age,job,income,sex,race\n" + "".join(
    f"{20 + i},clerk,{v},{'F' if i % 2 else 'M'},a\n"
    for i, v in enumerate(["yes"] * 6 + ["no"] * 5 + ["maybe"] * 3 + [" maybe "] + [""]))


def test_load_csv_refuses_a_third_label_value(tmp_path):
    """`maybe` beside `yes`/`no` was silently negative; now an error naming the file, the
    column and the values with their counts, and saying what to set."""
    cfg = _csv(tmp_path, text=YES_NO_MAYBE)
    with pytest.raises(DataError) as info:
        load_csv(cfg)
    msg = str(info.value)
    assert str(cfg.path) in msg and "'income'" in msg
    assert "'maybe' (4)" in msg and "'no' (5)" in msg and "'yes' (6)" in msg  # stripped, NA not counted
    assert "negative_labels" in msg


def test_load_csv_negative_labels_map_the_values(tmp_path):
    ds = load_csv(_csv(tmp_path, text=YES_NO_MAYBE, negative_labels=["no", "maybe"]))
    assert ds.y.tolist() == [1] * 6 + [0] * 9 and ds.n_skipped == 1  # the empty label: missing
    # with negative_labels, a value that is neither positive nor listed is an error
    with pytest.raises(DataError) as info:
        load_csv(_csv(tmp_path, text=YES_NO_MAYBE, negative_labels=["no"]))
    msg = str(info.value)
    assert str(tmp_path / "d.csv") in msg and "'income'" in msg and "'maybe' (4)" in msg
    assert "'no' (" not in msg and "'yes' (" not in msg  # only the unexpected values are counted
    # the filters apply first: excluding `maybe` leaves a two-valued column
    ds = load_csv(_csv(tmp_path, text=YES_NO_MAYBE, exclude={"income": ["maybe"]}))
    assert ds.y.tolist() == [1] * 6 + [0] * 5
    with pytest.raises(ValueError, match="positive_label"):
        _csv(tmp_path, negative_labels=["no", "yes"])
    with pytest.raises(ValueError, match="negative_labels"):
        _csv(tmp_path, negative_labels=[])


def test_load_csv_two_values_and_a_missing_positive(tmp_path):
    """A two-valued column works as before (the other value is negative, no negative_labels);
    a positive_label that never occurs is an error listing the values that do."""
    ds = load_csv(_csv(tmp_path, text=YES_NO_MAYBE.replace("maybe", "no")))
    assert ds.y.tolist() == [1] * 6 + [0] * 9
    with pytest.raises(DataError) as info:
        load_csv(_csv(tmp_path, text=YES_NO_MAYBE.replace("maybe", "no"), positive_label="Yes"))
    msg = str(info.value)
    assert str(tmp_path / "d.csv") in msg and "'income'" in msg and "'Yes'" in msg
    assert "'yes' (6)" in msg and "'no' (9)" in msg


def test_image_csv_refuses_a_third_label_value(tmp_path):
    from PIL import Image

    from fairsplit.protocol.config import ImageCSVData
    from fairsplit.protocol.data import load_source

    (tmp_path / "img").mkdir()
    rows = ["file,smiling,sex"]
    for i in range(9):
        Image.new("RGB", (8, 8), _colour(i)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{['yes', 'no', 'unsure'][i % 3]},{'F' if i % 2 else 'M'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    cfg = ImageCSVData(kind="image_csv", path=tmp_path / "meta.csv", image_column="file",
                       label_column="smiling", positive_label="yes", sensitive_columns=["sex"])
    with pytest.raises(DataError) as info:
        load_source(cfg, 8, None)
    msg = str(info.value)
    assert str(tmp_path / "meta.csv") in msg and "'smiling'" in msg and "'unsure' (3)" in msg
    ds = load_source(cfg.model_copy(update={"negative_labels": ["no", "unsure"]}), 8, None)
    assert ds.y.tolist() == [int(i % 3 == 0) for i in range(9)]


def test_serialise_row():
    row = {"a": 3.0, "b": float("nan"), "c": None, "d": " x ", "e": 2.5}
    assert serialise_row(row, ["e", "a", "b", "c", "d", "zz"]) == \
        "e: 2.5. a: 3. b: unknown. c: unknown. d: x. zz: unknown."


# ------------------------------------------------------------------------------------------
# Adult
# ------------------------------------------------------------------------------------------

ADULT_DATA = """\
39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, 2174, 0, 40, United-States, <=50K
50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, Male, 0, 0, 13, United-States, >50K
38, ?, 215646, HS-grad, 9, Divorced, Handlers-cleaners, Not-in-family, Black, Female, 0, 0, 40, ?, <=50K
53, Private, 234721, 11th, 7, Married-civ-spouse, Handlers-cleaners, Husband, Black, Male, 0, 0, 40, United-States, <=50K
28, Private, 338409, Bachelors, 13, Married-civ-spouse, Prof-specialty, Wife, Black, Female, 0, 0, 40, Cuba, >50K
37, Private, 284582, Masters, 14, Married-civ-spouse, Exec-managerial, Wife, White, Female, 0, 0, 40, United-States, <=50K

"""
ADULT_TEST = """\
|1x3 Cross validator
25, Private, 226802, 11th, 7, Never-married, Machine-op-inspct, Own-child, Black, Male, 0, 0, 40, United-States, <=50K.
44, Private, 160323, Some-college, 10, Married-civ-spouse, Machine-op-inspct, Husband, Amer-Indian-Eskimo, Male, 7688, 0, 40, United-States, >50K.
"""


@pytest.fixture
def adult_dir(tmp_path) -> Path:
    root = tmp_path / "adult"
    root.mkdir()
    (root / "adult.data").write_text(ADULT_DATA)
    (root / "adult.test").write_text(ADULT_TEST)
    return root


def test_load_adult_labels_and_views(adult_dir):
    dev = load_adult(AdultData(kind="adult", root=adult_dir))
    assert len(dev) == 8
    assert dev.y.tolist() == [0, 1, 0, 0, 1, 0, 0, 1]
    assert dev.s is None and dev.attr is None
    for t in dev.inputs:
        for word in ("sex:", "race:", "Male", "Female", "White", "Black", "Amer-Indian", "fnlwgt",
                     "income", "50K"):
            assert word not in t, (word, t)
    assert dev.inputs[0].startswith("age: 39. workclass: State-gov. education: Bachelors.")
    assert "workclass: unknown." in dev.inputs[2] and "native-country: unknown." in dev.inputs[2]
    assert "77516" not in dev.inputs[0]

    aud = load_adult(AdultData(kind="adult", root=adult_dir, sensitive=["sex", "race"]))
    assert aud.inputs == dev.inputs and np.array_equal(aud.y, dev.y)
    assert aud.s.tolist() == ["Male|White", "Male|White", "Female|Black", "Male|Black",
                              "Female|Black", "Female|White", "Male|Black",
                              "Male|Amer-Indian-Eskimo"]
    only_sex = load_adult(AdultData(kind="adult", root=adult_dir, sensitive=["sex"]))
    assert set(only_sex.s) == {"Male", "Female"}


def test_load_adult_without_test_file_and_with_attribute(adult_dir):
    ds = load_adult(AdultData(kind="adult", root=adult_dir, include_test_file=False), attribute="sex")
    assert len(ds) == 6
    assert ds.s is None
    assert ds.attr.tolist() == [0, 0, 1, 0, 1, 1]  # Female = 1
    assert all("sex" not in t for t in ds.inputs)


def test_load_adult_malformed_label(adult_dir):
    (adult_dir / "adult.test").write_text(ADULT_TEST.replace(">50K.", "rich."))
    with pytest.raises(DataError, match="rich"):
        load_adult(AdultData(kind="adult", root=adult_dir))


def test_load_adult_missing_file(tmp_path):
    with pytest.raises(DataError, match="adult.data"):
        load_adult(AdultData(kind="adult", root=tmp_path))


# ------------------------------------------------------------------------------------------
# Partitioning
# ------------------------------------------------------------------------------------------


def test_partition_shared_source_disjoint_and_sized():
    cfg = PartitionConfig(seed=5, developer_train=0.5, auditor_train=0.2, auditor_val=0.1,
                          auditor_test=0.2)
    dev = partition_indices(1000, cfg, "developer")
    aud = partition_indices(1000, cfg, "auditor")
    assert set(dev) == {"developer_train"}
    assert set(aud) == {"auditor_train", "auditor_val", "auditor_test"}
    parts = {**dev, **aud}
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"developer_train": 500, "auditor_train": 200, "auditor_val": 100,
                     "auditor_test": 200}
    allidx = np.concatenate(list(parts.values()))
    assert len(np.unique(allidx)) == len(allidx) == 1000
    for v in parts.values():
        assert np.all(np.diff(v) > 0)  # sorted, unique


def test_partition_fractions_below_one_leave_rows_unused():
    cfg = PartitionConfig(developer_train=0.3, auditor_train=0.1, auditor_val=0.1, auditor_test=0.1)
    parts = {**partition_indices(101, cfg, "developer"), **partition_indices(101, cfg, "auditor")}
    allidx = np.concatenate(list(parts.values()))
    assert len(np.unique(allidx)) == len(allidx)
    assert {k: len(v) for k, v in parts.items()} == {"developer_train": 30, "auditor_train": 10,
                                                     "auditor_val": 10, "auditor_test": 10}


def test_partition_deterministic_by_seed():
    a = partition_indices(500, PartitionConfig(seed=1), "auditor")
    b = partition_indices(500, PartitionConfig(seed=1), "auditor")
    c = partition_indices(500, PartitionConfig(seed=2), "auditor")
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_partition_caps():
    cfg = PartitionConfig(seed=0, max_developer_train=17, max_auditor_val=3)
    dev = partition_indices(1000, cfg, "developer")
    aud = partition_indices(1000, cfg, "auditor")
    assert len(dev["developer_train"]) == 17
    assert len(aud["auditor_val"]) == 3
    assert len(aud["auditor_train"]) == 200 and len(aud["auditor_test"]) == 200
    uncapped = partition_indices(1000, PartitionConfig(seed=0), "developer")["developer_train"]
    assert set(dev["developer_train"]) <= set(uncapped)
    # Caps larger than the part change nothing.
    big = partition_indices(1000, PartitionConfig(seed=0, max_developer_train=10_000), "developer")
    assert np.array_equal(big["developer_train"], uncapped)


def test_partition_own_data():
    cfg = PartitionConfig(mode="own_data", seed=3, developer_train=0.5, auditor_train=0.2,
                          auditor_val=0.1, auditor_test=0.2)
    dev = partition_indices(300, cfg, "developer")
    assert np.array_equal(dev["developer_train"], np.arange(300))
    aud = partition_indices(300, cfg, "auditor")
    # Auditor fractions 0.2 : 0.1 : 0.2 of its own 300 rows -> 120 / 60 / 120.
    assert {k: len(v) for k, v in aud.items()} == {"auditor_train": 120, "auditor_val": 60,
                                                   "auditor_test": 120}
    allidx = np.concatenate(list(aud.values()))
    assert np.array_equal(np.sort(allidx), np.arange(300))


# ------------------------------------------------------------------------------------------
# Bias injection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.8, 0.2, 0.5, 0.95])
def test_inject_bias_reaches_target(target):
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 5000)
    attr = rng.integers(0, 2, 5000)
    idx = inject_bias(y, attr, target, seed=0)
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 5000
    rate = float(np.mean(y[idx] == attr[idx]))
    assert abs(rate - target) <= 0.02
    # Every example of the under-represented kind is kept.
    kind = (y == attr) if target > 0.5 else (y != attr)
    if target != 0.5:
        assert set(np.flatnonzero(kind)) <= set(idx.tolist())


def test_inject_bias_starting_from_a_correlated_source():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 4000)
    attr = np.where(rng.random(4000) < 0.7, y, 1 - y)  # natural agreement 0.7
    for target in (0.9, 0.5, 0.1):
        idx = inject_bias(y, attr, target, seed=1)
        assert abs(np.mean(y[idx] == attr[idx]) - target) <= 0.02


def test_inject_bias_deterministic():
    rng = np.random.default_rng(0)
    y, attr = rng.integers(0, 2, 2000), rng.integers(0, 2, 2000)
    a = inject_bias(y, attr, 0.8, seed=4)
    assert np.array_equal(a, inject_bias(y, attr, 0.8, seed=4))
    assert not np.array_equal(a, inject_bias(y, attr, 0.8, seed=5))


def test_inject_bias_extremes():
    y = np.array([0, 1, 0, 1, 1, 0])
    attr = np.array([0, 1, 1, 0, 1, 0])
    assert inject_bias(y, attr, 1.0, 0).tolist() == [0, 1, 4, 5]
    assert inject_bias(y, attr, 0.0, 0).tolist() == [2, 3]


def test_inject_bias_errors():
    with pytest.raises(DataError, match="binary"):
        inject_bias(np.array([0, 1, 2]), np.array([0, 1, 1]), 0.8, 0)
    with pytest.raises(DataError, match="binary"):
        inject_bias(np.array([0, 1, 1]), np.array([0, 1, 3]), 0.8, 0)
    with pytest.raises(DataError, match="impossible"):
        inject_bias(np.array([0, 1, 1]), np.array([0, 1, 1]), 0.8, 0)  # always agrees


# ------------------------------------------------------------------------------------------
# Synthetic data and load_split
# ------------------------------------------------------------------------------------------


def test_make_synthetic_deterministic_and_correlated():
    cfg = SyntheticData(kind="synthetic", n=3000, image_size=8, spurious_correlation=0.85, seed=3)
    a, b = make_synthetic(cfg), make_synthetic(cfg)
    assert a.inputs.shape == (3000, 8, 8, 3) and a.inputs.dtype == np.uint8
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.y, b.y)
    assert np.array_equal(a.s, b.s)
    assert set(a.s) == {"group_a", "group_b"}
    assert np.array_equal(a.s == "group_b", a.attr == 1)
    assert abs(np.mean(a.attr == a.y) - 0.85) < 0.03
    assert abs(a.y.mean() - 0.5) < 0.05
    c = make_synthetic(cfg.model_copy(update={"seed": 4}))
    assert not np.array_equal(a.inputs, c.inputs)
    ind = make_synthetic(cfg.model_copy(update={"spurious_correlation": 0.5}), with_sensitive=False)
    assert ind.s is None
    assert abs(np.mean(ind.attr == ind.y) - 0.5) < 0.04


def _exp(**partition) -> ExperimentConfig:
    return ExperimentConfig(model=ModelSpec(kind="timm", name="vit_tiny_patch16_224", pretrained=False),
                            partition=PartitionConfig(seed=2, **partition))


def test_load_split_developer_with_bias_injection():
    src = SyntheticData(kind="synthetic", n=800, image_size=8, spurious_correlation=0.7)
    exp = _exp()
    bias = BiasInjection(attribute="synthetic", correlation=0.9)
    out = load_split(src, exp, "developer", 8, bias=bias)
    assert set(out) == {"developer_train"}
    part = out["developer_train"]
    assert part.s is None and part.attr is None
    # Reproduce: the developer's part of the full source, then the bias-injected subsample.
    full = make_synthetic(src)
    dev_idx = partition_indices(len(full), exp.partition, "developer")["developer_train"]
    sub = inject_bias(full.y[dev_idx], full.attr[dev_idx], 0.9, exp.partition.seed)
    chosen = dev_idx[sub]
    assert len(part) == len(chosen) < len(dev_idx)
    assert np.array_equal(part.y, full.y[chosen])
    assert np.array_equal(part.inputs, full.inputs[chosen])
    assert abs(np.mean(full.y[chosen] == full.attr[chosen]) - 0.9) <= 0.02

    plain = load_split(src, exp, "developer", 8)["developer_train"]
    assert len(plain) == len(dev_idx) and plain.s is None and plain.attr is None


def test_load_split_auditor():
    src = SyntheticData(kind="synthetic", n=400, image_size=8, sensitive=True)
    out = load_split(src, _exp(), "auditor", 8,
                     bias=BiasInjection(attribute="synthetic", correlation=0.9))  # ignored
    assert set(out) == {"auditor_train", "auditor_val", "auditor_test"}
    assert [len(out[k]) for k in ("auditor_train", "auditor_val", "auditor_test")] == [80, 40, 80]
    for part in out.values():
        assert part.s is not None and len(part.s) == len(part)
        assert set(part.s) <= {"group_a", "group_b"}
        assert part.attr is None


def test_load_split_empty_part_and_bad_attribute():
    src = SyntheticData(kind="synthetic", n=50, image_size=8)
    with pytest.raises(DataError, match="developer_train"):
        load_split(src, _exp(developer_train=0.0), "developer", 8)
    with pytest.raises(DataError, match="synthetic"):
        load_split(src, _exp(), "developer", 8, bias=BiasInjection(attribute="sex", correlation=0.9))


# ------------------------------------------------------------------------------------------
# Real data (skipped when ../shared is absent)
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_utkface_crop_part1(shared_path, tmp_path, caplog):
    root = shared_path("data/utkface/crop_part1")
    cfg = UTKFaceData(kind="utkface", root=root, task="gender", sensitive="race_binary")
    with caplog.at_level(logging.WARNING, logger="fairsplit.protocol.data"):
        ds = load_utkface(cfg, image_size=32, cache_dir=tmp_path)
    assert ds.n_skipped == 2
    assert len(ds) == 9778
    assert ds.inputs.shape == (9778, 32, 32, 3) and ds.inputs.dtype == np.uint8
    assert sum("skipped 2" in r.getMessage() for r in caplog.records) == 1
    assert set(ds.y.tolist()) == {0, 1}
    assert set(ds.s) == {"White", "non-White"}


def test_real_adult(shared_path):
    root = shared_path("data/adult")
    aud = load_adult(AdultData(kind="adult", root=root, sensitive=["sex", "race"]))
    assert len(aud) == 48842 and aud.n_skipped == 0
    assert 0.22 < aud.y.mean() < 0.26  # about 23.9 % earn >50K
    assert {s.split("|")[0] for s in aud.s} == {"Male", "Female"}
    dev = load_adult(AdultData(kind="adult", root=root))
    assert dev.s is None and len(dev) == 48842
    assert not any("sex:" in t or "race:" in t for t in dev.inputs[:2000])


# -- include / exclude / group_map (configs that fit real datasets) ------------------------------

RACES6 = "id,f,race,y\n" + "\n".join(
    f"{i},v{i % 7},{race},{'yes' if i % 3 else 'no'}"
    for i, race in enumerate(["African-American"] * 40 + ["Caucasian"] * 40 + ["Hispanic"] * 12
                             + ["Asian"] * 3 + ["Native American"] * 2 + ["Other"] * 6)) + "\n"


def _races(tmp_path, **kw):
    p = tmp_path / "races.csv"
    p.write_text(RACES6)
    return CSVData(**{"kind": "csv", "path": p, "label_column": "y", "positive_label": "yes",
                      "feature_columns": ["f"], "sensitive_columns": ["race"], **kw})


def test_include_exclude_keep_the_compared_groups(tmp_path):
    from fairsplit.protocol.data import load_source

    kept = load_source(_races(tmp_path, include={"race": ["African-American", "Caucasian"]}), None)
    assert sorted(set(kept.s)) == ["African-American", "Caucasian"] and len(kept) == 80
    dropped = load_source(_races(tmp_path, exclude={"race": ["Asian", "Native American"]}), None)
    assert "Asian" not in set(dropped.s) and len(dropped) == 103 - 5
    with pytest.raises(DataError, match=r"unknown column\(s\) \['colour'\].*columns are"):
        load_source(_races(tmp_path, include={"colour": ["red"]}), None)
    with pytest.raises(DataError, match="leave no row"):
        load_source(_races(tmp_path, include={"race": ["Martian"]}), None)
    # a developer filters by a column that is not one of its features, and never sees it
    dev = load_source(_races(tmp_path, sensitive_columns=[], include={"race": ["Caucasian"]}), None)
    assert dev.s is None and len(dev) == 40 and all("race" not in t for t in dev.inputs)


def test_group_map_merges_small_groups(tmp_path):
    from fairsplit.developer.config import DeveloperConfig
    from fairsplit.protocol.data import load_source

    ds = load_source(_races(tmp_path, group_map={"Asian": "Other", "Native American": "Other"}), None)
    groups, sizes = np.unique(ds.s, return_counts=True)
    assert dict(zip(groups, sizes)) == {"African-American": 40, "Caucasian": 40, "Hispanic": 12, "Other": 11}
    with pytest.raises(DataError, match=r"group_map names group\(s\) \['Asain'\]"):
        load_source(_races(tmp_path, group_map={"Asain": "Other"}), None)
    with pytest.raises(ValueError, match="developer holds no sensitive groups"):
        DeveloperConfig(data=_races(tmp_path, sensitive_columns=[], group_map={"Asian": "Other"}))


def test_utkface_include_by_race(utk_dir, tmp_path):
    root, _ = utk_dir
    cfg = UTKFaceData(kind="utkface", root=root, task="gender", sensitive="race",
                      include={"race": ["White", "Black"]})
    ds = load_utkface(cfg, 16, tmp_path / "cache")
    assert sorted(set(ds.s)) == ["Black", "White"]
    assert len(ds) == sum(1 for _, _, r in UTK_LABELS if r in (0, 1))
    with pytest.raises(ValueError, match="unknown UTKFace column"):
        UTKFaceData(kind="utkface", root=root, include={"skin": ["x"]})


def test_image_csv_folder_with_metadata(tmp_path, monkeypatch):
    """kind = "image_csv": images by relative path from a metadata CSV, a label column with its
    positive value, sensitive columns for the auditor; decoded once and cached."""
    from PIL import Image

    from fairsplit.protocol.config import ImageCSVData
    from fairsplit.protocol.data import load_source

    (tmp_path / "img").mkdir()
    rows = ["file,smiling,sex,age_group"]
    for i in range(12):
        Image.new("RGB", (24, 20), _colour(i)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'yes' if i % 2 else 'no'},{'F' if i % 3 else 'M'},{'' if i == 5 else 'young'}")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    cfg = ImageCSVData(kind="image_csv", path=tmp_path / "meta.csv", image_column="file",
                       label_column="smiling", positive_label="yes", sensitive_columns=["sex", "age_group"])
    ds = load_source(cfg, 16, tmp_path / "cache")
    assert ds.modality == "image" and ds.inputs.shape == (11, 16, 16, 3) and ds.n_skipped == 1
    assert ds.y.tolist() == [i % 2 for i in range(12) if i != 5]
    assert set(ds.s) == {"F|young", "M|young"}
    assert (ds.inputs[0] == np.array(_colour(0), dtype=np.uint8)).all()  # a flat colour survives resizing
    # the second load reads the cache, not the images
    import fairsplit.protocol.sources.image_csv as image_csv_source

    with monkeypatch.context() as m:
        m.setattr(image_csv_source, "decode_images", lambda *a: (_ for _ in ()).throw(AssertionError("decoded again")))
        assert (load_source(cfg, 16, tmp_path / "cache").inputs == ds.inputs).all()
    # the developer's view: no sensitive columns, and a filter
    dev = load_source(cfg.model_copy(update={"sensitive_columns": [], "include": {"sex": ["F"]}}), 16, None)
    assert dev.s is None and len(dev) == 8
    (tmp_path / "img" / "3.png").unlink()
    with pytest.raises(DataError, match=r"1 listed image\(s\) not found"):
        load_source(cfg.model_copy(update={"path": tmp_path / "meta.csv"}), 16, None)
    with pytest.raises(DataError, match="column"):
        load_source(cfg.model_copy(update={"label_column": "smile"}), 16, None)


def test_cache_write_is_atomic_and_streamed(tmp_path):
    """The decoded-image cache goes through protocol.fileio.atomic_write_stream: a writer that
    fails half-way leaves the previous file and no temp file; a good one replaces it."""
    from fairsplit.protocol.fileio import atomic_write_stream
    from fairsplit.protocol.sources.base import save_npz_atomic

    path = tmp_path / "c.npz"
    save_npz_atomic(path, images=np.zeros((2, 3), dtype=np.uint8))

    def half(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_stream(path, half)
    with np.load(path) as z:
        assert z["images"].shape == (2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]
    save_npz_atomic(path, images=np.ones((4,), dtype=np.uint8))
    with np.load(path) as z:
        assert z["images"].tolist() == [1, 1, 1, 1]
