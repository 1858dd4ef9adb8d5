"""protocol.config: loading TOML files, key-naming errors, path resolution, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fairsplit.auditor.config import AuditorFile, load_auditor_file
from fairsplit.deploy.config import RunFile, load_run_file
from fairsplit.developer.config import DeveloperFile, load_developer_file
from fairsplit.protocol.config import (
    ConfigError,
    ExperimentConfig,
    LoRAConfig,
    ModelSpec,
    PartitionConfig,
    SyntheticData,
    UTKFaceData,
    experiment_fingerprint,
    parse_config,
)

EXPERIMENT = """\
[experiment]
name = "unit"
rounds = 3
local_steps = 4
batch_size = 16
lr = 0.002
seed = 7

[experiment.model]
kind = "timm"
name = "vit_tiny_patch16_224"
pretrained = false
overrides = { img_size = 32, patch_size = 8, depth = 2 }

[experiment.lora]
r = 4
lora_alpha = 8.0

[experiment.partition]
seed = 3
developer_train = 0.5
auditor_train = 0.2
auditor_val = 0.1
auditor_test = 0.2
"""

DEVELOPER = """\
[developer]
device = "cpu"

[developer.data]
kind = "synthetic"
n = 200
"""

AUDITOR = """\
[auditor]
min_group_size = 5

