"""Vision-R1 rows: validation errors name file/row/field; JSONL, parquet and HF-disk readers; data check."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from PIL import Image

from megatron_vr1.config.data import DataConfig
from megatron_vr1.data.check import check_rows
from megatron_vr1.data.coco import write_jsonl, write_parquet
from megatron_vr1.data.dataset import LocalizationDataset
from megatron_vr1.data.readers import BadRowCounter, iter_parsed, open_rows, read_row
from megatron_vr1.data.schema import RowError, parse_row


def _row(image="img.png", **kw):
    row = {"problem": "Locate every cat in the image and output the coordinates in JSON format.", "image": image,
           "solution": json.dumps([["cat", [[1, 2, 30, 40]]], ["dog", [[10, 10, 90, 50]]]]), "width": 100,
           "height": 60, "num_instances": 2, "target_id_maps": json.dumps({"cat": 1, "Dog": 2}), "source": "t"}
    row.update(kw)
    return row


@pytest.fixture()
def rows_dir(tmp_path):
    Image.new("RGB", (100, 60), (9, 9, 9)).save(tmp_path / "img.png")
    return tmp_path


def test_good_row_becomes_a_sample(rows_dir):
    row = parse_row(_row(), file="f.jsonl", row=1, base_dir=rows_dir)
    assert row.image == rows_dir / "img.png" and row.target_id_maps == {"cat": 1, "dog": 2}
    assert [g.box for g in row.solution] == [(1.0, 2.0, 30.0, 40.0), (10.0, 10.0, 90.0, 50.0)]
    sample = row.to_sample("f.jsonl:1", min_pixels=56 * 56, max_pixels=112 * 112)
    assert (sample.input_width, sample.input_height) == (112, 56)  # smart_resize of 100x60
    assert sample.num_instances == 2 and sample.sample_id == "f.jsonl:1"


@pytest.mark.parametrize("change,field,words", [
    ({"solution": "[[\"cat\", [[1, 2, 30"}, "solution", "not valid JSON"),
    ({"solution": json.dumps([["cat", [[30, 2, 1, 40]]], ["dog", [[1, 1, 2, 2]]]])}, "solution", "x2 < x1"),
    ({"solution": json.dumps([["cat", [[1, 2, 130, 40]]], ["dog", [[1, 1, 2, 2]]]])}, "solution", "outside"),
    ({"solution": json.dumps([["cow", [[1, 2, 3, 4]]], ["dog", [[1, 1, 2, 2]]]])}, "solution", "absent from"),
    ({"num_instances": 3}, "num_instances", "solution has 2"),
    ({"width": 0}, "width", "integer >= 1"),
    ({"target_id_maps": "{\"cat\": 0}"}, "target_id_maps", "id >= 1"),
    ({"problem": ""}, "problem", "non-empty"),
])
def test_bad_rows_name_file_row_and_field(rows_dir, change, field, words):
    with pytest.raises(RowError) as info:
        parse_row(_row(**change), file="data/x.jsonl", row=7, base_dir=rows_dir)
    e = info.value
    assert (e.file, e.row, e.field) == ("data/x.jsonl", 7, field)
    assert words in str(e) and "data/x.jsonl row 7" in str(e)


def test_missing_column_is_named(rows_dir):
    raw = _row()
    del raw["target_id_maps"]
    with pytest.raises(RowError, match="target_id_maps.*column missing"):
        parse_row(raw, file="x.jsonl", row=1, base_dir=rows_dir)


def _parsed(rows, tmp_path):
    return [parse_row(r, file="in", row=i, base_dir=tmp_path) for i, r in enumerate(rows)]


def test_jsonl_paths_base64_parquet_and_hf_disk_read_the_same_rows(rows_dir):
    rows = _parsed([_row(), _row(num_instances=1, solution=json.dumps([["cat", [[0, 0, 5, 5]]]]))], rows_dir)
    write_jsonl(rows, rows_dir / "sub" / "rows.jsonl")  # image path is written relative to sub/
    first = json.loads((rows_dir / "sub" / "rows.jsonl").read_text().splitlines()[0])
    assert first["image"] == "../img.png"
    b64_row = dict(first, image=base64.b64encode((rows_dir / "img.png").read_bytes()).decode())
    (rows_dir / "b64.jsonl").write_text(json.dumps(b64_row) + "\n")
    write_parquet(rows, rows_dir / "rows.parquet")
    import datasets

    ds = datasets.Dataset.from_list([r.to_record((rows_dir / "img.png").read_bytes()) for r in rows])
    ds.save_to_disk(str(rows_dir / "hf"))

    expected = [(r.solution, r.num_instances, r.width) for r in rows]
    for path in ("sub/rows.jsonl", "rows.parquet", "hf"):
        source = open_rows(rows_dir / path)
        got = [read_row(source, i) for i in range(len(source))]
        assert [(r.solution, r.num_instances, r.width) for r in got] == expected, path
    b64 = read_row(open_rows(rows_dir / "b64.jsonl"), 0)
    assert b64.image == (rows_dir / "img.png").read_bytes()
    assert check_rows(rows_dir / "rows.parquet").ok and check_rows(rows_dir / "hf").ok


def test_on_bad_row_error_or_skip_with_counts(rows_dir):
    lines = [_row(), _row(num_instances=5), "not json", _row(width=-1), _row()]
    (rows_dir / "r.jsonl").write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    source = open_rows(rows_dir / "r.jsonl")
    with pytest.raises(RowError, match="row 2 field 'num_instances'"):
        list(iter_parsed(source, on_bad_row="error"))
    counter = BadRowCounter()
    good = list(iter_parsed(source, on_bad_row="skip", counter=counter))
    assert [i for i, _ in good] == [0, 4]
    assert counter.skipped == 3 and counter.by_field == {"num_instances": 1, "<line>": 1, "width": 1}
    assert "3 bad rows skipped" in counter.report()


def test_dataset_reports_skipped_and_filtered_rows_each_epoch(rows_dir, caplog):
    one = json.dumps([["cat", [[0, 0, 5, 5]]]])
    lines = [_row(), _row(num_instances=9), _row(num_instances=1, solution=one), _row(), _row(width=-1)]
    (rows_dir / "r.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = DataConfig(on_bad_row="skip", min_instances=2, max_instances=30, seed=3)
    data = LocalizationDataset.from_config(cfg, rows_dir / "r.jsonl")
    with caplog.at_level(logging.WARNING):
        it = iter(data)
        got = [next(it) for _ in range(5)]  # 2 usable rows per epoch -> crosses into epoch 2
    assert {s.sample_id for s in got} == {"r.jsonl:1", "r.jsonl:4"}
    rep = data.epoch_reports[0]
    assert (rep.epoch, rep.yielded, rep.filtered, rep.skipped) == (0, 2, 1, 2)
    assert "2 bad rows skipped" in caplog.text and "1 filtered" in caplog.text
    strict = LocalizationDataset(rows_dir / "r.jsonl", on_bad_row="error", shuffle=False)
    with pytest.raises(RowError, match="num_instances"):
        list(zip(range(5), strict))


def test_check_reports_every_bad_row(rows_dir, capsys):
    Image.new("RGB", (50, 60)).save(rows_dir / "small.png")
    (rows_dir / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines = [_row(), _row(image="missing.png"), _row(image="corrupt.png"), _row(image="small.png"),
             _row(solution="nope"), _row(num_instances=1)]
    path = rows_dir / "r.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = check_rows(path)
    assert [(e.row, e.field) for e in report.errors] == [(2, "image"), (3, "image"), (4, "width"), (5, "solution"),
                                                          (6, "num_instances")]
    assert "does not exist" in str(report.errors[0]) and "cannot decode" in str(report.errors[1])
    from megatron_vr1.cli import main

    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("BAD ") == 5 and "6 rows, 5 bad" in out and "Traceback" not in out
    assert main(["data", "check", str(rows_dir / "nope.jsonl")]) == 2
    assert "no such rows file" in capsys.readouterr().err


def test_sft_target_of_a_sample_is_in_input_pixels(rows_dir):
    from megatron_vr1.data.prompts import sample_sft_target

    sample = parse_row(_row(), file="f", row=1, base_dir=rows_dir).to_sample("s", min_pixels=56 * 56,
                                                                             max_pixels=112 * 112)
    body = json.loads(sample_sft_target(sample).removeprefix("```json\n").removesuffix("\n```"))
    # 100x60 -> 112x56: x scales by 1.12, y by 56/60
    assert body == [{"bbox_2d": [1, 2, 34, 37], "label": "cat"}, {"bbox_2d": [11, 9, 101, 47], "label": "dog"}]


def test_hf_image_feature_and_parquet_struct_rows(rows_dir):
    """The released data stores ``image`` as an HF Image feature ({bytes, path} struct in parquet)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    png = (rows_dir / "img.png").read_bytes()
    record = dict(_row(), image={"bytes": png, "path": None})
    pq.write_table(pa.Table.from_pylist([record]), rows_dir / "struct.parquet")
    ds = datasets.Dataset.from_list([dict(_row(), image=str(rows_dir / "img.png"))])
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(rows_dir / "hfimg"))
    for path in ("struct.parquet", "hfimg"):
        report = check_rows(rows_dir / path)
        assert report.ok and report.rows == 1, [str(e) for e in report.errors]
        row = read_row(open_rows(rows_dir / path), 0)
        assert row.num_instances == 2 and row.target_id_maps == {"cat": 1, "dog": 2}


