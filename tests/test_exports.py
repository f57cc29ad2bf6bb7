"""Exported model directories: replaced safely, never someone else's files, never read half
written, and a re-export at the same S3 URI served anew (bco_ray.exports, assets.local_model_dir)."""

import json
import os
import threading

import pyarrow.fs as pafs
import pytest

from bco_ray import exports
from bco_ray.assets import local_model_dir
from bco_ray.config import StorageConfig, load_config
from bco_ray.errors import UserError


def model_files(d, tag: str, shards: int = 1):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"tag": tag}))
    for i in range(shards):
        (d / f"model-{i}.safetensors").write_text(tag * 10)
    return str(d)


def test_a_re_export_replaces_only_its_own_files_and_a_foreign_directory_is_refused(tmp_path):
    out, cfg = tmp_path / "export", StorageConfig()
    first = exports.write(model_files(tmp_path / "a", "one", shards=2), str(out), cfg, {"step": 4})
    (out / "run_card.json").write_text("{}")  # what the train stage adds beside the weights
    (out / "notes.txt").write_text("mine")  # a file bco-ray did not write
    src = model_files(tmp_path / "b", "two", shards=1)
    inode = os.stat(os.path.join(src, "model-0.safetensors")).st_ino
    second = exports.write(src, str(out), cfg, {"step": 8})
    # moved, not copied: a local export is written once (the local directory is gone)
    assert (out / "model-0.safetensors").stat().st_ino == inode and not os.path.exists(src)
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "model-0.safetensors", exports.MARKER, "notes.txt"}  # shard 1 and the card gone
    assert (out / "config.json").read_text() == json.dumps({"tag": "two"}) and (out / "notes.txt").read_text() == "mine"
    assert second["version"] != first["version"] and second["step"] == 8
    assert local_model_dir(str(out), load_config(None, [])) == str(out.resolve())

    foreign = tmp_path / "home"
    model_files(foreign, "theirs")
    with pytest.raises(UserError, match="did not write"):
        exports.check_target(str(foreign), cfg)
    with pytest.raises(UserError, match="did not write"):
        exports.write(model_files(tmp_path / "c", "x"), str(foreign), cfg, {})
    assert (foreign / "config.json").read_text() == json.dumps({"tag": "theirs"})


def test_an_export_that_died_midway_is_not_served_and_can_be_redone(tmp_path):
    out, cfg = tmp_path / "export", StorageConfig()
    exports.write(model_files(tmp_path / "a", "one"), str(out), cfg, {})
    (out / exports.INCOMPLETE).write_text("{}")  # what a writer killed mid-export leaves
    (out / exports.MARKER).unlink()
    with pytest.raises(UserError, match="still being written"):
        local_model_dir(str(out), load_config(None, []))
    exports.write(model_files(tmp_path / "b", "two"), str(out), cfg, {})  # ours: may be redone
    assert local_model_dir(str(out), load_config(None, [])) == str(out.resolve())
    # A plain model directory (a base model, no marker) is served as it is.
    assert local_model_dir(model_files(tmp_path / "base", "b"), load_config(None, []))


def test_a_re_export_on_s3_is_downloaded_again_once_per_node(tmp_path, s3_endpoint):
    s3 = ["--storage.endpoint_url", s3_endpoint, "--storage.access_key_id", "testing",
          "--storage.secret_access_key", "testing", "--storage.region", "us-east-1",
          "--model.cache_dir", str(tmp_path / "cache")]
    cfg = load_config(None, s3)
    uri = "s3://logs/exports/m"
    exports.write(model_files(tmp_path / "a", "one"), uri, cfg.storage, {})
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(local_model_dir(uri, cfg))) for _ in range(4)]
    for t in threads:  # replicas of one node starting together: one download, one directory
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 1
    first = got[0]
    assert open(f"{first}/config.json").read() == json.dumps({"tag": "one"})
    exports.write(model_files(tmp_path / "b", "two"), uri, cfg.storage, {})
    second = local_model_dir(uri, cfg)
    assert second != first and open(f"{second}/config.json").read() == json.dumps({"tag": "two"})
    fs, path = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                                 access_key="testing", secret_key="testing", region="us-east-1"), "logs/exports/m"
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/{exports.INCOMPLETE}") as f:  # a re-export under way
        f.write(b"{}")
    with pytest.raises(UserError, match="still being written"):
        local_model_dir(uri, cfg)
