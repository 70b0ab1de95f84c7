"""Volumes through fsspec (`shoal://VOLUME/path`) with real pandas and pyarrow round trips."""

from __future__ import annotations

import uuid

import pytest

import shoal

fsspec = pytest.importorskip("fsspec")
pd = pytest.importorskip("pandas")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def vol(server):
    name = f"fs-{uuid.uuid4().hex[:8]}"
    shoal.Volume.objects.create(name)
    yield name
    shoal.Volume.objects.delete(name, allow_missing=True)


def test_registered_by_entry_point():
    from shoal.fsspec import ShoalFileSystem

    assert fsspec.get_filesystem_class("shoal") is ShoalFileSystem


def test_open_ls_info_glob_rm(vol):
    fs = fsspec.filesystem("shoal")
    with fsspec.open(f"shoal://{vol}/dir/a.txt", "w") as f:
        f.write("hello\n")
    with fsspec.open(f"shoal://{vol}/dir/sub/b.bin", "wb") as f:
        f.write(b"\x00" * 10)
    assert fsspec.open(f"shoal://{vol}/dir/a.txt", "r").open().read() == "hello\n"
    assert sorted(fs.ls(f"{vol}/dir", detail=False)) == [f"{vol}/dir/a.txt", f"{vol}/dir/sub"]
    assert fs.info(f"{vol}/dir/sub/b.bin")["size"] == 10
    assert fs.info(f"{vol}/dir")["type"] == "directory"
    assert fs.exists(f"{vol}/dir/a.txt") and not fs.exists(f"{vol}/nope")
    assert fs.glob(f"{vol}/dir/**/*.bin") == [f"{vol}/dir/sub/b.bin"]
    assert vol in fs.ls("", detail=False)
    # visible to sandboxes' view of the volume
    assert b"".join(shoal.Volume.from_name(vol).read_file("dir/a.txt")) == b"hello\n"
    fs.mkdir(f"{vol}/empty")  # directories appear with their files
    fs.cp_file(f"{vol}/dir/a.txt", f"{vol}/copy.txt")
    assert fs.cat_file(f"{vol}/copy.txt") == b"hello\n"
    fs.rm(f"{vol}/dir", recursive=True)
    assert not fs.exists(f"{vol}/dir/a.txt")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{vol}/dir/a.txt")
    with pytest.raises(FileNotFoundError):
        fsspec.open(f"shoal://{vol}/missing.txt", "rb").open().read()


def test_put_get_large_streamed(vol, tmp_path):
    fs = fsspec.filesystem("shoal")
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for i in range(24):
            f.write(bytes([i]) * (1 << 20))
    fs.put(str(src), f"{vol}/big.bin")
    fs.get(f"{vol}/big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    with fs.open(f"{vol}/big.bin", "rb") as f:
        f.seek(20 << 20)
        assert f.read(3) == b"\x14\x14\x14"


def test_write_is_invisible_until_close(vol):
    fs = fsspec.filesystem("shoal")
    with fs.open(f"{vol}/x.txt", "wb") as f:
        f.write(b"old")
    seen = []
    f = fs.open(f"{vol}/x.txt", "wb", block_size=1 << 20)
    for _ in range(8):
        f.write(b"n" * (1 << 20))  # flushed in blocks to the local spool, not to the volume
        seen.append(b"".join(shoal.Volume.from_name(vol).read_file("x.txt")))
    f.close()
    assert set(seen) == {b"old"}
    assert fs.cat_file(f"{vol}/x.txt") == b"n" * (8 << 20)


def test_pandas_csv_and_pyarrow_parquet_round_trip(vol):
    df = pd.DataFrame({"a": range(1000), "b": [f"s{i}" for i in range(1000)]})
    df.to_csv(f"shoal://{vol}/data.csv", index=False)
    back = pd.read_csv(f"shoal://{vol}/data.csv")
    pd.testing.assert_frame_equal(back, df)
    df.to_parquet(f"shoal://{vol}/data.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(f"shoal://{vol}/data.parquet"), df)
    fs = fsspec.filesystem("shoal")
    table = pq.read_table(f"{vol}/data.parquet", filesystem=fs)
    assert table.num_rows == 1000 and table.column_names == ["a", "b"]
    pq.write_table(table, f"{vol}/out/t.parquet", filesystem=fs)
    assert pq.read_table(f"{vol}/out/t.parquet", filesystem=fs).equals(table)


def test_sandbox_sees_what_fsspec_wrote(app, vol):
    pd.DataFrame({"x": [1, 2, 3]}).to_csv(f"shoal://{vol}/in.csv", index=False)
    sb = shoal.Sandbox.create(app=app, volumes={"/v": shoal.Volume.from_name(vol)}, timeout=60)
    try:
        assert sb.exec("cat", "/v/in.csv").stdout.read() == "x\n1\n2\n3\n"
    finally:
        sb.terminate()


def test_polars_through_fsspec(vol):
    """polars reads and writes a volume through the file objects `fsspec.open` gives (polars 1-2
    reads URLs only of the clouds it knows itself; any other fsspec file system goes this way)."""
    pl = pytest.importorskip("polars")
    df = pl.DataFrame({"a": list(range(500)), "b": [f"r{i}" for i in range(500)]})
    with fsspec.open(f"shoal://{vol}/p/data.parquet", "wb") as f:
        df.write_parquet(f)
    with fsspec.open(f"shoal://{vol}/p/data.parquet", "rb") as f:
        assert pl.read_parquet(f).equals(df)
    with fsspec.open(f"shoal://{vol}/p/data.csv", "wb") as f:
        df.write_csv(f)
    with fsspec.open(f"shoal://{vol}/p/data.csv", "rb") as f:
        assert pl.read_csv(f).equals(df)
    assert sorted(fsspec.filesystem("shoal").ls(f"{vol}/p", detail=False)) == [
        f"{vol}/p/data.csv", f"{vol}/p/data.parquet"]