def test_iter_epoch_is_one_pass_without_moving_the_training_position(rows_dir):
    lines = [_row(), _row(), _row(width=-1), _row()]
    (rows_dir / "r.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = LocalizationDataset(rows_dir / "r.jsonl", on_bad_row="skip", shuffle=False)
    assert [s.sample_id for s in data.iter_epoch()] == ["r.jsonl:1", "r.jsonl:2", "r.jsonl:4"]
    assert data.epoch_reports[-1].skipped == 1 and data.sampler.state_dict()["offset"] == 0


def test_dataset_skips_rows_whose_image_is_bad_and_names_each_once(rows_dir, caplog):
    """A missing, corrupt or wrongly sized image is a bad row like a schema error: counted on every visit, named
    in the log on the first only; under "error" it is the RowError that stops the run."""
    Image.new("RGB", (50, 60)).save(rows_dir / "small.png")
    (rows_dir / "corrupt.png").write_bytes(b"\x89PNG not really")
    lines = [_row(), _row(image="missing.png"), _row(image="corrupt.png"), _row(image="small.png")]
    (rows_dir / "r.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = LocalizationDataset(rows_dir / "r.jsonl", on_bad_row="skip", seed=5)
    with caplog.at_level(logging.WARNING):
        it = iter(data)
        assert [next(it).sample_id for _ in range(3)] == ["r.jsonl:1"] * 3  # three epochs
    # Epochs 0 and 1 were read through (3 bad rows each), epoch 2 up to its good row.
    assert data.bad_rows_skipped == 6 + [int(i) for i in data.sampler.epoch_indices(2)].index(0)
    for row, field in ((2, "image"), (3, "image"), (4, "width")):
        assert caplog.text.count(f"r.jsonl row {row} field '{field}'") == 1
    assert "3 bad rows skipped (image: 2, width: 1)" in caplog.text
    resumed = LocalizationDataset(rows_dir / "r.jsonl", on_bad_row="skip", seed=5)
    resumed.load_state_dict(data.state_dict())
    assert resumed.bad_rows_skipped == data.bad_rows_skipped  # the logged count continues across a resume
    strict = LocalizationDataset(rows_dir / "r.jsonl", on_bad_row="error", shuffle=False)
    with pytest.raises(RowError, match=r"r.jsonl row 2 field 'image': file .*missing.png does not exist"):
        list(zip(range(4), strict))


def test_model_inputs_reuses_the_image_the_dataset_just_decoded(rows_dir, monkeypatch):
    import megatron_vr1.data.dataset as dataset_mod

    (rows_dir / "r.jsonl").write_text(json.dumps(_row()) + "\n")
    data = LocalizationDataset(rows_dir / "r.jsonl", shuffle=False, min_pixels=56 * 56, max_pixels=112 * 112)
    it = iter(data)
    first, second = next(it), next(it)
    decodes = []
    monkeypatch.setattr(dataset_mod, "open_image", lambda src: decodes.append(src) or Image.open(src).convert("RGB"))
    a = dataset_mod.model_inputs(second, min_pixels=56 * 56, max_pixels=112 * 112, backend="pil")
    b = dataset_mod.model_inputs(first, min_pixels=56 * 56, max_pixels=112 * 112, backend="pil")
    assert decodes == [first.image]  # the sample just drawn reused the check's decode; an older one decodes again
    assert (a.pixel_values == b.pixel_values).all() and a.image_grid_thw == b.image_grid_thw
