"""The Parquet output reads back with the tools users reach for, types and metadata intact: pandas,
ray.data.read_parquet and Hugging Face datasets."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.job import run_job
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.sink import HASH_METADATA_KEY
from specvlm.demo.world import make_scene
from tests.test_pipeline import SEED, config_for


@pytest.fixture(scope="module")
def output(models, tmp_path_factory, ray_local):
    """A job's output folder (3 rows, one of them an error row with nulls), its rows and its config hash."""
    root = tmp_path_factory.mktemp("readers")
    (root / "in").mkdir()
    for i in range(2):
        buffer = io.BytesIO()
        make_scene(SEED, i).image.save(buffer, format="PNG")
        (root / "in" / f"img{i}.png").write_bytes(buffer.getvalue())
    (root / "in" / "broken.png").write_bytes(b"not an image at all")
    run_job(config_for(models, str(root / "in"), str(root / "out"), "output.max_error_fraction=1"), log=lambda *_: None)
    [path] = (root / "out").glob("*.parquet")
    table = pq.read_table(path)
    assert table.num_rows == 3 and table["error"].null_count == 2, "the fixture should hold one error row"
    return root / "out", table, table.schema.metadata[HASH_METADATA_KEY].decode()


def by_key(rows):
    return sorted(rows, key=lambda r: r["key"])


def test_pandas_reads_the_rows_and_the_config_hash(output):
    import pandas as pd

    folder, table, config_hash = output
    frame = pd.read_parquet(folder)  # the folder: _manifest.json and _staging/ are not data, and are skipped
    assert frame.attrs == {HASH_METADATA_KEY.decode(): config_hash}
    assert list(frame.columns) == OUTPUT_SCHEMA.names
    lossless = pd.read_parquet(folder, dtype_backend="pyarrow")
    assert pa.Table.from_pandas(lossless, preserve_index=False).cast(OUTPUT_SCHEMA).equals(table.cast(OUTPUT_SCHEMA))


def test_ray_data_reads_the_rows_with_schema_and_metadata(output):
    import ray

    folder, table, config_hash = output
    ds = ray.data.read_parquet(str(folder))
    schema = ds.schema().base_schema
    assert schema.metadata[HASH_METADATA_KEY].decode() == config_hash
    assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in OUTPUT_SCHEMA]
    assert by_key(ds.take_all()) == by_key(table.to_pylist())


def test_hugging_face_datasets_loads_the_rows_with_their_types(output, tmp_path):
    import datasets

    folder, table, config_hash = output
    loaded = datasets.load_dataset(
        "parquet", data_files=str(folder / "*.parquet"), split="train", cache_dir=str(tmp_path)
    )
    assert loaded.features == datasets.Features.from_arrow_schema(OUTPUT_SCHEMA)
    assert by_key(loaded.to_list()) == by_key(table.to_pylist())
    assert set(loaded["config_hash"]) == {config_hash}