[auditor.data]
kind = "synthetic"
n = 200
sensitive = true
"""


def _write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _error(loader, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        loader(path)
    return str(info.value)


def test_load_valid_run_file(tmp_path):
    run = load_run_file(_write(tmp_path, EXPERIMENT + DEVELOPER + AUDITOR))
    assert isinstance(run, RunFile)
    exp = run.experiment
    assert exp.name == "unit" and exp.rounds == 3 and exp.local_steps == 4
    assert exp.lr == 0.002 and exp.seed == 7 and exp.batch_size == 16
    assert exp.model.kind == "timm" and exp.model.name == "vit_tiny_patch16_224"
    assert exp.model.pretrained is False
    assert exp.model.overrides == {"img_size": 32, "patch_size": 8, "depth": 2}
    assert exp.lora.r == 4 and exp.lora.lora_alpha == 8.0
    assert exp.partition.seed == 3
    assert exp.method.name == "erm"  # default
    assert isinstance(run.developer.data, SyntheticData) and run.developer.data.n == 200
    assert run.developer.data.sensitive is False
    assert run.auditor.data.sensitive is True and run.auditor.min_group_size == 5
    # The per-party views carry only their own table.
    dev = run.developer_file()
    aud = run.auditor_file()
    assert isinstance(dev, DeveloperFile) and not hasattr(dev, "auditor")
    assert isinstance(aud, AuditorFile) and not hasattr(aud, "developer")
    assert experiment_fingerprint(dev.experiment) == experiment_fingerprint(aud.experiment)


def test_load_developer_and_auditor_files(tmp_path):
    dev = load_developer_file(_write(tmp_path, EXPERIMENT + DEVELOPER, "dev.toml"))
    aud = load_auditor_file(_write(tmp_path, EXPERIMENT + AUDITOR, "aud.toml"))
    assert dev.developer.data.kind == "synthetic"
    assert aud.auditor.data.sensitive is True
    assert experiment_fingerprint(dev.experiment) == experiment_fingerprint(aud.experiment)
    # A developer file must not carry the auditor's table, and vice versa.
    msg = _error(load_developer_file, _write(tmp_path, EXPERIMENT + DEVELOPER + AUDITOR, "x.toml"))
    assert "auditor" in msg and "unknown key" in msg


def test_unknown_key_is_named_with_its_dotted_path(tmp_path):
    text = EXPERIMENT.replace("r = 4\n", "r = 4\nrr = 5\n")
    msg = _error(load_run_file, _write(tmp_path, text + DEVELOPER + AUDITOR))
    assert "experiment.lora.rr" in msg
    assert "unknown key" in msg
    assert str(tmp_path / "run.toml") in msg  # the file is named too


def test_unknown_key_in_data_table(tmp_path):
    text = DEVELOPER.replace("n = 200\n", "n = 200\ncolour = 1\n")
    msg = _error(load_developer_file, _write(tmp_path, EXPERIMENT + text))
    assert "developer.data.synthetic.colour" in msg or "developer.data.colour" in msg


def test_wrong_type_is_named(tmp_path):
    text = EXPERIMENT.replace("r = 4\n", 'r = "eight"\n')
    msg = _error(load_run_file, _write(tmp_path, text + DEVELOPER + AUDITOR))
    assert "experiment.lora.r" in msg
    assert "eight" in msg
    assert "experiment.lora.rr" not in msg


@pytest.mark.parametrize("line, key", [
    ('r = "8"\n', "experiment.lora.r"),        # a number written as a string
    ("r = 4.0\n", "experiment.lora.r"),        # a float where an int belongs
    ("r = true\n", "experiment.lora.r"),       # a bool is no int
])
def test_no_silent_coercion(tmp_path, line, key):
    """Strict types: a value of another type is an error naming the key, never a silent cast."""
    msg = _error(load_run_file, _write(tmp_path, EXPERIMENT.replace("r = 4\n", line) + DEVELOPER + AUDITOR))
    assert key in msg


def test_strict_on_every_table_and_on_assignment():
    """The one base model (``protocol.schema.StrictModel``) is strict for config tables built in
    Python too, and on assignment; an int where a float belongs is still a float."""
    with pytest.raises(ValidationError, match="r"):
        LoRAConfig(r="8")
    lora = LoRAConfig(r=8)
    with pytest.raises(ValidationError):
        lora.r = "16"
    exp = ExperimentConfig.model_validate({"model": {"kind": "timm", "name": "vit_tiny_patch16_224"}, "lr": 1})
    assert isinstance(exp.lr, float) and exp.lr == 1.0


def test_out_of_range_value_is_named(tmp_path):
    text = EXPERIMENT.replace("rounds = 3", "rounds = 0")
    msg = _error(load_run_file, _write(tmp_path, text + DEVELOPER + AUDITOR))
    assert "experiment.rounds" in msg


def test_missing_required_key_is_named(tmp_path):
    text = EXPERIMENT.replace('name = "vit_tiny_patch16_224"\n', "")
    msg = _error(load_run_file, _write(tmp_path, text + DEVELOPER + AUDITOR))
    assert "experiment.model.name" in msg


@pytest.mark.parametrize("text", ["[experiment\nname = 1", "a = = 1", "x = 'unterminated"])
def test_invalid_toml(tmp_path, text):
    msg = _error(load_run_file, _write(tmp_path, text))
    assert "not valid TOML" in msg


def test_non_utf8_file_and_missing_file(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    assert "not valid TOML" in _error(load_run_file, p)
    assert "cannot read config" in _error(load_run_file, tmp_path / "absent.toml")


@pytest.mark.parametrize(
    "data_table",
    [
        '[developer.data]\nkind = "synthetic"\nsensitive = true\n',
        '[developer.data]\nkind = "utkface"\nroot = "utk"\nsensitive = "race"\n',
        '[developer.data]\nkind = "adult"\nroot = "adult"\nsensitive = ["sex"]\n',
        '[developer.data]\nkind = "csv"\npath = "d.csv"\nlabel_column = "y"\n'
        'positive_label = "1"\nfeature_columns = ["a"]\nsensitive_columns = ["s"]\n',
    ],
)
def test_developer_naming_sensitive_attributes_is_refused(tmp_path, data_table):
    text = EXPERIMENT + "[developer]\n" + data_table
    msg = _error(load_developer_file, _write(tmp_path, text))
    assert "developer" in msg and "sensitive" in msg


@pytest.mark.parametrize(
    "data_table",
    [
        '[auditor.data]\nkind = "synthetic"\n',
        '[auditor.data]\nkind = "utkface"\nroot = "utk"\n',
        '[auditor.data]\nkind = "adult"\nroot = "adult"\n',
    ],
)
def test_auditor_without_sensitive_is_refused(tmp_path, data_table):
    text = EXPERIMENT + "[auditor]\n" + data_table
    msg = _error(load_auditor_file, _write(tmp_path, text))
    assert "auditor" in msg and "sensitive" in msg


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    sub = tmp_path / "cfg"
    sub.mkdir()
    (sub / "weights").mkdir()
    (sub / "weights" / "w.safetensors").write_bytes(b"")
    text = EXPERIMENT.replace("pretrained = false\n",
                              'pretrained = false\nweights = "weights/w.safetensors"\n')
    text += ('[developer]\ncache_dir = "cache"\n[developer.data]\nkind = "utkface"\n'
             'root = "../data/utk"\n')
    text += '[auditor]\n[auditor.data]\nkind = "adult"\nroot = "/abs/adult"\nsensitive = ["sex"]\n'
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # must not matter
    run = load_run_file(_write(sub, text))
    assert isinstance(run.developer.data, UTKFaceData)
    assert run.developer.data.root == (tmp_path / "data" / "utk").resolve()
    assert run.developer.cache_dir == (sub / "cache").resolve()
    assert run.auditor.data.root == Path("/abs/adult")
    assert run.experiment.model.weights == str((sub / "weights" / "w.safetensors").resolve())


def test_relative_weights_that_do_not_exist_are_left_alone(tmp_path):
    text = EXPERIMENT.replace("pretrained = false\n", 'pretrained = false\nweights = "nope.pt"\n')
    run = load_run_file(_write(tmp_path, text + DEVELOPER + AUDITOR))
    assert run.experiment.model.weights == "nope.pt"


def test_package_weights_are_not_resolved(tmp_path):
    (tmp_path / "package:gt").mkdir()  # even if such a path existed
    text = EXPERIMENT.replace("pretrained = false\n",
                              'pretrained = false\nweights = "package:gt"\n')
    run = load_run_file(_write(tmp_path, text + DEVELOPER + AUDITOR))
    assert run.experiment.model.weights == "package:gt"


def _exp(**kw) -> ExperimentConfig:
    model = kw.pop("model", None) or ModelSpec(kind="timm", name="vit_tiny_patch16_224", pretrained=False)
    return ExperimentConfig(model=model, lora=LoRAConfig(r=8), **kw)


def test_fingerprint():
    a, b = _exp(lr=1e-3), _exp(lr=1e-3)
    fa = experiment_fingerprint(a)
    assert fa == experiment_fingerprint(b)
    assert len(fa) == 64 and int(fa, 16) >= 0
    assert experiment_fingerprint(_exp(lr=2e-3)) != fa
    assert experiment_fingerprint(_exp(lr=1e-3, seed=1)) != fa
    assert experiment_fingerprint(_exp(lr=1e-3, partition=PartitionConfig(seed=9))) != fa
    assert experiment_fingerprint(
        _exp(model=ModelSpec(kind="timm", name="vit_tiny_patch16_224", pretrained=False, img_size=64))
    ) != fa
    # model.weights is machine-local and excluded.
    w1 = ModelSpec(kind="timm", name="vit_tiny_patch16_224", pretrained=False, weights="/a/w.safetensors")
    w2 = ModelSpec(kind="timm", name="vit_tiny_patch16_224", pretrained=False, weights="/b/other.pt")
    assert experiment_fingerprint(_exp(model=w1)) == experiment_fingerprint(_exp(model=w2)) == fa
    # The fingerprint does not modify the config.
    assert w1.weights == "/a/w.safetensors"


def test_fingerprint_independent_of_toml_key_order(tmp_path):
    a = load_run_file(_write(tmp_path, EXPERIMENT + DEVELOPER + AUDITOR, "a.toml"))
    reordered = EXPERIMENT.replace("rounds = 3\nlocal_steps = 4\n", "local_steps = 4\nrounds = 3\n")
    assert reordered != EXPERIMENT
    b = load_run_file(_write(tmp_path, reordered + DEVELOPER + AUDITOR, "b.toml"))
    assert experiment_fingerprint(a.experiment) == experiment_fingerprint(b.experiment)


def test_partition_fractions_over_one_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="sum to"):
        PartitionConfig(developer_train=0.6, auditor_train=0.2, auditor_val=0.1, auditor_test=0.2)
    PartitionConfig(developer_train=0.5, auditor_train=0.2, auditor_val=0.1, auditor_test=0.2)  # = 1
    text = EXPERIMENT.replace("developer_train = 0.5", "developer_train = 0.6")
    msg = _error(load_run_file, _write(tmp_path, text + DEVELOPER + AUDITOR))
    assert "experiment.partition" in msg and "sum to" in msg


def test_parse_config_from_dict():
    data = {"experiment": {"model": {"kind": "hf_text", "name": "m"}},
            "developer": {"data": {"kind": "synthetic"}}}
    dev = parse_config(DeveloperFile, data)
    assert dev.experiment.model.kind == "hf_text"
    data["experiment"]["model"]["kind"] = "onnx"
    with pytest.raises(ConfigError, match="experiment.model.kind"):
        parse_config(DeveloperFile, data)
